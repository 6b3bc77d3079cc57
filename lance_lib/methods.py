"""One way to choose a training method: a name plus its options, one handle back.

Every method of the paper's comparisons runs through the same training code and the
same accounting, so that each difference in a table is the method's:

``bp``
    plain backpropagation (the layers are left as they are).
``lance``
    LANCE: one-shot HOSVD calibration (Phase I, Eq. 2-3) on ``calib_loader``, then
    layers that keep only the core of Eq. (1) (:mod:`lance_lib.layers`).
``hosvd``
    a fresh HOSVD of every activation at every step, ranks from ``eps`` on that step
    (:mod:`lance_lib.baselines.hosvd_step`).
``asi``
    one warm-started subspace-iteration step per mode and step, ranks fixed at the
    first step at ``eps`` (:mod:`lance_lib.baselines.asi`).
``loract``
    an online sampled-row sketch of the flattened input at rank ``rank_ratio * n``
    (:mod:`lance_lib.baselines.loract`).
``checkpoint``
    recomputation of the trainable region (:mod:`lance_lib.baselines.checkpointing`).

:func:`apply_method` swaps the chosen layers in place (or, for ``checkpoint``, wraps
the model) and returns a :class:`MethodHandle`: the module to train (``.model``), the
method's settings, its analytic activation memory (Appendix C), a context manager that
runs plain BP on the same weights (for reference gradients and evaluation) and
``restore()``.  :func:`measure_method` times, counts and measures one training step of
any handle the same way; :func:`angle_to_bp` is the gradient-angle probe of Fig. 2.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .accounting import (
    gradient_angle,
    measure_flops,
    measure_saved_tensors,
    published_mb,
    subspace_elements,
)
from .baselines import (
    AsiConv2d,
    AsiLinear,
    Checkpointed,
    HosvdStepConv2d,
    HosvdStepLinear,
    LoRActConv2d,
    LoRActLinear,
    checkpoint_region,
)
from .calibration import Modes, Subspaces, calibrate, resolve_layers
from .hosvd import check_eps
from .layers import compress

__all__ = ["METHODS", "MethodHandle", "angle_to_bp", "apply_method", "measure_method"]

METHODS = ("bp", "lance", "hosvd", "asi", "loract", "checkpoint")

Batch = Any
Forward = Callable[[nn.Module, Batch], torch.Tensor]


def _default_forward(model: nn.Module, batch: Batch) -> torch.Tensor:
    return model(batch[0])


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


@dataclass
class MethodHandle:
    """A method applied to a model; see :func:`apply_method`.

    Attributes
    ----------
    name
        The method name (a key of :data:`METHODS`).
    model
        The module to train and evaluate: the model itself, or for ``checkpoint`` a
        :class:`lance_lib.baselines.Checkpointed` wrapper sharing its modules.
    root
        The model passed to :func:`apply_method` (layer names refer to it).
    layers
        Names of the trainable layers whose activations the method treats.
    settings
        The method and every option that affects it (JSON-serialisable).
    subspaces
        LANCE's calibrated subspaces (``None`` for the other methods).
    """

    name: str
    model: nn.Module
    root: nn.Module
    layers: list[str]
    settings: dict[str, Any]
    subspaces: Subspaces | None = None
    originals: dict[str, nn.Module] = field(default_factory=dict)
    replacements: dict[str, nn.Module] = field(default_factory=dict)
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    _hooks: list[Any] = field(default_factory=list)

    def _track_shapes(self) -> None:
        for name in self.layers:
            module = self.root.get_submodule(name)

            def hook(_m: nn.Module, inputs: tuple, name: str = name) -> None:
                self.input_shapes[name] = tuple(inputs[0].shape)

            self._hooks.append(module.register_forward_pre_hook(hook))

    def _swap(self, use_originals: bool) -> None:
        chosen = self.originals if use_originals else self.replacements
        for name, module in chosen.items():
            _set_submodule(self.root, name, module)
        if isinstance(self.model, Checkpointed):
            self.model.enabled = not use_originals

    @contextmanager
    def bypassed(self) -> Iterator[nn.Module]:
        """Run plain BP on the same weights inside the block (method state is kept).

        Yields the module to call (``self.model``).  Used for BP reference gradients
        and for evaluation, where a compressing layer would only cost time.
        """
        self._swap(use_originals=True)
        try:
            yield self.model
        finally:
            self._swap(use_originals=False)

    def restore(self) -> nn.Module:
        """Put the original layers back, remove hooks; returns the original model."""
        self._swap(use_originals=True)
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self.replacements.clear()
        return self.root

    def module_names(self) -> dict[str, str]:
        """Layer name in ``root`` -> name of the same module inside ``self.model``."""
        where = {id(m): n for n, m in self.model.named_modules()}
        return {name: where[id(self.root.get_submodule(name))] for name in self.layers}

    def layer_elements(self) -> dict[str, tuple[int, int]]:
        """Per layer, Appendix C elements ``(BP, method)`` kept for the weight gradient.

        BP keeps the whole input ``prod_i n_i``; LANCE and the per-step HOSVD / ASI
        keep the core and the factors of the compressed modes,
        ``prod_i r_i + sum_i n_i r_i``; LoRAct keeps ``L k + n k``.  ``checkpoint``
        counts as BP: with one segment the region's activations are all rebuilt at
        once in the backward pass, so its peak equals BP's.  Shapes and per-step ranks
        are those of the last training forward pass (one must have run).
        """
        missing = [n for n in self.layers if n not in self.input_shapes]
        if missing:
            raise RuntimeError(f"run a forward pass first; no input seen for layers {missing}")
        out = {}
        for name in self.layers:
            full = math.prod(self.input_shapes[name])
            if self.name in ("bp", "checkpoint"):
                kept = full
            elif self.name == "lance":
                kept = subspace_elements(self.subspaces[name])[1]
            else:
                kept = self.replacements[name].stored_elements()
            out[name] = (full, kept)
        return out

    def analytic_mb(self) -> float:
        """Appendix C activation memory of the treated layers, MB (4 bytes per element)."""
        return published_mb([kept for _, kept in self.layer_elements().values()])

    def factor_bytes(self) -> int:
        """Bytes of factors held as buffers between steps (LANCE, ASI); 0 otherwise."""
        return sum(
            b.untyped_storage().nbytes() for m in self.replacements.values() for b in m.buffers()
        )

    def ranks(self) -> dict[str, Any]:
        """Per layer: mode ranks (LANCE, HOSVD, ASI), sketch rank ``k`` (LoRAct) or None."""
        out: dict[str, Any] = {}
        for name in self.layers:
            if self.name == "lance":
                out[name] = list(self.subspaces[name].ranks)
            elif self.name in ("hosvd", "asi"):
                out[name] = self.replacements[name].ranks
            elif self.name == "loract":
                out[name] = self.replacements[name].rank
            else:
                out[name] = None
        return out


def method_settings(
    method: str,
    *,
    eps: float = 0.7,
    num_batches: int = 100,
    modes: Modes = None,
    rank_ratio: float = 0.25,
    solver: str = "svd",
    seed: int = 0,
    region: str = "auto",
) -> dict[str, Any]:
    """The settings that determine ``method`` (those it ignores are left out)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    if modes is not None and not isinstance(modes, (str, Sequence)):
        raise TypeError(f"modes must be None, 'all', 'no_batch' or indices; got {modes!r}")
    modes_js = modes if modes is None or isinstance(modes, str) else list(modes)
    per_method: dict[str, dict[str, Any]] = {
        "bp": {},
        "lance": {"eps": check_eps(eps), "num_batches": int(num_batches), "modes": modes_js},
        "hosvd": {"eps": check_eps(eps), "modes": modes_js, "solver": solver},
        "asi": {"eps": check_eps(eps), "modes": modes_js, "rank_rule": "first_step_eps"},
        "loract": {"rank_ratio": float(rank_ratio), "seed": int(seed), "flatten": "BHW_x_C"},
        "checkpoint": {"region": region, "use_reentrant": False},
    }
    return {"method": method, **per_method[method]}


