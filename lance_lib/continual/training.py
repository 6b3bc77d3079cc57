"""Phase III of LANCE: continual learning with a null-space activation memory.

Tasks arrive one after another (Sec. 2.3 of LANCE, Algorithm 1 lines 19-22).  After
task ``t`` every compressed layer keeps a memory ``M^t`` of important directions of its
input-feature mode ``d`` (channels for Conv2d, last mode for Linear); the next task is
calibrated in the null space of ``M^t`` (Algorithm 1 lines 5-8), so that its weight
updates, which lie in the span of the calibrated mode-``d`` factor (Theorem 1), are
orthogonal to the directions earlier tasks use.

This module holds

* :func:`update_memory` - Phase III: mode-``d`` covariance from ``N_CL`` batches,
  projection out of ``M^{t-1}``, rank by Eq. (5), ``M^t = orth([M^{t-1}, U_hat])``;
* :func:`null_space_calibration` - Phase I constrained by the memory, with a warning
  when a layer is saturated;
* :func:`interference` - the per-sample bound on how far a trained layer's output on
  earlier tasks' inputs can move;
* :class:`PlateauSchedule` - Table 7's learning-rate schedule;
* :func:`average_accuracy`, :func:`backward_transfer` - ACC and BWT, Eq. (6);
* :func:`run_continual` - the task-incremental loop shared by LANCE, GPM
  (:mod:`lance_lib.baselines.gpm`), sequential fine-tuning and joint multitask training;
* :data:`BENCHMARKS`, :func:`load_benchmark`, :func:`run_benchmark` - Table 7's
  benchmarks and the embedded offline one, with results files keyed by settings.

Saturation
----------
When ``M`` already spans a layer's whole input-feature space (``m = n``), the
null-space calibration has nothing left: the mode-``d`` factor is ``(n, 0)``, the
layer's weight gradient is exactly zero and the layer is frozen for that task (its
input gradient is still exact, so earlier layers and the head keep learning).  A
:class:`SaturationWarning` names the layer; Phase III then adds no direction.  The
same freezing happens, with the same warning, when Eq. (5) selects zero new directions
because the memory already explains ``eps`` of the new task's energy.

References
----------
Apolinario & Roy, "LANCE: Low Rank Activation Compression for Efficient On-Device
Continual Learning", arXiv:2509.21617, Sec. 2.3, Algorithm 1, Eq. (5), Eq. (6),
Appendix A.2 (Tables 5-7), Appendix C.
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .accounting import MIB, subspace_elements
from .baselines.gpm import GPM
from .calibration import Subspaces, calibrate, collect_covariances, feature_mode, resolve_layers
from .data import (
    DatasetNotFoundError,
    get_dataset,
    make_loader,
    task_splits,
    train_val_split,
)
from .hosvd import check_eps, leading_subspace
from .layers import LanceConv2d, LanceLinear, compress, restore
from .models import MultiHead, alexnet_cl, reduced_resnet18_cl
from .results import cached_json, result_path

__all__ = [
    "BENCHMARKS",
    "BenchmarkSpec",
    "ContinualMethod",
    "ContinualTask",
    "FineTune",
    "LanceCL",
    "MemoryUpdate",
    "PlateauSchedule",
    "SaturationWarning",
    "average_accuracy",
    "backbone_layers",
    "backward_transfer",
    "evaluate",
    "interference",
    "load_benchmark",
    "null_space_calibration",
    "run_benchmark",
    "run_continual",
    "train_multitask",
    "update_memory",
]

BYTES_PER_ELEMENT = 4
METHODS = ("lance", "gpm", "finetune", "multitask")

Forward = Callable[[nn.Module, Any], Any]


class SaturationWarning(UserWarning):
    """A layer's memory leaves no room for a new task: the layer is frozen for it."""


# ----------------------------------------------------------------------------- metrics


def _check_matrix(acc_matrix: Sequence[Sequence[float]] | torch.Tensor) -> torch.Tensor:
    a = torch.as_tensor(acc_matrix, dtype=torch.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] == 0:
        raise ValueError(
            "the accuracy matrix must be square T x T (A[j, i]: accuracy on task i after "
            f"training task j), got shape {tuple(a.shape)}"
        )
    return a


def average_accuracy(acc_matrix: Sequence[Sequence[float]] | torch.Tensor) -> float:
    """ACC of Eq. (6): the mean over tasks ``i`` of ``A[T, i]`` (last row).

    Parameters
    ----------
    acc_matrix
        ``T x T`` matrix, ``A[j, i]`` the accuracy on task ``i`` after training task
        ``j`` (0-based here; entries above the diagonal are ignored).
    """
    a = _check_matrix(acc_matrix)
    return float(a[-1].mean())


def backward_transfer(acc_matrix: Sequence[Sequence[float]] | torch.Tensor) -> float | None:
    """BWT of Eq. (6): the mean over ``i < T`` of ``A[T, i] - A[i, i]``.

    ``None`` for a single task (no earlier task to forget).
    """
    a = _check_matrix(acc_matrix)
    t = a.shape[0]
    if t == 1:
        return None
    return float((a[-1, :-1] - a.diagonal()[:-1]).mean())


# ---------------------------------------------------------------------- Phase III memory


def backbone_layers(model: nn.Module) -> list[str]:
    """Names of the Conv2d / Linear layers LANCE compresses in continual learning.

    Every Conv2d and Linear of a :class:`~lance_lib.models.MultiHead` backbone (the
    per-task heads are excluded: each is trained only on its own task).
    """
    if not isinstance(model, MultiHead):
        raise TypeError(f"continual learning needs a MultiHead model, got {type(model).__name__}")
    return [
        f"backbone.{name}"
        for name, m in model.backbone.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]


