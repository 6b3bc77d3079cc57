"""GPM baseline: Gradient Projection Memory for continual learning.

Saha, Garg and Roy, "Gradient Projection Memory for Continual Learning", ICLR 2021
(ref. [36] of LANCE; the "GPM" row of Table 3).  After each task GPM builds, per layer,
a representation matrix from about 125 training samples (a Linear layer's inputs; a
Conv2d's inputs unfolded into patches with the layer's own kernel, stride, padding and
dilation), and adds to the layer's basis the leading left singular vectors of its part
outside the basis, as many as the energy threshold asks (GPM's Eq. 8-9, the rule LANCE's
Eq. 5 follows).  While training later tasks, every weight gradient of those layers is
projected out of the stored bases, ``g <- g - g U U^T``; the task heads are not
projected.

Implementation notes
--------------------
* The left singular vectors of a representation matrix ``R`` are the eigenvectors of
  ``R R^T`` and its squared singular values the eigenvalues, so the basis update is
  :func:`lance_lib.hosvd.leading_subspace` on ``R R^T`` with ``rule="eq5"``: Eq. (5)
  of LANCE is GPM's criterion.  The first task uses Eq. (3), the smallest rank that
  reaches the threshold (GPM's reference code keeps one direction fewer).
* The threshold for task ``t`` (0-based) is ``base + t * step``: GPM uses
  0.97 + 0.003 t for Split CIFAR-100, 0.985 + 0.0003 t for miniImageNet and 0.965 for
  5-Datasets.
* The projection uses the ``(n, k)`` bases directly.  GPM's reference code keeps the
  ``(n, n)`` projection matrices ``U U^T`` during training instead;
  :meth:`GPM.report` gives both sizes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ..accounting import MIB
from ..calibration import resolve_layers
from ..hosvd import check_eps, leading_subspace

__all__ = ["GPM", "project_gradients", "representation_matrices", "update_bases"]


def representation_matrices(
    model: nn.Module,
    inputs: torch.Tensor,
    layers: Sequence[str],
    task: int,
) -> dict[str, torch.Tensor]:
    """GPM's representation matrix of every layer, one column per input vector.

    Parameters
    ----------
    model
        A :class:`~lance_lib.models.MultiHead`; run in eval mode under ``no_grad``
        (training flags restored).
    inputs
        The sample images (GPM: 125 random training samples).
    layers
        Conv2d / Linear layer names.
    task
        Head used for the forward pass.

    Returns
    -------
    dict
        ``(n, columns)`` float64 matrices: ``n = C kh kw`` and one column per patch
        (``F.unfold`` with the layer's kernel, stride, padding and dilation) for a
        Conv2d, ``n = in_features`` and one column per sample for a Linear.
    """
    modules = resolve_layers(model, layers)
    mats: dict[str, torch.Tensor] = {}

    def hook(name: str, module: nn.Module):
        def record(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach().to(torch.float64)
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
    threshold = check_eps(threshold, "threshold")
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


class GPM:
    """GPM as a method of :func:`lance_lib.continual.run_continual`.

    Parameters
    ----------
    layers
        Layers whose gradients are projected (the backbone's Conv2d / Linear layers).
    threshold, threshold_step
        Energy threshold for task ``t`` (0-based): ``threshold + t * threshold_step``.
    num_samples
        Training samples for the representation matrices (GPM: 125).
    seed
        Seed of the sample choice.
    """

    name = "gpm"

    def __init__(
        self,
        layers: Sequence[str],
        threshold: float = 0.97,
        threshold_step: float = 0.003,
        num_samples: int = 125,
        seed: int = 0,
    ) -> None:
        self.layers = list(layers)
        self.threshold = float(threshold)
        self.threshold_step = float(threshold_step)
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.bases: dict[str, torch.Tensor] = {}
        self.tasks: list[dict[str, Any]] = []

    def task_threshold(self, task: int) -> float:
        """Threshold of task ``task`` (0-based), capped at 1."""
        return min(1.0, self.threshold + task * self.threshold_step)

    def before_task(self, model: nn.Module, task: int, loader: DataLoader) -> None:
        """Nothing to prepare: the bases are already stored."""

    def after_backward(self, model: nn.Module, task: int) -> None:
        """Project the backbone's weight gradients out of the stored bases."""
        if task > 0:
            project_gradients(model, self.bases)

    def after_task(self, model: nn.Module, task: int, loader: DataLoader) -> None:
        """Representation matrices from ``num_samples`` training samples; grow the bases."""
        inputs = _sample_inputs(loader, self.num_samples, self.seed + task)
        mats = representation_matrices(model, inputs, self.layers, task)
        self.bases, added = update_bases(self.bases, mats, self.task_threshold(task))
        self.tasks.append(
            {
                "task": task,
                "threshold": self.task_threshold(task),
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
                "mb": elements * 4 / MIB,
                "definition": (
                    "GPM: sum over layers of the stored bases' elements (n x k, n = C kh kw "
                    "for a Conv2d, in_features for a Linear), 4 bytes per element, "
                    "MB = 2**20 bytes"
                ),
                "projection_matrices_mb": square * 4 / MIB,
                "projection_matrices_definition": (
                    "the n x n matrices U U^T that GPM's reference code keeps during "
                    "training, same units"
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