def apply_method(
    model: nn.Module,
    method: str,
    layers: Sequence[str],
    *,
    calib_loader: Iterable[Any] | None = None,
    eps: float = 0.7,
    num_batches: int = 100,
    modes: Modes = None,
    rank_ratio: float = 0.25,
    solver: str = "svd",
    seed: int = 0,
    region: str = "auto",
    forward: Forward | None = None,
) -> MethodHandle:
    """Apply a training method to the given Conv2d / Linear layers of ``model``.

    Parameters
    ----------
    model
        The network (modified in place; :meth:`MethodHandle.restore` undoes it).
    method
        One of :data:`METHODS`: ``"bp"``, ``"lance"``, ``"hosvd"``, ``"asi"``,
        ``"loract"``, ``"checkpoint"``.
    layers
        Names of the trainable Conv2d / Linear modules (e.g. the last N convs).
    calib_loader
        ``lance`` only: calibration batches (Phase I); required for ``lance``.
    eps
        Energy threshold of Eq. (3) for ``lance``, ``hosvd`` and ``asi`` (Table 4: 0.7).
    num_batches
        ``lance``: number of calibration batches ``N`` (Table 4: 100).
    modes
        ``lance`` / ``hosvd`` / ``asi``: input modes to compress (default every mode,
        the batch mode included, as Eq. (1) is written); see
        :func:`lance_lib.calibration.calibrate`.
    rank_ratio
        ``loract``: sketch rank as a fraction of the feature size ``n``.
    solver
        ``hosvd``: ``"svd"`` of the unfolding (as the published baseline) or
        ``"eigh"`` of its Gram matrix.
    seed
        ``loract``: seed of the row sampling.
    region
        ``checkpoint``: ``"auto"`` splits the model at its first trainable layer
        (:func:`lance_lib.baselines.checkpoint_region`); ``"whole"`` checkpoints the
        whole model (when it is already the trainable tail).
    forward
        ``lance``: ``forward(model, batch)`` for calibration (e.g. a multi-head model).

    Returns
    -------
    MethodHandle
    """
    settings = method_settings(
        method,
        eps=eps,
        num_batches=num_batches,
        modes=modes,
        rank_ratio=rank_ratio,
        solver=solver,
        seed=seed,
        region=region,
    )
    layers = list(layers)
    targets = resolve_layers(model, layers)
    handle = MethodHandle(method, model, model, layers, settings)
    handle.originals = dict(targets)
    if method == "lance":
        if calib_loader is None:
            raise ValueError("method 'lance' needs calib_loader (Phase I calibration batches)")
        handle.subspaces = calibrate(
            model,
            calib_loader,
            layers,
            eps=eps,
            num_batches=num_batches,
            modes=modes,
            forward=forward,
        )
        compress(model, handle.subspaces)
        handle.replacements = {name: model.get_submodule(name) for name in layers}
    elif method in ("hosvd", "asi", "loract"):
        for name, module in targets.items():
            conv = isinstance(module, nn.Conv2d)
            if method == "hosvd":
                cls = HosvdStepConv2d if conv else HosvdStepLinear
                new = cls(module, name, eps=eps, modes=modes, solver=solver)
            elif method == "asi":
                cls = AsiConv2d if conv else AsiLinear
                new = cls(module, name, eps=eps, modes=modes)
            else:
                cls = LoRActConv2d if conv else LoRActLinear
                new = cls(module, name, rank_ratio=rank_ratio, seed=seed)
            _set_submodule(model, name, new)
            handle.replacements[name] = new
    elif method == "checkpoint":
        if region not in ("auto", "whole"):
            raise ValueError(f"region must be 'auto' or 'whole', got {region!r}")
        order = [n for n, _ in model.named_modules() if n in targets]
        handle.model = checkpoint_region(model, order[0] if region == "auto" else None)
    handle._track_shapes()
    return handle


