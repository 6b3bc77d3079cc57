"""GPM baseline: Gradient Projection Memory for continual learning.

Saha, Garg and Roy, "Gradient Projection Memory for Continual Learning", ICLR 2021
(ref. [36] of LANCE; the "GPM" row of Table 3). After each task GPM builds, per layer,
a representation matrix from a few training samples (a Linear layer's inputs; a
Conv2d's inputs unfolded into patches with the layer's own kernel, stride, padding and
dilation), and adds to the layer's basis the leading left singular vectors of its part
outside the basis, as many as the energy threshold asks (GPM's Eq. 8-9, the rule LANCE's
Eq. 5 follows). While training later tasks, every weight gradient of those layers is
projected out of the stored bases, ``g <- g - g U U^T``; the task heads are not
projected.

What follows GPM's public code (``sahagobinda/GPM``)
----------------------------------------------------
* **Samples per layer** (:data:`~lance_lib.continual.specs.REFERENCE_SAMPLES`): one
  random draw of training samples per task, of which layer ``l`` uses the first
  ``k_l``. Split CIFAR-100 / AlexNet (``main_cifar100.py``,
  ``get_representation_matrix``): 125 samples drawn,
  ``batch_list = [2*12, 100, 100, 125, 125]`` for conv1-3, fc1, fc2. 5-Datasets /
  reduced ResNet18 (``main_five_dataset.py``, ``get_representation_matrix_ResNet18``):
  100 drawn, ``batch_list = [10]*8 + [50]*3 + [100]*6`` for the 17 3x3 convolutions in
  order, and each of the three 1x1 shortcut convolutions (inserted after its block's
  second convolution) uses the count of its block's first convolution (10, 50, 100).
  GPM's repository publishes no miniImageNet script; Split miniImageNet uses the same
  reduced ResNet18 function's counts (as the miniImageNet scripts of GPM's follow-ups
  do, with the stride-2 stem).
* **Threshold** for task ``t`` (0-based): ``base + t * step``: 0.97 + 0.003 t for Split
  CIFAR-100, 0.965 for 5-Datasets; 0.985 + 0.0003 t for miniImageNet (LANCE's Table 7
  settings for GPM's row).
* Biases and BatchNorm parameters learn on the first task only (the continual runner
  does this for every strategy).

Where this implementation differs
---------------------------------
* The first task keeps the smallest rank that reaches the threshold (Eq. 3); GPM's code
  keeps one direction fewer (``r = sum(cumsum(ratio) < threshold)``).
* The basis update is :func:`lance_lib.hosvd.leading_subspace` on ``R R^T`` with
  ``rule="eq5"``: the left singular vectors of ``R`` are the eigenvectors of ``R R^T``
  and its squared singular values the eigenvalues, so this is GPM's criterion.
* The projection uses the ``(n, k)`` bases directly. GPM's code keeps the ``(n, n)``
  projection matrices ``U U^T`` during training instead; :meth:`GPM.report` gives both
  sizes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from lance_lib.accounting import MIB
from lance_lib.calibration import resolve_layers
from lance_lib.continual.specs import TaskLayers
from lance_lib.continual.strategies import (
    BYTES_PER_ELEMENT,
    SequentialStrategy,
    backbone_layers,
    register_strategy,
)
from lance_lib.hosvd import leading_subspace
from lance_lib.models import MultiHead
from lance_lib.validation import check_int, check_real

if TYPE_CHECKING:
    from lance_lib.continual.specs import BenchmarkSpec

__all__ = [
    "GPM",
    "layer_samples",
    "project_gradients",
    "representation_matrices",
    "update_bases",
]


def layer_samples(samples: int | Sequence[int], layers: Sequence[str]) -> dict[str, int]:
    """Per-layer sample counts: one count for every layer, or one per layer in order.

    Raises
    ------
    ValueError
        A sequence whose length is not the number of layers, or a count below 1.
    """
    if isinstance(samples, Sequence) and not isinstance(samples, str):
        if len(samples) != len(layers):
            raise ValueError(
                f"gpm_samples lists {len(samples)} counts but the network has {len(layers)} "
                f"layers ({layers}); give one count per layer, or a single count for all"
            )
        counts = list(samples)
    else:
        counts = [samples] * len(layers)
    return {
        name: check_int(f"gpm_samples[{name!r}]", k, minimum=1)
        for name, k in zip(layers, counts, strict=True)
    }


def representation_matrices(
    model: nn.Module,
    inputs: torch.Tensor,
    layers: Sequence[str],
    task: int,
    samples: Mapping[str, int] | None = None,
) -> dict[str, torch.Tensor]:
    """GPM's representation matrix of every layer, one column per input vector.

    Parameters
    ----------
    model
        A :class:`~lance_lib.models.MultiHead`; run in eval mode under ``no_grad``
        (training flags restored).
    inputs
        The sample images, in the order of GPM's random draw.
    layers
        Conv2d / Linear layer names.
    task
        Head used for the forward pass.
    samples
        Per layer, how many of the first ``inputs`` it uses (GPM's ``batch_list``);
        default all of them.

    Returns
    -------
    dict
        ``(n, columns)`` float64 matrices: ``n = C kh kw`` and one column per patch
        (``F.unfold`` with the layer's kernel, stride, padding and dilation) of each
        used sample for a Conv2d, ``n = in_features`` and one column per used sample
        for a Linear.
    """
    modules = resolve_layers(model, layers)
    samples = dict(samples or {})
    mats: dict[str, torch.Tensor] = {}

    def hook(name: str, module: nn.Module):
        def record(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach()[: samples.get(name, len(args[0]))].to(torch.float64)
            if isinstance(module, nn.Conv2d):
                if module.groups != 1:
                    raise ValueError(f"GPM: layer {name!r} is a grouped convolution")
                p = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
                mats[name] = p.permute(1, 0, 2).reshape(p.shape[1], -1)
            else:
                mats[name] = x.reshape(-1, x.shape[-1]).T

        return record

    handles = [m.register_forward_pre_hook(hook(n, m)) for n, m in modules.items()]
    flags = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(inputs.to(next(model.parameters()).device), task)
    finally:
        for h in handles:
            h.remove()
        for m, flag in flags.items():
            m.training = flag
    return {name: mats[name].cpu() for name in layers}


def update_bases(
    bases: Mapping[str, torch.Tensor], mats: Mapping[str, torch.Tensor], threshold: float
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Grow each layer's GPM basis from its representation matrix (GPM Eq. 8-9).

    Returns
    -------
    bases, added
        New ``(n, k)`` orthonormal bases (old columns kept) and the number of
        directions added per layer (0 when the basis already explains ``threshold``
        of the energy, or spans the whole space).
    """
    threshold = check_real("threshold", threshold, low=0.0, high=1.0, low_open=True)
    new: dict[str, torch.Tensor] = {}
    added: dict[str, int] = {}
    for name, r in mats.items():
        old = bases.get(name)
        old = torch.zeros(r.shape[0], 0, dtype=torch.float64) if old is None else old
        sub = leading_subspace(r @ r.T, threshold, old, rule="eq5")
        new[name] = torch.cat([old, sub.basis], dim=1)
        added[name] = sub.rank
    return new, added


def project_gradients(model: nn.Module, bases: Mapping[str, torch.Tensor]) -> None:
    """Replace each layer's weight gradient ``g`` by ``g - g U U^T`` (in place).

    ``g`` is viewed as ``(out, n)``: ``(O, C kh kw)`` for a Conv2d.
    """
    modules = resolve_layers(model, list(bases)) if bases else {}
    for name, u in bases.items():
        w = modules[name].weight
        if w.grad is None or u.shape[1] == 0:
            continue
        u = u.to(device=w.device, dtype=w.dtype)
        g = w.grad.reshape(w.shape[0], -1)
        w.grad = (g - (g @ u) @ u.T).reshape(w.shape)


@register_strategy("gpm")
class GPM(SequentialStrategy):
    """GPM as a strategy of :func:`lance_lib.continual.training.run_continual`.

    Parameters
    ----------
    layers
        Layers whose gradients are projected (the backbone's Conv2d / Linear layers).
    threshold, threshold_step
        Energy threshold for task ``t`` (0-based): ``threshold + t * threshold_step``.
    samples
        Training samples for the representation matrices: one count for every layer,
        or one per layer (:data:`~lance_lib.continual.specs.REFERENCE_SAMPLES`). The
        largest count is drawn at random per task; each layer uses the first of them.
    seed
        Seed of the sample draw (task ``t`` draws with ``seed + t``).
    """

    def __init__(
        self,
        layers: Sequence[str],
        threshold: float = 0.97,
        threshold_step: float = 0.003,
        samples: int | Sequence[int] = 125,
        seed: int = 0,
    ) -> None:
        super().__init__(layers)
        self.threshold = check_real("gpm_threshold", threshold, low=0.0, high=1.0, low_open=True)
        self.threshold_step = check_real("gpm_threshold_step", threshold_step, low=0.0)
        self.samples = layer_samples(samples, self.layers)
        self.seed = check_int("seed", seed, minimum=0)
        self.bases: dict[str, torch.Tensor] = {}
        self.tasks: list[dict[str, Any]] = []

    @classmethod
    def from_spec(cls, spec: BenchmarkSpec, model: MultiHead, seed: int) -> GPM:
        """GPM with the benchmark's thresholds and per-layer sample counts."""
        return cls(
            backbone_layers(model),
            spec.gpm_threshold,
            spec.gpm_threshold_step,
            spec.gpm_samples,
            seed,
        )

    def task_threshold(self, task: int) -> float:
        """Threshold of task ``task`` (0-based), capped at 1."""
        return min(1.0, self.threshold + task * self.threshold_step)

    def before_task(self, model: MultiHead, task: int, loader: DataLoader) -> TaskLayers:
        """Nothing to prepare; layers whose basis spans their input space are frozen."""
        full = self.full_ranks(model, task, loader)
        saturated = [n for n, u in self.bases.items() if u.shape[1] >= u.shape[0]]
        return TaskLayers(full.layer_ranks, saturated)

    def after_backward(self, model: nn.Module, task: int) -> None:
        """Project the backbone's weight gradients out of the stored bases."""
        if task > 0:
            project_gradients(model, self.bases)

    def after_task(self, model: nn.Module, task: int, loader: DataLoader) -> None:
        """Representation matrices from the sampled training inputs; grow the bases."""
        inputs = _sample_inputs(loader, max(self.samples.values()), self.seed + task)
        mats = representation_matrices(model, inputs, self.layers, task, self.samples)
        self.bases, added = update_bases(self.bases, mats, self.task_threshold(task))
        self.tasks.append(
            {
                "task": task,
                "threshold": self.task_threshold(task),
                "samples": dict(self.samples),
                "added": added,
                "basis_rank": {k: int(v.shape[1]) for k, v in self.bases.items()},
            }
        )

    def report(self) -> dict[str, Any]:
        """Per-task basis ranks and memory: the stored bases (and GPM's n x n matrices)."""
        elements = sum(u.numel() for u in self.bases.values())
        square = sum(u.shape[0] ** 2 for u in self.bases.values())
        return {
            "tasks": self.tasks,
            "memory": {
                "mb": elements * BYTES_PER_ELEMENT / MIB,
                "definition": (
                    "GPM: sum over layers of the stored bases' elements (n x k, n = C kh kw "
                    "for a Conv2d, in_features for a Linear), 4 bytes per element, "
                    "MB = 2**20 bytes"
                ),
                "projection_matrices_mb": square * BYTES_PER_ELEMENT / MIB,
                "projection_matrices_definition": (
                    "the n x n matrices U U^T that GPM's reference code keeps during "
                    "training (the convention the paper's Table 3 counts), same units"
                ),
                "basis_shapes": {k: list(v.shape) for k, v in self.bases.items()},
            },
        }


def _sample_inputs(loader: Iterable[Any], count: int, seed: int) -> torch.Tensor:
    """``count`` random inputs of the loader's dataset (all of them when it is smaller)."""
    dataset = loader.dataset
    generator = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(dataset), generator=generator)[:count].tolist()
    return torch.stack([dataset[i][0] for i in index])
