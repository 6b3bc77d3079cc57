"""Phase III of LANCE: the activation memory, null-space calibration and its guarantee.

After task ``t`` every compressed layer keeps a memory ``M^t`` of important directions
of its input-feature mode ``d`` (channels for Conv2d, the last mode for Linear); the
next task is calibrated in the null space of ``M^t`` (Sec. 2.3 and Algorithm 1 of
LANCE), so that its weight updates, whose input-feature rows lie in the span of the
calibrated mode-``d`` factor, are orthogonal to the directions earlier tasks use.

* :func:`update_memory` - Phase III: mode-``d`` covariance from ``N_CL`` batches, its
  part outside ``M^{t-1}``, rank by Eq. (5), ``M^t = orth([M^{t-1}, U_hat])``;
* :func:`null_space_calibration` - Phase I constrained by the memory, under one of the
  :data:`NULL_SPACE_RULES`, with a :class:`SaturationWarning` for every frozen layer;
* :func:`frozen_layers` - the layers whose mode-``d`` rank is 0 (weights frozen);
* :func:`interference` - the per-sample bound on how far a layer's output on earlier
  tasks' inputs can move.

The two readings of the rank rule
---------------------------------
Sec. 2.3 picks the new task's mode-``d`` rank from the spectrum of ``B_hat``, the new
task's covariance with the memory's directions removed, with "an energy threshold
``eps`` similar to Equation (5)". Two readings are offered, by name:

``"residual"`` (the default)
    Eq. (3) on ``B_hat``'s spectrum: keep the leading null-space directions that hold
    ``eps`` of the new task's energy *outside* the memory. A layer keeps at least one
    direction while its null space holds any of the task's energy, so a layer is
    frozen only when its memory spans its whole input-feature space. This is what
    Phase III describes: the new task "learns from directions orthogonal to those
    already used", with factors "strictly in the null space" of ``M^t``.
``"eq5"``
    Eq. (5) as printed (GPM's criterion, with the discarded sum read as starting after
    the ``r`` kept directions): count the energy the memory already explains, so
    ``r = 0`` (the layer is frozen) whenever the memory explains ``eps`` of the new
    task's energy. With ``eps = 0.9 < eps_CL`` and tasks from one distribution this
    freezes most layers from task 2 on (issue 13: every conv of the embedded benchmark).

Saturation
----------
When ``M`` spans a layer's whole input-feature space (``m = n``), no rule has anything
left: the mode-``d`` factor is ``(n, 0)``, the layer's weight gradient is exactly zero
and the layer is frozen for that task (its input gradient is still exact, so earlier
layers and the head keep learning).

References
----------
Apolinario & Roy, "LANCE: Low Rank Activation Compression for Efficient On-Device
Continual Learning", arXiv:2509.21617, Sec. 2.3, Algorithm 1, Eq. (3), Eq. (5).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lance_lib.calibration import calibrate, collect_covariances, resolve_layers
from lance_lib.hosvd import leading_subspace
from lance_lib.modes import feature_mode
from lance_lib.subspaces import Subspaces
from lance_lib.validation import check_choice, check_int, check_real

__all__ = [
    "DEFAULT_NULL_SPACE_RULE",
    "NULL_SPACE_RULES",
    "MemoryUpdate",
    "NullSpaceRule",
    "SaturationWarning",
    "frozen_layers",
    "interference",
    "null_space_calibration",
    "update_memory",
]

#: ``forward(model, batch)`` runs one batch (e.g. ``lambda m, b: m(b[0], task)``).
BatchForward = Callable[[nn.Module, Any], Any]


class SaturationWarning(UserWarning):
    """A layer's mode-``d`` rank is 0 for a task: its weights are frozen for it."""


@dataclass(frozen=True)
class NullSpaceRule:
    """One reading of the mode-``d`` rank rule of the null-space calibration.

    Attributes
    ----------
    name
        The name a :class:`~lance_lib.continual.BenchmarkSpec` selects it by.
    calibration_rule
        The ``memory_rule`` :func:`lance_lib.calibration.calibrate` applies.
    label
        Short text for tables.
    description
        What it computes.
    """

    name: str
    calibration_rule: str
    label: str
    description: str


#: The named readings of the rank rule (see the module docstring).
NULL_SPACE_RULES: Mapping[str, NullSpaceRule] = {
    rule.name: rule
    for rule in (
        NullSpaceRule(
            "residual",
            "eq3",
            "residual energy (default)",
            "Eq. (3) on the spectrum of B_hat = (I - MM^T) B (I - MM^T): the leading "
            "null-space directions holding eps of the task's energy outside the memory; "
            "a layer is frozen only when its memory spans its whole input-feature space",
        ),
        NullSpaceRule(
            "eq5",
            "eq5",
            "Eq. (5), GPM-style",
            "Eq. (5) as printed (GPM's criterion): r = 0, and the layer frozen, when the "
            "memory already explains eps of the task's energy",
        ),
    )
}
DEFAULT_NULL_SPACE_RULE = "residual"


def feature_modes(model: nn.Module, layers: Sequence[str]) -> dict[str, list[int]]:
    """Per layer, the input-feature mode ``d`` as a one-element mode list for calibration.

    ``1`` (channels) for a Conv2d, ``-1`` (the last mode, whatever the input's rank)
    for a Linear layer.
    """
    modules = resolve_layers(model, layers)
    return {name: [1 if isinstance(m, nn.Conv2d) else -1] for name, m in modules.items()}