def _feature_modes(model: nn.Module, layers: Sequence[str]) -> dict[str, list[int]]:
    modules = resolve_layers(model, layers)
    # -1 is the last mode whatever the Linear input's rank; 1 the channels of a Conv2d
    return {name: [1 if isinstance(m, nn.Conv2d) else -1] for name, m in modules.items()}


@dataclass
class MemoryUpdate:
    """Result of one Phase III update.

    Attributes
    ----------
    memory
        Per layer, the new ``(n, m^t)`` orthonormal memory ``M^t`` (float64).
    added
        Per layer, ``r_d``: directions added by Eq. (5).
    saturated
        Layers whose memory spans their whole input-feature space.
    """

    memory: dict[str, torch.Tensor]
    added: dict[str, int]
    saturated: list[str] = field(default_factory=list)


def update_memory(
    model: nn.Module,
    loader: Iterable[Any],
    layers: Sequence[str],
    memory: Mapping[str, torch.Tensor] | None,
    eps_cl: float,
    num_batches: int = 10,
    forward: Forward | None = None,
) -> MemoryUpdate:
    """Phase III of LANCE: grow each layer's memory after a task (Algorithm 1, 19-22).

    For every layer: estimate the covariance ``B_d^t`` of its input-feature mode over
    ``num_batches`` (``N_CL``) batches with Eq. (2), project out the previous memory,
    ``B_hat = (I - M M^T) B_d^t (I - M M^T)``, pick ``r_d`` by Eq. (5) with
    ``eps_cl`` and set ``M^t = orth([M^{t-1}, U_hat[:, :r_d]])``.

    Parameters
    ----------
    model
        The network after training task ``t`` (uncompressed; run in eval mode, left
        unchanged).
    loader
        Batches of task ``t``'s training data.
    layers
        Conv2d / Linear layer names.
    memory
        ``M^{t-1}`` per layer (``None`` or missing layers: empty memory, ``M^0``).
    eps_cl
        ``eps_CL`` of Table 7, in (0, 1].
    num_batches
        ``N_CL`` (Table 7: 10).
    forward
        ``forward(model, batch)``, e.g. ``lambda m, b: m(b[0], task)``.

    Returns
    -------
    MemoryUpdate

    Notes
    -----
    The new directions are eigenvectors of the symmetric ``B_hat`` re-orthogonalised
    against ``M`` (:func:`lance_lib.hosvd.leading_subspace`), so ``orth`` is a plain
    concatenation: ``M^{t-1}`` is kept column for column.  Without a memory Eq. (5)
    reduces to Eq. (3).  Because ``B_hat``'s discarded energy is exactly the energy of
    ``B_d^t`` outside ``M^t``, the memory explains at least ``eps_CL`` of the task's
    feature-mode energy on these batches.
    """
    eps_cl = check_eps(eps_cl, "eps_cl")
    memory = dict(memory or {})
    covs, _ = collect_covariances(
        model, loader, layers, num_batches, _feature_modes(model, layers), forward
    )
    new: dict[str, torch.Tensor] = {}
    added: dict[str, int] = {}
    saturated: list[str] = []
    for name in layers:
        cov = next(c for c in covs[name] if c is not None)
        old = memory.get(name)
        if old is not None and old.shape[0] != cov.size:
            raise ValueError(
                f"layer {name!r}: memory has {old.shape[0]} rows, but the layer's input "
                f"feature mode has size {cov.size}"
            )
        if old is None:
            old = torch.zeros(cov.size, 0, dtype=torch.float64)
        old = old.to(torch.float64)
        sub = leading_subspace(cov.cov, eps_cl, old, rule="eq5")
        new[name] = torch.cat([old, sub.basis], dim=1)
        added[name] = sub.rank
        if new[name].shape[1] == new[name].shape[0]:
            saturated.append(name)
    return MemoryUpdate(new, added, saturated)


def null_space_calibration(
    model: nn.Module,
    loader: Iterable[Any],
    layers: Sequence[str],
    memory: Mapping[str, torch.Tensor],
    eps: float,
    num_batches: int = 100,
    modes: Any = "no_batch",
    forward: Forward | None = None,
    memory_rule: str = "eq5",
) -> Subspaces:
    """Phase I for task ``t + 1`` with mode ``d`` calibrated in the null space of ``M^t``.

    Algorithm 1 lines 3-13: every mode but ``d`` follows Eq. (2)-(3); mode ``d`` keeps
    the leading eigenvectors of ``B_hat_d = (I - M M^T) B_d (I - M M^T)`` chosen by the
    energy rule of Eq. (5) (``memory_rule="eq5"``) or Eq. (3) on ``B_hat_d``
    (``"eq3"``); see :func:`lance_lib.calibration.calibrate`.

    Warns
    -----
    SaturationWarning
        For every layer whose mode-``d`` rank is 0: either ``M`` spans the whole
        input-feature space (saturated) or Eq. (5) finds that ``M`` already explains
        ``eps`` of the energy.  That layer's weights are frozen for the task.
    """
    subspaces = calibrate(
        model,
        loader,
        layers,
        eps,
        num_batches,
        modes,
        memory=memory,
        memory_rule=memory_rule,
        forward=forward,
    )
    modules = resolve_layers(model, layers)
    for name, sub in subspaces.items():
        d = feature_mode(modules[name], len(sub.input_shape))
        if sub.ranks[d] == 0:
            m = memory.get(name)
            n = sub.input_shape[d]
            kept = 0 if m is None else m.shape[1]
            why = (
                f"its memory already spans all {n} input features (saturated)"
                if kept >= n
                else f"Eq. (5) keeps no new direction (the memory's {kept} of {n} directions "
                f"already explain eps={subspaces.settings['eps']} of the energy)"
            )
            warnings.warn(
                f"layer {name!r}: {why}; its mode-d factor has rank 0, so its weight gradient "
                "is zero and the layer is frozen for this task",
                SaturationWarning,
                stacklevel=2,
            )
    return subspaces