# ------------------------------------------------------------------------- accounting


def _zero_grads(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = None


def _loss(handle: MethodHandle, batch: Batch, forward: Forward) -> torch.Tensor:
    return nn.functional.cross_entropy(forward(handle.model, batch), batch[1])


def measure_method(
    handle: MethodHandle,
    batch: Batch,
    *,
    repeats: int = 3,
    warmup: int = 1,
    forward: Forward | None = None,
) -> dict[str, Any]:
    """Time, FLOPs and activation memory of one training step of ``handle`` on ``batch``.

    Parameters
    ----------
    handle
        From :func:`apply_method`.
    batch
        ``(inputs, targets)``; the loss is cross-entropy of ``forward(model, batch)``.
    repeats, warmup
        Timed and untimed steps.
    forward
        ``forward(model, batch)`` -> logits; default ``model(batch[0])``.

    Returns
    -------
    dict
        ``forward_s``, ``backward_s``, ``step_s`` (lists over repeats) and their
        medians ``*_median``; ``flops_measured`` (``FlopCounterMode``: matmuls and
        convolutions, not decompositions); ``measured_layer_bytes`` (what the treated
        layers keep for backward, measured through saved-tensor hooks, plus factors
        held as buffers), ``measured_region_bytes`` (everything the model keeps),
        ``measured_factor_bytes``; ``analytic_mb`` and ``analytic_bp_mb``
        (Appendix C); ``ranks``.  For ``checkpoint``, ``measured_layer_bytes`` is the
        recomputation's (its peak, equal to BP's) and ``stored_between_passes_bytes``
        what is kept between the passes (the region's input).

    Notes
    -----
    Gradients are cleared before and after; weights are not changed (no optimiser
    step).  Per-step methods (HOSVD, ASI, LoRAct) advance their state (ASI's warm start,
    LoRAct's sampler) as in training.
    """
    forward = forward or _default_forward
    model = handle.model
    fwd_s: list[float] = []
    bwd_s: list[float] = []
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for i in range(warmup + repeats):
        _zero_grads(model)
        sync()
        t0 = time.perf_counter()
        loss = _loss(handle, batch, forward)
        sync()
        t1 = time.perf_counter()
        loss.backward()
        sync()
        t2 = time.perf_counter()
        if i >= warmup:
            fwd_s.append(t1 - t0)
            bwd_s.append(t2 - t1)
    del loss

    def step() -> None:
        _zero_grads(model)
        _loss(handle, batch, forward).backward()

    flops = measure_flops(step)
    _zero_grads(model)
    names = list(handle.module_names().values())
    report = measure_saved_tensors(model, lambda: _loss(handle, batch, forward))
    factor_bytes = handle.factor_bytes()
    out: dict[str, Any] = {
        "forward_s": fwd_s,
        "backward_s": bwd_s,
        "step_s": [f + b for f, b in zip(fwd_s, bwd_s, strict=True)],
        "flops_measured": flops,
        "measured_factor_bytes": factor_bytes,
        "measured_layer_bytes": report.bytes_of(names) + factor_bytes,
        "measured_region_bytes": report.activation_bytes + factor_bytes,
        "measured_by_kind": report.by_kind,
    }
    if handle.name == "checkpoint":
        out["stored_between_passes_bytes"] = model.stored_bytes + report.activation_bytes
        with handle.bypassed():
            peak = measure_saved_tensors(model, lambda: _loss(handle, batch, forward))
        out["measured_layer_bytes"] = peak.bytes_of(names)
        out["measured_region_bytes"] = peak.activation_bytes
    for key in ("forward_s", "backward_s", "step_s"):
        out[key + "_median"] = statistics.median(out[key])
    out["analytic_mb"] = handle.analytic_mb()
    out["analytic_bp_mb"] = published_mb([full for full, _ in handle.layer_elements().values()])
    out["ranks"] = handle.ranks()
    return out


def angle_to_bp(
    handle: MethodHandle,
    batch: Batch,
    params: Sequence[torch.Tensor],
    *,
    forward: Forward | None = None,
) -> float:
    """Angle in degrees between BP's and the method's gradients of ``params`` (Fig. 2).

    Both gradients are taken on the same ``batch`` and the same weights: BP inside
    :meth:`MethodHandle.bypassed`, then the method.  Gradients are cleared afterwards.
    """
    forward = forward or _default_forward
    _zero_grads(handle.model)
    with handle.bypassed():
        _loss(handle, batch, forward).backward()
    reference = [p.grad.detach().clone() for p in params]
    _zero_grads(handle.model)
    _loss(handle, batch, forward).backward()
    grads = [p.grad.detach().clone() for p in params]
    _zero_grads(handle.model)
    return gradient_angle(reference, grads)