@dataclass(frozen=True)
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
    forward: BatchForward | None = None,
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
    Eq. (5) adding no direction (``r_d = 0``) is normal here: the memory already
    explains ``eps_CL`` of the task's energy, so it is kept as it is (GPM's "skip
    updating" case). The new directions are eigenvectors of the symmetric ``B_hat``
    re-orthogonalised against ``M`` (:func:`lance_lib.hosvd.leading_subspace`), so
    ``orth`` is a plain concatenation: ``M^{t-1}`` is kept column for column. Without a
    memory Eq. (5) reduces to Eq. (3). Because ``B_hat``'s discarded energy is exactly
    the energy of ``B_d^t`` outside ``M^t``, the memory explains at least ``eps_CL`` of
    the task's feature-mode energy on these batches.
    """
    eps_cl = check_real("eps_cl", eps_cl, low=0.0, high=1.0, low_open=True)
    num_batches = check_int("num_batches", num_batches, minimum=1)
    memory = dict(memory or {})
    covs, _ = collect_covariances(
        model, loader, layers, num_batches, feature_modes(model, layers), forward
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
        old = torch.zeros(cov.size, 0, dtype=torch.float64) if old is None else old.double()
        sub = leading_subspace(cov.cov, eps_cl, old, rule="eq5")
        new[name] = torch.cat([old, sub.basis], dim=1)
        added[name] = sub.rank
        if new[name].shape[1] == new[name].shape[0]:
            saturated.append(name)
    return MemoryUpdate(new, added, saturated)


def frozen_layers(model: nn.Module, subspaces: Subspaces) -> list[str]:
    """The calibrated layers whose input-feature (mode-``d``) rank is 0.

    Such a layer's weight gradient is exactly zero while it is compressed: its weights
    are frozen for the task.
    """
    modules = resolve_layers(model, list(subspaces))
    return [
        name
        for name, sub in subspaces.items()
        if sub.ranks[feature_mode(modules[name], len(sub.input_shape))] == 0
    ]


def null_space_calibration(
    model: nn.Module,
    loader: Iterable[Any],
    layers: Sequence[str],
    memory: Mapping[str, torch.Tensor],
    eps: float,
    num_batches: int = 100,
    modes: Any = "no_batch",
    forward: BatchForward | None = None,
    memory_rule: str = DEFAULT_NULL_SPACE_RULE,
) -> Subspaces:
    """Phase I for task ``t + 1`` with mode ``d`` calibrated in the null space of ``M^t``.

    Algorithm 1 lines 3-13: every mode but ``d`` follows Eq. (2)-(3); mode ``d`` keeps
    leading eigenvectors of ``B_hat_d = (I - M M^T) B_d (I - M M^T)``, as many as the
    rule ``memory_rule`` asks (:data:`NULL_SPACE_RULES`: ``"residual"``, Eq. (3) on
    ``B_hat_d``'s spectrum, by default; ``"eq5"``, GPM's criterion, as an option).

    Parameters
    ----------
    model, loader, layers, eps, num_batches, modes, forward
        As in :func:`lance_lib.calibration.calibrate`.
    memory
        ``M^t`` per layer.
    memory_rule
        A key of :data:`NULL_SPACE_RULES`.

    Returns
    -------
    Subspaces
        With ``settings["null_space_rule"]`` naming the rule.

    Warns
    -----
    SaturationWarning
        For every layer whose mode-``d`` rank is 0: either ``M`` spans the whole
        input-feature space (saturated) or, under ``"eq5"``, ``M`` already explains
        ``eps`` of the energy. That layer's weights are frozen for the task.
    """
    rule = NULL_SPACE_RULES[check_choice("memory_rule", memory_rule, NULL_SPACE_RULES)]
    subspaces = calibrate(
        model,
        loader,
        layers,
        eps,
        num_batches,
        modes,
        memory=memory,
        memory_rule=rule.calibration_rule,
        forward=forward,
    )
    subspaces.settings["null_space_rule"] = rule.name
    modules = resolve_layers(model, layers)
    for name in frozen_layers(model, subspaces):
        sub = subspaces[name]
        n = sub.input_shape[feature_mode(modules[name], len(sub.input_shape))]
        m = memory.get(name)
        kept = 0 if m is None else m.shape[1]
        why = (
            f"its memory already spans all {n} input features (saturated)"
            if kept >= n
            else f"the {rule.name!r} rule keeps no new direction (the memory's {kept} of {n} "
            f"directions already explain eps={subspaces.settings['eps']} of the energy)"
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
    its input-feature rows in ``span(U_d)``, ``U_d`` orthogonal to ``M`` (every LANCE
    weight gradient is that of the projected input, whose mode-``d`` fibres lie in
    ``span(U_d)``), hence ``dW x = dW (I - M M^T) x``. For a Linear layer and an input
    sample ``x``

    ``||dW x|| <= ||dW||_2 ||(I - M M^T) x||``.

    For a Conv2d the same holds per output pixel with ``dW`` unfolded to
    ``(O, C kh kw)`` and every pixel of the patch projected channel-wise; summed over a
    sample's patches, ``||dW * x||_F <= ||dW_mat||_2 ||unfold(x_res)||_F`` with ``x_res``
    the input with ``(I - M M^T)`` applied to every pixel's channel vector. On the
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
        bound above. ``drift <= bound`` up to round-off whenever ``dW``'s rows lie
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