def interference(
    module: nn.Conv2d | nn.Linear,
    weight_delta: torch.Tensor,
    memory: torch.Tensor,
    x: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample output drift of a layer on earlier inputs and its null-space bound.

    After a task trained with factors orthogonal to ``M`` the weight change ``dW`` has
    its input-feature rows in ``span(U_d)``, ``U_d`` orthogonal to ``M`` (Theorem 1:
    every LANCE weight gradient is ``grad P``, ``P = U_d U_d^T`` on mode ``d``), hence
    ``dW x = dW (I - M M^T) x``.  For a Linear layer and an input sample ``x``

    ``||dW x|| <= ||dW||_2 ||(I - M M^T) x||``.

    For a Conv2d the same holds per output pixel with ``dW`` unfolded to
    ``(O, C kh kw)`` and every pixel of the patch projected channel-wise; summed over a
    sample's patches, ``||dW * x||_F <= ||dW_mat||_2 ||unfold(x_res)||_F`` with ``x_res``
    the input with ``(I - M M^T)`` applied to every pixel's channel vector.  On the
    ``N_CL`` batches the memory was built from, ``sum ||(I - M M^T) x||^2`` is at most
    ``(1 - eps_CL)`` of ``sum ||x||^2`` (Eq. 5), and each pixel enters at most
    ``kh kw`` patches, which bounds the total drift by
    ``||dW||_2 sqrt(kh kw (1 - eps_CL)) ||X_old||_F`` (``kh kw = 1`` for Linear).
    The bound is for the layer on its own: ``x`` is held fixed, i.e. the layer's input
    recorded before the new task (earlier layers move too, each within its own bound).

    Parameters
    ----------
    module
        The (uncompressed) layer; only its geometry is used.
    weight_delta
        ``W_after - W_before``.
    memory
        ``(n, m)`` orthonormal memory ``M`` of the layer's input-feature mode.
    x
        Inputs of the layer on earlier tasks' data, ``(B, C, H, W)`` or ``(B, ..., F)``.

    Returns
    -------
    drift, bound
        ``(B,)`` tensors: ``||dW x_b||`` (Frobenius over the sample's output) and the
        bound above.  ``drift <= bound`` up to round-off whenever ``dW``'s rows lie
        in the null space of ``M``.
    """
    dw = weight_delta.to(torch.float64)
    x = x.detach().to(torch.float64)
    m = memory.to(device=x.device, dtype=torch.float64)
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise ValueError("interference supports groups=1 convolutions only")
        drift_out = F.conv2d(x, dw, None, module.stride, module.padding, module.dilation)
        residual = x - torch.einsum("bchw,cm,dm->bdhw", x, m, m)
        patches = F.unfold(
            residual, module.kernel_size, module.dilation, module.padding, module.stride
        )
        dw_mat = dw.reshape(dw.shape[0], -1)
        residual_norm = patches.flatten(1).norm(dim=1)
    else:
        drift_out = x @ dw.T
        residual = x - (x @ m) @ m.T
        dw_mat = dw
        residual_norm = residual.flatten(1).norm(dim=1)
    drift = drift_out.flatten(1).norm(dim=1)
    return drift, torch.linalg.matrix_norm(dw_mat, ord=2) * residual_norm


# ----------------------------------------------------------------------------- training


class PlateauSchedule:
    """Learning-rate schedule of Table 7 (GPM's), with best-model restore.

    After every epoch call :meth:`step` with the validation loss.  An improvement
    stores a copy of the model and resets the patience; otherwise, after ``patience``
    epochs without improvement the learning rate is divided by ``factor``; training
    stops when it falls below ``min_lr``.  :meth:`restore` loads the best model.

    Parameters
    ----------
    optimizer
        Its parameter groups' ``lr`` is changed in place.
    lr, factor, patience, min_lr
        Table 7: e.g. Split CIFAR-100 ``0.01, 2, 6, 1e-5``.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        lr: float,
        factor: float,
        patience: int,
        min_lr: float,
    ) -> None:
        if not (lr > 0 and factor > 1 and patience >= 1 and min_lr >= 0):
            raise ValueError(
                f"need lr > 0, factor > 1, patience >= 1 and min_lr >= 0; got lr={lr}, "
                f"factor={factor}, patience={patience}, min_lr={min_lr}"
            )
        self.optimizer = optimizer
        self.lr = float(lr)
        self.factor = float(factor)
        self.patience = int(patience)
        self.min_lr = float(min_lr)
        self.best_loss = math.inf
        self.best_state: dict[str, torch.Tensor] | None = None
        self.wait = self.patience
        self._set_lr()

    def _set_lr(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr

    def step(self, val_loss: float, model: nn.Module) -> bool:
        """Record one epoch's validation loss; return True when training should stop."""
        if val_loss < self.best_loss:
            self.best_loss = val_loss
            self.best_state = copy.deepcopy(model.state_dict())
            self.wait = self.patience
            return False
        self.wait -= 1
        if self.wait > 0:
            return False
        self.lr /= self.factor
        if self.lr < self.min_lr:
            return True
        self.wait = self.patience
        self._set_lr()
        return False

    def restore(self, model: nn.Module) -> None:
        """Load the model state with the lowest validation loss (if any was recorded)."""
        if self.best_state is not None:
            model.load_state_dict(self.best_state)


@contextmanager
def _uncompressed(model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily put the original modules back (any batch size evaluates)."""
    swapped = [
        (name, m) for name, m in model.named_modules() if isinstance(m, (LanceConv2d, LanceLinear))
    ]
    restore(model)
    try:
        yield model
    finally:
        for name, m in swapped:
            model.set_submodule(name, m)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def evaluate(model: MultiHead, loader: Iterable[Any], task: int) -> tuple[float, float]:
    """Mean cross-entropy and accuracy (%) of head ``task`` over ``loader`` (eval mode)."""
    device = _device(model)
    flag = model.training
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    with torch.no_grad(), _uncompressed(model):
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            out = model(x, task)
            total_loss += F.cross_entropy(out, y, reduction="sum").item()
            correct += (out.argmax(1) == y).sum().item()
            count += len(y)
    model.train(flag)
    if count == 0:
        raise ValueError("evaluation loader yielded no samples")
    return total_loss / count, 100.0 * correct / count


class ContinualMethod(Protocol):
    """What :func:`run_continual` asks of a method (LANCE, GPM, fine-tuning)."""

    name: str

    def before_task(self, model: MultiHead, task: int, loader: DataLoader) -> None:
        """Prepare task ``task`` (e.g. calibrate and compress)."""

    def after_backward(self, model: MultiHead, task: int) -> None:
        """Adjust gradients after ``loss.backward()`` (e.g. GPM's projection)."""

    def after_task(self, model: MultiHead, task: int, loader: DataLoader) -> None:
        """Finish task ``task`` (e.g. restore the model and grow the memory)."""

    def report(self) -> dict[str, Any]:
        """Per-task ranks and memory (MB, with its definition) for the results file."""


class FineTune:
    """Plain sequential fine-tuning with full BP: the lower bound (no memory)."""

    name = "finetune"

    def before_task(self, model: MultiHead, task: int, loader: DataLoader) -> None:
        """Nothing to prepare."""

    def after_backward(self, model: MultiHead, task: int) -> None:
        """Gradients are used as they are."""

    def after_task(self, model: MultiHead, task: int, loader: DataLoader) -> None:
        """Nothing is stored."""

    def report(self) -> dict[str, Any]:
        """No memory."""
        return {
            "memory": {
                "mb": 0.0,
                "definition": "sequential fine-tuning stores nothing between tasks",
            }
        }


class LanceCL:
    """LANCE for continual learning (Sec. 2.3, Algorithm 1).

    Task 1 trains with full BP.  After every task Phase III grows the memory
    (:func:`update_memory`); every later task is calibrated in the memory's null space
    (:func:`null_space_calibration`), trained with the compressed layers, restored.

    Parameters
    ----------
    layers
        Layers to compress (:func:`backbone_layers`).
    eps, eps_cl
        Energy thresholds of Eq. (3) and Eq. (5) (Table 7: 0.9 and 0.95 / 0.985 / 0.97).
    num_batches, num_batches_cl
        ``N`` and ``N_CL`` (Table 7: 100 and 10).  ``N`` is capped at one pass over the
        task's training loader.
    modes
        Calibrated modes (:func:`lance_lib.calibration.calibrate`); ``"no_batch"`` by
        default, see :data:`BENCHMARKS`.
    memory_rule
        ``"eq5"`` or ``"eq3"`` for mode ``d`` of tasks ``t >= 2``.
    """

    name = "lance"

    def __init__(
        self,
        layers: Sequence[str],
        eps: float,
        eps_cl: float,
        num_batches: int = 100,
        num_batches_cl: int = 10,
        modes: Any = "no_batch",
        memory_rule: str = "eq5",
    ) -> None:
        self.layers = list(layers)
        self.eps = check_eps(eps)
        self.eps_cl = check_eps(eps_cl, "eps_cl")
        self.num_batches = int(num_batches)
        self.num_batches_cl = int(num_batches_cl)
        self.modes = modes
        self.memory_rule = memory_rule
        self.memory: dict[str, torch.Tensor] = {}
        self.subspaces: Subspaces | None = None
        self.tasks: list[dict[str, Any]] = []
        self.full_bp_elements = 0

    @staticmethod
    def _forward(task: int) -> Forward:
        def forward(model: nn.Module, batch: Any) -> Any:
            return model(batch[0].to(_device(model)), task)

        return forward

    def before_task(self, model: MultiHead, task: int, loader: DataLoader) -> None:
        """Task 1: full BP.  Later tasks: null-space calibration, then compress."""
        record: dict[str, Any] = {"task": task}
        self.tasks.append(record)
        if task == 0:
            shapes = _input_shapes(model, self.layers, loader, self._forward(task))
            self.full_bp_elements = sum(math.prod(s) for s in shapes.values())
            record["full_bp"] = True
            return
        n = min(self.num_batches, len(loader))
        self.subspaces = null_space_calibration(
            model,
            loader,
            self.layers,
            self.memory,
            self.eps,
            n,
            self.modes,
            self._forward(task),
            self.memory_rule,
        )
        modules = resolve_layers(model, self.layers)
        frozen = [
            name
            for name, sub in self.subspaces.items()
            if sub.ranks[feature_mode(modules[name], len(sub.input_shape))] == 0
        ]
        compress(model, self.subspaces)
        record.update(
            full_bp=False,
            calibration_batches=n,
            ranks={name: list(s.ranks) for name, s in self.subspaces.items()},
            frozen_layers=frozen,
            activation_elements=sum(subspace_elements(s)[1] for s in self.subspaces.values()),
        )

    def after_backward(self, model: MultiHead, task: int) -> None:
        """LANCE changes the gradients inside its layers; nothing to do here."""

    def after_task(self, model: MultiHead, task: int, loader: DataLoader) -> None:
        """Restore the original layers and grow the memory (Phase III)."""
        restore(model)
        update = update_memory(
            model,
            loader,
            self.layers,
            self.memory,
            self.eps_cl,
            min(self.num_batches_cl, len(loader)),
            self._forward(task),
        )
        self.memory = update.memory
        self.tasks[-1].update(
            memory_added=update.added,
            memory_rank={k: int(v.shape[1]) for k, v in update.memory.items()},
            saturated_layers=update.saturated,
        )

    def report(self) -> dict[str, Any]:
        """Ranks per task and memory: the M matrices plus the largest activation cores."""
        memory_elements = sum(m.numel() for m in self.memory.values())
        cores = [r["activation_elements"] for r in self.tasks if not r.get("full_bp")]
        core_elements = max(cores, default=0)
        mb = BYTES_PER_ELEMENT / MIB
        return {
            "tasks": self.tasks,
            "memory": {
                "mb": (memory_elements + core_elements) * mb,
                "definition": (
                    "LANCE: sum over compressed layers of the final memory M's elements "
                    "(n_d x m) plus the activation cores kept for backward while training "
                    "(Appendix C: prod_i r_i + sum_i n_i r_i per layer, summed over layers; "
                    "the largest over tasks 2..T), 4 bytes per element, MB = 2**20 bytes"
                ),
                "memory_matrices_mb": memory_elements * mb,
                "activation_cores_mb": core_elements * mb,
                "first_task_full_bp_activation_mb": self.full_bp_elements * mb,
                "memory_shapes": {k: list(v.shape) for k, v in self.memory.items()},
            },
        }


def _input_shapes(
    model: nn.Module, layers: Sequence[str], loader: Iterable[Any], forward: Forward
) -> dict[str, tuple[int, ...]]:
    """Input shape of each layer on the first batch of ``loader``."""
    shapes: dict[str, tuple[int, ...]] = {}

    def hook(name: str) -> Callable[..., None]:
        def record(_m: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            shapes.setdefault(name, tuple(inputs[0].shape))

        return record

    handles = [
        m.register_forward_pre_hook(hook(name)) for name, m in resolve_layers(model, layers).items()
    ]
    flag = model.training
    try:
        model.eval()
        with torch.no_grad():
            forward(model, next(iter(loader)))
    finally:
        for h in handles:
            h.remove()
        model.train(flag)
    return shapes


def _freeze_after_first_task(model: MultiHead) -> None:
    """BatchNorm parameters and biases of the backbone learn on task 1 only (GPM)."""
    for p in model.backbone.parameters():
        if p.ndim == 1:
            p.requires_grad_(False)


def _train_task(
    model: MultiHead,
    task: int,
    train_loader: DataLoader,
    val_loader: DataLoader,
    method: ContinualMethod,
    cfg: BenchmarkSpec,
    progress: bool,
) -> dict[str, Any]:
    device = _device(model)
    params = [p for p in model.backbone.parameters() if p.requires_grad]
    params += list(model.heads[task].parameters())
    optimizer = torch.optim.SGD(params, lr=cfg.lr)
    schedule = PlateauSchedule(optimizer, cfg.lr, cfg.lr_factor, cfg.patience, cfg.min_lr)
    epochs_run = 0
    bar = tqdm(
        range(cfg.epochs), desc=f"{method.name} task {task + 1}", leave=False, disable=not progress
    )
    for _ in bar:
        model.train()
        for x, y in train_loader:
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x, task), y).backward()
            method.after_backward(model, task)
            optimizer.step()
        epochs_run += 1
        val_loss, val_acc = evaluate(model, val_loader, task)
        bar.set_postfix(
            val_loss=f"{val_loss:.3f}", val_acc=f"{val_acc:.1f}", lr=f"{schedule.lr:.1e}"
        )
        if schedule.step(val_loss, model):
            break
    schedule.restore(model)
    return {"epochs": epochs_run, "best_val_loss": schedule.best_loss, "final_lr": schedule.lr}


@dataclass
class ContinualTask:
    """One task: its name and its train / validation / test sets (labels from 0)."""

    name: str
    train: Dataset
    val: Dataset
    test: Dataset


def _mixed_order(dataset: Dataset, seed: int) -> Dataset:
    """``dataset`` in one fixed random order, so that evaluation batches mix classes."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    return torch.utils.data.Subset(dataset, order.tolist())


def _loaders(
    task: ContinualTask, cfg: BenchmarkSpec, seed: int, drop_last: bool
) -> tuple[DataLoader, DataLoader, DataLoader]:
    """Training loader (reshuffled every epoch) and fixed-order validation / test loaders.

    The continual-learning networks normalise with batch statistics
    (``track_running_stats=False``, as GPM's), so an evaluation batch holding a single
    class would be normalised with that class's own mean and lose what tells the
    classes apart.  Validation and test sets are therefore put in one fixed random
    order (seeded), the same batches at every evaluation, as the mixed order of the
    original CIFAR test files gives.
    """
    train = make_loader(task.train, cfg.batch_size, train=True, seed=seed, drop_last=drop_last)
    val = make_loader(_mixed_order(task.val, seed), cfg.batch_size, train=False)
    test = make_loader(_mixed_order(task.test, seed), cfg.batch_size, train=False)
    return train, val, test


def run_continual(
    model: MultiHead,
    tasks: Sequence[ContinualTask],
    method: ContinualMethod,
    cfg: BenchmarkSpec,
    *,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``tasks`` one after another and fill the accuracy matrix.

    Task-incremental protocol (Appendix A.2): one head per task; SGD with the
    :class:`PlateauSchedule` of Table 7 on the held-out validation loss, best model
    restored at the end of each task; BatchNorm parameters and backbone biases learn
    on task 1 only.  After task ``j`` the test accuracy of every task ``i <= j`` fills
    ``A[j, i]``.

    Returns
    -------
    dict
        ``acc_matrix`` (``T x T``, zeros above the diagonal), ``ACC``, ``BWT``,
        ``training`` (epochs and final lr per task) and the method's :meth:`report`.
    """
    if len(tasks) == 0:
        raise ValueError("no tasks to train")
    if len(tasks) > model.num_tasks:
        raise ValueError(f"{len(tasks)} tasks but the model has {model.num_tasks} heads")
    drop_last = isinstance(method, LanceCL) and _calibrates_batch(method.modes)
    loaders = [_loaders(t, cfg, seed + i, drop_last) for i, t in enumerate(tasks)]
    num = len(tasks)
    acc = [[0.0] * num for _ in range(num)]
    training = []
    for j, (train_loader, val_loader, _) in enumerate(loaders):
        if j == 1:
            _freeze_after_first_task(model)
        method.before_task(model, j, train_loader)
        training.append(_train_task(model, j, train_loader, val_loader, method, cfg, progress))
        method.after_task(model, j, train_loader)
        for i in range(j + 1):
            acc[j][i] = evaluate(model, loaders[i][2], i)[1]
    return {
        "acc_matrix": acc,
        "ACC": average_accuracy(acc),
        "BWT": backward_transfer(acc),
        "training": training,
        **method.report(),
    }


class _TaskLabelled(Dataset):
    def __init__(self, dataset: Dataset, task: int) -> None:
        self.dataset, self.task = dataset, task

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, int, int]:
        x, y = self.dataset[index]
        return x, y, self.task


def train_multitask(
    model: MultiHead,
    tasks: Sequence[ContinualTask],
    cfg: BenchmarkSpec,
    *,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Joint training on all tasks at once (the upper bound), one head per task.

    Each mixed batch routes every sample through its task's head; the schedule follows
    the summed validation loss.  The result's ``acc_matrix`` is the single row
    ``[A[T, i]]`` (there is no sequence), ``BWT`` is ``None``.
    """
    device = _device(model)
    joint = torch.utils.data.ConcatDataset([_TaskLabelled(t.train, i) for i, t in enumerate(tasks)])
    loader = make_loader(joint, cfg.batch_size, train=True, seed=seed, drop_last=False)
    vals = [
        make_loader(_mixed_order(t.val, seed + i), cfg.batch_size, train=False)
        for i, t in enumerate(tasks)
    ]
    tests = [
        make_loader(_mixed_order(t.test, seed + i), cfg.batch_size, train=False)
        for i, t in enumerate(tasks)
    ]
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    schedule = PlateauSchedule(optimizer, cfg.lr, cfg.lr_factor, cfg.patience, cfg.min_lr)
    epochs_run = 0
    for _ in tqdm(range(cfg.epochs), desc="multitask", leave=False, disable=not progress):
        model.train()
        for x, y, t in loader:
            x, y, t = x.to(device), y.to(device), t.to(device)
            optimizer.zero_grad(set_to_none=True)
            feats = model.features(x)
            loss = sum(
                F.cross_entropy(model.heads[k](feats[t == k]), y[t == k], reduction="sum")
                for k in t.unique().tolist()
            ) / len(y)
            loss.backward()
            optimizer.step()
        epochs_run += 1
        val_loss = sum(evaluate(model, v, i)[0] for i, v in enumerate(vals))
        if schedule.step(val_loss, model):
            break
    schedule.restore(model)
    row = [evaluate(model, loader_i, i)[1] for i, loader_i in enumerate(tests)]
    return {
        "acc_matrix": [row],
        "ACC": sum(row) / len(row),
        "BWT": None,
        "training": [
            {"epochs": epochs_run, "best_val_loss": schedule.best_loss, "final_lr": schedule.lr}
        ],
        "memory": {"mb": 0.0, "definition": "joint training stores no memory (it sees all data)"},
    }


# --------------------------------------------------------------------------- benchmarks


@dataclass(frozen=True)
class BenchmarkSpec:
    """Settings of one continual-learning benchmark (Table 7 of LANCE).

    Attributes
    ----------
    datasets
        One dataset split into ``num_tasks`` tasks of ``classes_per_task`` classes, or
        several datasets, one task each (5-Datasets).
    model, first_stride, resolution
        ``"alexnet_cl"`` or ``"reduced_resnet18_cl"``, its stem stride, the input side.
    lr, batch_size, min_lr, lr_factor, patience, epochs
        Table 7 (``lr_factor`` divides the rate: Table 7's decay 1/2 is factor 2).
    eps, eps_cl, num_batches, num_batches_cl
        ``eps``, ``eps_CL``, ``N``, ``N_CL`` of Table 7.
    modes
        LANCE's calibrated modes: ``"no_batch"`` (default) or ``"all"`` (Eq. 1 as
        written; training then drops the last incomplete batch).
    memory_rule
        Rank rule of mode ``d`` for tasks ``t >= 2`` (:func:`null_space_calibration`).
    gpm_threshold, gpm_threshold_step
        GPM's energy threshold for task ``t`` (0-based): ``base + t * step``.
    val_fraction
        Share of each training set held out for validation (Tables 5-6: 5%).

    Notes
    -----
    Why ``modes="no_batch"`` by default: a calibrated batch factor ``(B, r_B)`` fixes
    the batch size, so the last incomplete batch of every epoch would have to be
    dropped, and it mixes the samples of randomly drawn batches.  It saves at most
    ``r_B / B`` of the core, while for the 1024- and 2048-wide FC layers the factor term
    ``n_d r_d`` of Appendix C dominates the count anyway.  ``modes="all"`` (Eq. 1 as
    written) is supported: training loaders then drop the last incomplete batch (a
    different one each epoch, reshuffled) and evaluation runs on the uncompressed
    layers.

    The embedded ``cifar10_mini`` benchmark (5 tasks of 2 classes, 950 training images
    each) keeps Split CIFAR-100's Table 7 settings except three, so that it runs
    offline on a CPU in minutes and its tasks are learned: 10 epochs per task at
    ``lr=0.05`` (Table 7's 0.01 with a plateau schedule over 200 epochs leaves these
    tasks barely learned in 5-10 epochs), and ``N_CL = 2`` batches (128 samples, about
    GPM's 125 samples per task; Table 7's 10 batches would be two thirds of a task's
    training set, and every extra sample adds directions to the 1024- and 2048-wide FC
    memories).
    """

    name: str
    label: str
    datasets: tuple[str, ...]
    num_tasks: int
    classes_per_task: int
    model: str
    first_stride: int = 1
    resolution: int = 32
    lr: float = 0.01
    batch_size: int = 64
    min_lr: float = 1e-5
    lr_factor: float = 2.0
    patience: int = 6
    epochs: int = 200
    eps: float = 0.9
    eps_cl: float = 0.95
    num_batches: int = 100
    num_batches_cl: int = 10
    modes: str = "no_batch"
    memory_rule: str = "eq5"
    gpm_threshold: float = 0.97
    gpm_threshold_step: float = 0.003
    gpm_samples: int = 125
    val_fraction: float = 0.05


def _calibrates_batch(modes: Any) -> bool:
    if modes in (None, "all"):
        return True
    return isinstance(modes, Sequence) and not isinstance(modes, str) and 0 in modes


BENCHMARKS: dict[str, BenchmarkSpec] = {
    spec.name: spec
    for spec in [
        BenchmarkSpec(
            name="split_cifar100",
            label="Split CIFAR-100 (10 x 10, AlexNet)",
            datasets=("cifar100",),
            num_tasks=10,
            classes_per_task=10,
            model="alexnet_cl",
        ),
        BenchmarkSpec(
            name="split_miniimagenet",
            label="Split miniImageNet (20 x 5, reduced ResNet18)",
            datasets=("miniimagenet",),
            num_tasks=20,
            classes_per_task=5,
            model="reduced_resnet18_cl",
            first_stride=2,
            resolution=84,
            lr=0.1,
            epochs=100,
            eps_cl=0.985,
            gpm_threshold=0.985,
            gpm_threshold_step=0.0003,
        ),
        BenchmarkSpec(
            name="five_datasets",
            label="5-Datasets (reduced ResNet18)",
            datasets=("cifar10", "mnist", "svhn", "fashionmnist", "notmnist"),
            num_tasks=5,
            classes_per_task=10,
            model="reduced_resnet18_cl",
            lr=0.1,
            min_lr=1e-3,
            lr_factor=3.0,
            patience=5,
            epochs=100,
            eps_cl=0.97,
            gpm_threshold=0.965,
            gpm_threshold_step=0.0,
        ),
        BenchmarkSpec(
            name="cifar10_mini",
            label="Embedded CIFAR-10 subset (5 x 2, AlexNet)",
            datasets=("cifar10_mini",),
            num_tasks=5,
            classes_per_task=2,
            model="alexnet_cl",
            epochs=10,
            lr=0.05,
            num_batches_cl=2,
        ),
    ]
}


def _build_model(spec: BenchmarkSpec) -> MultiHead:
    if spec.model == "alexnet_cl":
        return alexnet_cl(spec.num_tasks, spec.classes_per_task, input_size=spec.resolution)
    if spec.model == "reduced_resnet18_cl":
        return reduced_resnet18_cl(
            spec.num_tasks,
            spec.classes_per_task,
            first_stride=spec.first_stride,
            input_size=spec.resolution,
        )
    raise ValueError(f"unknown continual-learning model {spec.model!r}")


def load_benchmark(
    spec: BenchmarkSpec, *, root: str | os.PathLike | None = None, seed: int = 0
) -> tuple[list[ContinualTask], dict[str, str]]:
    """Build the tasks of a benchmark and say which datasets were found.

    Returns
    -------
    tasks, availability
        ``availability`` maps each dataset to ``"found"`` or ``"missing: <reason>"``.

    Raises
    ------
    DatasetNotFoundError
        A split benchmark's dataset is missing (its protocol cannot run on part of it),
        or none of a multi-dataset benchmark's datasets is present.

    Notes
    -----
    No augmentation (as GPM); validation is a stratified ``val_fraction`` of each
    training set (:func:`lance_lib.data.train_val_split`).
    """
    kw = {"root": root, "resolution": spec.resolution, "augment": False}
    availability: dict[str, str] = {}
    tasks: list[ContinualTask] = []
    if len(spec.datasets) == 1:
        name = spec.datasets[0]
        train = get_dataset(name, "train", **kw)
        test = get_dataset(name, "test", **kw)
        availability[name] = "found"
        pairs = zip(
            task_splits(train, spec.classes_per_task, spec.num_tasks),
            task_splits(test, spec.classes_per_task, spec.num_tasks),
            strict=True,
        )
        for t, (tr, te) in enumerate(pairs):
            fit, val = train_val_split(tr, spec.val_fraction, seed=seed + t)
            tasks.append(ContinualTask(f"{name}[{', '.join(tr.classes)}]", fit, val, te))
        return tasks, availability
    for t, name in enumerate(spec.datasets):
        try:
            train = get_dataset(name, "train", **kw)
            test = get_dataset(name, "test", **kw)
        except DatasetNotFoundError as err:
            availability[name] = "missing: " + str(err).splitlines()[0]
            continue
        availability[name] = "found"
        fit, val = train_val_split(train, spec.val_fraction, seed=seed + t)
        tasks.append(ContinualTask(name, fit, val, test))
    if not tasks:
        raise DatasetNotFoundError(
            f"{spec.label}: none of {spec.datasets} was found: {availability}"
        )
    return tasks, availability


def _make_method(name: str, spec: BenchmarkSpec, model: MultiHead, seed: int) -> ContinualMethod:
    layers = backbone_layers(model)
    if name == "lance":
        return LanceCL(
            layers,
            spec.eps,
            spec.eps_cl,
            spec.num_batches,
            spec.num_batches_cl,
            spec.modes,
            spec.memory_rule,
        )
    if name == "gpm":
        return GPM(layers, spec.gpm_threshold, spec.gpm_threshold_step, spec.gpm_samples, seed)
    if name == "finetune":
        return FineTune()
    raise ValueError(f"unknown method {name!r}; known: {METHODS}")


def run_benchmark(
    name: str,
    method: str,
    *,
    epochs: int | None = None,
    seed: int = 0,
    results_dir: str | os.PathLike = "results/continual",
    progress: bool = True,
    root: str | os.PathLike | None = None,
    device: str | None = None,
    force: bool = False,
    **overrides: Any,
) -> dict[str, Any]:
    """Run one method on one benchmark with Table 7's settings; cache the result.

    Parameters
    ----------
    name
        A key of :data:`BENCHMARKS`: ``"split_cifar100"``, ``"split_miniimagenet"``,
        ``"five_datasets"`` or the embedded offline ``"cifar10_mini"``.
    method
        ``"lance"``, ``"gpm"``, ``"finetune"`` (lower bound) or ``"multitask"``
        (upper bound).
    epochs
        Maximum epochs per task (default Table 7's).
    seed
        Fixes model initialisation, dropout, data order, validation split and
        calibration batches.
    results_dir
        Folder of the results file ``cl-<name>-<method>-<settings key>.json``; an
        existing file with the same settings is returned without training.
    progress
        Show tqdm bars.
    root
        Data root (:func:`lance_lib.data.data_root`).
    device
        Torch device; default CUDA when available, else CPU.
    force
        Recompute even when the results file exists.
    **overrides
        Any :class:`BenchmarkSpec` field (e.g. ``num_tasks=2`` for a smoke run,
        ``modes="all"``, ``lr=0.05``).

    Returns
    -------
    dict
        ``acc_matrix``, ``ACC``, ``BWT`` (percentage points), ``memory`` (MB with its
        ``definition``), per-task ranks (LANCE, GPM), ``settings``, ``datasets``
        (availability notes) and ``label``.
    """
    if name not in BENCHMARKS:
        raise KeyError(f"unknown benchmark {name!r}; known: {sorted(BENCHMARKS)}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {METHODS}")
    unknown = set(overrides) - set(BenchmarkSpec.__dataclass_fields__)
    if unknown:
        fields = list(BenchmarkSpec.__dataclass_fields__)
        raise TypeError(f"unknown overrides {sorted(unknown)}; BenchmarkSpec fields: {fields}")
    spec = replace(BENCHMARKS[name], **overrides)
    if epochs is not None:
        spec = replace(spec, epochs=int(epochs))
    tasks, availability = load_benchmark(spec, root=root, seed=seed)
    tasks = tasks[: spec.num_tasks]
    missing = [d for d, s in availability.items() if s != "found"]
    label = (
        spec.label
        if not missing
        else (
            f"{spec.label} - run on {len(tasks)} of {len(spec.datasets)} datasets "
            f"({', '.join(missing)} missing)"
        )
    )
    settings = {
        **asdict(spec),
        "method": method,
        "seed": seed,
        "tasks": [t.name for t in tasks],
        "task_sizes": [[len(t.train), len(t.val), len(t.test)] for t in tasks],
    }
    path = result_path(results_dir, f"cl-{name}-{method}", settings)

    def compute() -> dict[str, Any]:
        torch.manual_seed(seed)
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model = _build_model(replace(spec, num_tasks=len(tasks))).to(dev)
        if method == "multitask":
            out = train_multitask(model, tasks, spec, seed=seed, progress=progress)
        else:
            out = run_continual(
                model,
                tasks,
                _make_method(method, spec, model, seed),
                spec,
                seed=seed,
                progress=progress,
            )
        if missing:
            warnings.warn(f"{label}: results cover the datasets found only", stacklevel=3)
        return {**out, "label": label, "datasets": availability, "settings": settings}

    return cached_json(path, compute, force=force)
