"""One way to choose a training method: a name plus its settings, one handle back.

Every method of the paper's comparisons runs through the same training code and the
same accounting, so that each difference in a table is the method's.  The methods are
registered where they are defined (:mod:`lance_lib.methods.registry`); their names and
display labels are in :data:`lance_lib.methods.METHOD_TABLE`.

:func:`apply_method` swaps the chosen layers in place (or larger units holding them,
such as transformer blocks, or wraps the model, as ``checkpoint`` does) and returns a
:class:`MethodHandle`: the module to train (``.model``), the method's frozen settings,
its analytic activation memory (Appendix C), a context manager that runs plain BP on
the same weights (for reference gradients and evaluation) and ``restore()``.
:func:`measure_method` times, counts and measures one training step of any handle the
same way (a :class:`MethodMeasurement`); :func:`angle_to_bp` is the gradient-angle
probe of Fig. 2.  Conv-layer methods and transformer-block methods share all of it:
the harness reads what each method says it did (:class:`~lance_lib.methods.registry.Applied`)
and never asks which method it holds.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..accounting import (
    SavedTensorReport,
    cuda_peak_bytes,
    gradient_angle,
    measure_flops,
    measure_saved_tensors,
    published_mb,
    synchronizer,
)
from ..calibration import resolve_layers
from ..layers import fast_project
from ..models.surgery import set_submodule
from .registry import Applied, MethodSettings, settings_from_options

__all__ = [
    "MethodHandle",
    "MethodMeasurement",
    "angle_to_bp",
    "apply_method",
    "measure_method",
    "measure_methods",
    "quartiles",
    "speed_floor",
    "method_settings",
]

Batch = Any
Forward = Callable[[nn.Module, Batch], torch.Tensor]


def _default_forward(model: nn.Module, batch: Batch) -> torch.Tensor:
    return model(batch[0])


@dataclass
class MethodHandle:
    """A method applied to a model; see :func:`apply_method`.

    Attributes
    ----------
    settings
        The method's frozen settings (its ``name`` is the method's name).
    model
        The module to train and evaluate: the model itself, or a wrapper sharing its
        modules (``checkpoint``).
    root
        The model passed to :func:`apply_method` (layer names refer to it).
    layers
        Names of the trainable layers whose activations the method treats.
    applied
        What the method did (replacements, LANCE's subspaces, ...).
    originals
        Name -> the module that was there before the method swapped it (put back by
        :meth:`restore`).
    input_shapes
        Treated module name -> input shape of the last forward pass.
    """

    settings: MethodSettings
    model: nn.Module
    root: nn.Module
    layers: list[str]
    applied: Applied
    originals: dict[str, nn.Module] = field(default_factory=dict)
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    hooks: list[Any] = field(default_factory=list, repr=False)

    @property
    def name(self) -> str:
        """The method's name (a key of :data:`lance_lib.methods.METHODS`)."""
        return self.settings.name

    @property
    def subspaces(self) -> Any:
        """LANCE's calibrated subspaces (``None`` for the other methods)."""
        return self.applied.subspaces

    @property
    def replacements(self) -> dict[str, nn.Module]:
        """Module name -> the module the method put there."""
        return self.applied.replacements

    @property
    def treated(self) -> list[str]:
        """The modules standing for the treated layers: the layers, or the units the
        method swapped for them (:attr:`~lance_lib.methods.registry.Applied.treated`)."""
        return self.layers if self.applied.treated is None else self.applied.treated

    def track_shapes(self) -> None:
        """Record every treated module's input shape on each forward pass."""
        for name in self.treated:
            module = self.root.get_submodule(name)

            def hook(_m: nn.Module, inputs: tuple, name: str = name) -> None:
                self.input_shapes[name] = tuple(inputs[0].shape)

            self.hooks.append(module.register_forward_pre_hook(hook))

    def _swap(self, use_originals: bool) -> None:
        chosen = self.originals if use_originals else self.replacements
        for name, module in chosen.items():
            if name in self.replacements:
                set_submodule(self.root, name, module)
        if self.applied.set_enabled is not None:
            self.applied.set_enabled(not use_originals)

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
        for h in self.hooks:
            h.remove()
        self.hooks.clear()
        self.applied.replacements.clear()
        return self.root

    def module_names(self) -> dict[str, str]:
        """Treated module name in ``root`` -> name of the same module in ``self.model``."""
        where = {id(m): n for n, m in self.model.named_modules()}
        return {name: where[id(self.root.get_submodule(name))] for name in self.treated}

    def layer_elements(self) -> dict[str, tuple[int, int]]:
        """Per treated module, Appendix C elements ``(BP, method)`` kept for backward.

        BP keeps the whole input ``prod_i n_i``; LANCE and the per-step HOSVD / ASI
        keep the core and the factors of the compressed modes,
        ``prod_i r_i + sum_i n_i r_i``; LoRAct keeps ``L k + k n`` (its pre-norm units
        what they report); checkpointing counts as BP (the recomputation rebuilds each
        layer's input).  Shapes and per-step ranks are those of the last training
        forward pass (one must have run).
        """
        missing = [n for n in self.treated if n not in self.input_shapes]
        if missing:
            raise RuntimeError(f"run a forward pass first; no input seen for layers {missing}")
        return {
            name: (
                math.prod(self.input_shapes[name]),
                self.settings.kept_elements(self.applied, name, self.input_shapes[name]),
            )
            for name in self.treated
        }

    def analytic_mb(self) -> float:
        """Appendix C activation memory of the treated layers, MB (4 bytes per element)."""
        return published_mb([kept for _, kept in self.layer_elements().values()])

    def factor_bytes(self) -> int:
        """Bytes of factors held as buffers between steps (LANCE, ASI); 0 otherwise."""
        return sum(
            b.untyped_storage().nbytes() for m in self.replacements.values() for b in m.buffers()
        )

    def ranks(self) -> dict[str, Any]:
        """Per layer, then per swapped unit: mode ranks (LANCE, HOSVD, ASI), sketch rank
        ``k`` (LoRAct and its pre-norm units) or None."""
        names = [*self.layers, *(n for n in self.treated if n not in self.layers)]
        return {name: self.settings.layer_ranks(self.applied, name) for name in names}


def method_settings(method: str | MethodSettings, **options: Any) -> dict[str, Any]:
    """The JSON-ready settings that determine ``method`` (the results key's input).

    ``options`` is the shared bag of :func:`apply_method` (options of other methods are
    left out); a settings object is returned as its own view.
    """
    if isinstance(method, MethodSettings):
        return method.to_dict()
    return settings_from_options(method, **options).to_dict()


def apply_method(
    model: nn.Module,
    method: str | MethodSettings,
    layers: Sequence[str],
    *,
    calib_loader: Iterable[Any] | None = None,
    forward: Forward | None = None,
    **options: Any,
) -> MethodHandle:
    """Apply a training method to the given Conv2d / Linear layers of ``model``.

    Parameters
    ----------
    model
        The network (modified in place; :meth:`MethodHandle.restore` undoes it).
    method
        A name of :data:`lance_lib.methods.METHODS` (``"bp"``, ``"lance"``,
        ``"hosvd"``, ``"asi"``, ``"loract"``, ``"checkpoint"``), of
        :data:`lance_lib.methods.BLOCK_METHODS` (on transformer blocks), or a settings
        object (:class:`lance_lib.methods.LanceSettings` ...).
    layers
        Names of the trainable Conv2d / Linear modules (e.g. the last N convs, or
        :func:`lance_lib.models.vit.block_linear_names` of a transformer).
    calib_loader
        ``lance`` only: calibration batches (Phase I); required for ``lance``.
    forward
        ``lance``: ``forward(model, batch)`` for calibration (e.g. a multi-head model).
    **options
        With a method name: its settings, from one shared bag (options of the other
        methods are ignored, unknown ones raise): ``eps``, ``num_batches``, ``modes``
        (LANCE, default ``"channel"``; HOSVD and ASI, default ``"all"``), ``solver``
        (HOSVD), ``first_step`` and ``seed`` (ASI), ``rank_ratio`` and ``seed``
        (LoRAct and its pre-norm variants), ``region`` and ``segments``
        (checkpointing).

    Returns
    -------
    MethodHandle
    """
    if isinstance(method, MethodSettings):
        if options:
            raise TypeError(f"give options in the settings object, not as {sorted(options)}")
        settings = method
    else:
        settings = settings_from_options(method, **options)
    layers = list(layers)
    targets = resolve_layers(model, layers)
    before = dict(model.named_modules())
    applied = settings.apply(model, targets, calib_loader=calib_loader, forward=forward)
    originals = {name: before[name] for name in applied.replacements}
    handle = MethodHandle(settings, applied.model, model, layers, applied, originals)
    handle.track_shapes()
    return handle


# ------------------------------------------------------------------------- accounting


@dataclass(frozen=True)
class MethodMeasurement:
    """One training step of a method, timed, counted and measured (:func:`measure_method`).

    Attributes
    ----------
    forward_s, backward_s, step_s
        Seconds of each timed repeat (``step_s`` = forward + backward).
    forward_s_median, backward_s_median, step_s_median
        Their medians.
    step_s_iqr
        The first and third quartiles of ``step_s`` (the interquartile range).
    flops_measured
        ``FlopCounterMode`` count of one forward and backward (matrix products and
        convolutions; decompositions are not counted); ``None`` for a method whose
        recomputation measurement ran that step (LoRAct's pre-norm mode, whose backward
        calls ``autograd.grad``, which ``FlopCounterMode`` cannot follow).
    measured_layer_bytes
        What the treated modules keep for backward (saved-tensor hooks) plus the
        factors held as buffers; for a method that recomputes, what they hold at the
        peak it measured (``checkpoint``: the largest segment's recomputation).
    measured_region_bytes
        Every distinct storage the step keeps for backward at its peak (the trained
        region, the classifier, the loss) plus the factors; for a method that
        recomputes, the peak during backward (``checkpoint``:
        ``max_i (inputs of segments 1..i + recompute of i)``,
        :func:`lance_lib.methods.checkpointing.backward_peak`; the pre-norm mode:
        what is kept between the passes plus its largest recomputation).
    measured_factor_bytes
        Factors held as buffers between steps (LANCE, ASI).
    measured_by_kind
        Saved bytes per kind of module (``"conv"``, ``"batchnorm"`` ...).
    stored_between_passes_bytes
        What is kept from the end of the forward pass to the start of the backward
        pass: the region's bytes, or for ``checkpoint`` the segments' inputs plus
        anything saved outside them.
    recompute_bytes
        The largest recomputation's saved bytes during backward (``checkpoint``: one
        segment's forward; LoRAct's pre-norm mode: attention or the MLP of a block,
        measured inside its backward); 0 for methods that recompute nothing.
    cuda_peak_bytes, cuda_baseline_bytes
        On CUDA, ``torch.cuda.max_memory_allocated`` during one training step and
        the memory allocated before it (weights, inputs); ``None`` elsewhere.
    analytic_mb, analytic_bp_mb
        Appendix C's memory of the treated layers under the method and under BP
        (:meth:`MethodHandle.analytic_mb`, published MB convention).
    ranks
        :meth:`MethodHandle.ranks`.

    The saved-tensor report behind these numbers is :attr:`saved` (not a field, not
    recorded).
    """

    forward_s: list[float]
    backward_s: list[float]
    step_s: list[float]
    forward_s_median: float
    backward_s_median: float
    step_s_median: float
    step_s_iqr: list[float]
    flops_measured: int | None
    measured_layer_bytes: int
    measured_region_bytes: int
    measured_factor_bytes: int
    measured_by_kind: dict[str, int]
    stored_between_passes_bytes: int
    recompute_bytes: int
    cuda_peak_bytes: int | None
    cuda_baseline_bytes: int | None
    analytic_mb: float
    analytic_bp_mb: float
    ranks: dict[str, Any]

    @property
    def saved(self) -> SavedTensorReport:
        """The saved-tensor report of the measured step, by module (for finer breakdowns
        such as the bytes kept inside each transformer block); set by
        :func:`measure_method`."""
        return self.__dict__["_saved"]

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict (for results records)."""
        return asdict(self)


def _zero_grads(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = None


def _device_of(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _step_timer(
    model: nn.Module, loss: Callable[[], torch.Tensor]
) -> Callable[[], tuple[float, float]]:
    """A function that runs one step of ``loss`` and returns (forward, backward) seconds."""
    sync = synchronizer(_device_of(model))

    def run() -> tuple[float, float]:
        _zero_grads(model)
        sync()
        t0 = time.perf_counter()
        value = loss()
        sync()
        t1 = time.perf_counter()
        value.backward()
        sync()
        return t1 - t0, time.perf_counter() - t1

    return run


def _loss_of(handle: MethodHandle, batch: Batch, forward: Forward) -> Callable[[], torch.Tensor]:
    def loss() -> torch.Tensor:
        return nn.functional.cross_entropy(forward(handle.model, batch), batch[1])

    return loss


def quartiles(values: Sequence[float]) -> tuple[float, float]:
    """First and third quartiles (``statistics.quantiles``, inclusive); one value: twice."""
    if len(values) < 2:
        return values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


def measure_method(
    handle: MethodHandle,
    batch: Batch,
    *,
    repeats: int = 3,
    warmup: int = 1,
    forward: Forward | None = None,
) -> MethodMeasurement:
    """Time, FLOPs and activation memory of one training step of ``handle`` on ``batch``.

    Parameters
    ----------
    handle
        From :func:`apply_method`.
    batch
        ``(inputs, targets)`` on the model's device; the loss is cross-entropy of
        ``forward(model, batch)``.
    repeats, warmup
        Timed and untimed steps.
    forward
        ``forward(model, batch)`` -> logits; default ``model(batch[0])``.

    Returns
    -------
    MethodMeasurement

    Notes
    -----
    Gradients are cleared before and after; weights are not changed (no optimiser
    step).  Per-step methods (HOSVD, ASI, LoRAct) advance their state (ASI's warm start,
    LoRAct's sampler) as in training: by the timed steps, the saved-tensor step and one
    more step, which measures the recomputation of a method that recomputes by running
    a step (:attr:`~lance_lib.methods.registry.Applied.recomputation`) and otherwise
    counts the FLOPs.  To compare methods, time them step by step in turn with
    :func:`measure_methods`.
    """
    return measure_methods({"one": handle}, batch, repeats=repeats, warmup=warmup, forward=forward)[
        "one"
    ]


def measure_methods(
    handles: Mapping[str, MethodHandle],
    batch: Batch,
    *,
    repeats: int = 41,
    warmup: int = 5,
    forward: Forward | None = None,
) -> dict[str, MethodMeasurement]:
    """:func:`measure_method` for several methods, their steps timed interleaved.

    Each of the ``warmup + repeats`` rounds runs one step of every method in turn, so
    that a change of machine load (other processes, frequency scaling) reaches every
    method alike; medians and quartiles are taken over the ``repeats`` timed rounds.
    The handles must not share modules (apply each method to its own copy of the
    model).  FLOPs and memory are then measured per method as in
    :func:`measure_method`.
    """
    forward = forward or _default_forward
    losses = {name: _loss_of(h, batch, forward) for name, h in handles.items()}
    timers = {name: _step_timer(h.model, losses[name]) for name, h in handles.items()}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in handles}
    for i in range(warmup + repeats):
        for name, timer in timers.items():
            t = timer()
            if i >= warmup:
                times[name].append(t)
    return {
        name: _measurement(handle, losses[name], batch, times[name])
        for name, handle in handles.items()
    }


def _measurement(
    handle: MethodHandle,
    loss: Callable[[], torch.Tensor],
    batch: Batch,
    times: list[tuple[float, float]],
) -> MethodMeasurement:
    """FLOPs and memory of one step, with the step times already taken."""
    model = handle.model

    def step() -> None:
        _zero_grads(model)
        loss().backward()

    ran: list[bool] = []

    def instrumented_step() -> None:
        ran.append(True)
        step()

    fwd_s = [f for f, _ in times]
    bwd_s = [b for _, b in times]
    cuda = cuda_peak_bytes(_device_of(model), step)
    _zero_grads(model)
    names = list(handle.module_names().values())
    report = measure_saved_tensors(model, loss)
    factor_bytes = handle.factor_bytes()
    layer_bytes = report.bytes_of(names) + factor_bytes
    stored = peak = report.activation_bytes + factor_bytes
    recompute = 0
    if handle.applied.recomputation is not None:
        try:
            measured = handle.applied.recomputation(batch[0], instrumented_step, names)
        finally:
            _zero_grads(model)
        recompute = measured.recompute_bytes
        peak = stored + recompute if measured.peak_bytes is None else measured.peak_bytes
        if measured.layer_bytes is not None:
            layer_bytes = measured.layer_bytes
    flops = None if ran else measure_flops(step)
    _zero_grads(model)
    steps = [f + b for f, b in zip(fwd_s, bwd_s, strict=True)]
    measurement = MethodMeasurement(
        forward_s=fwd_s,
        backward_s=bwd_s,
        step_s=steps,
        forward_s_median=statistics.median(fwd_s),
        backward_s_median=statistics.median(bwd_s),
        step_s_median=statistics.median(steps),
        step_s_iqr=list(quartiles(steps)),
        flops_measured=flops,
        measured_layer_bytes=layer_bytes,
        measured_region_bytes=peak,
        measured_factor_bytes=factor_bytes,
        measured_by_kind=report.by_kind,
        stored_between_passes_bytes=stored,
        recompute_bytes=recompute,
        cuda_peak_bytes=None if cuda is None else cuda[1],
        cuda_baseline_bytes=None if cuda is None else cuda[0],
        analytic_mb=handle.analytic_mb(),
        analytic_bp_mb=published_mb([full for full, _ in handle.layer_elements().values()]),
        ranks=handle.ranks(),
    )
    object.__setattr__(measurement, "_saved", report)  # frozen; not a recorded field
    return measurement


def _layer_io(handle: MethodHandle, loss: Callable[[], torch.Tensor]) -> dict[str, tuple]:
    """Per treated layer of ``handle``: (module, input, output gradient) of one step."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in handle.layers}

    def keep(name: str, x: torch.Tensor, out: torch.Tensor) -> None:
        seen[name].append(x.detach())
        out.register_hook(lambda g: seen[name].append(g.detach()))

    hooks = [
        handle.root.get_submodule(name).register_forward_hook(
            lambda m, i, o, n=name: keep(n, i[0], o)
        )
        for name in handle.layers
    ]
    try:
        _zero_grads(handle.model)
        loss().backward()
        _zero_grads(handle.model)
    finally:
        for h in hooks:
            h.remove()
    return {name: (handle.root.get_submodule(name), *seen[name][:2]) for name in handle.layers}


def _weight_grad(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """BP's weight gradient of a Conv2d / Linear from its input and output gradient."""
    if isinstance(module, nn.Conv2d):
        return torch.ops.aten.convolution_backward(
            g, x, module.weight, None, list(module.stride), list(module.padding),
            list(module.dilation), False, [0, 0], module.groups, [False, True, False],
        )[1]  # fmt: skip
    return g.reshape(-1, g.shape[-1]).T @ x.reshape(-1, x.shape[-1])


def speed_floor(
    bp: MethodHandle,
    lance: MethodHandle,
    batch: Batch,
    bp_step_s: float,
    *,
    repeats: int = 11,
    forward: Forward | None = None,
) -> dict[str, float]:
    """LANCE's speed floor: BP's step minus the weight-gradient work LANCE replaces,
    plus LANCE's projection (Eq. 1), timed with ``torch.profiler``.

    Batch norm, the convolutions and the input gradients are common to both methods;
    what LANCE changes is the weight gradient of each compressed layer (taken from the
    core instead of the input) and the projection it adds.  With ``bp`` and ``lance``
    applied to two copies of the same model, one BP step records each trained layer's
    input and output gradient; then, under the profiler and interleaved ``repeats``
    times, a whole BP step, BP's weight gradient of every layer LANCE compresses and
    LANCE's projection of its input run, so that all three are timed at the same
    machine load.

    Returns
    -------
    dict
        ``floor_over_bp = 1 - (weight gradients - projections) / BP step`` (medians in
        the profiler window), and scaled to ``bp_step_s`` (BP's median step measured
        beside the other methods): ``bp_weight_grad_s``, ``lance_projection_s`` and
        ``floor_s = bp_step_s - bp_weight_grad_s + lance_projection_s``.
    """
    forward = forward or _default_forward
    bp_loss = _loss_of(bp, batch, forward)
    io = _layer_io(bp, bp_loss)
    wgrads, projections = [], []
    for name, (module, x, g) in io.items():
        replacement = lance.replacements.get(name)
        if replacement is None or not getattr(replacement, "compressed", True):
            continue
        wgrads.append(lambda m=module, x=x, g=g: _weight_grad(m, x, g))
        projections.append(lambda x=x, f=replacement.factors: fast_project(x, f))

    def bp_step() -> None:
        _zero_grads(bp.model)
        bp_loss().backward()

    def run_all(fns: list[Callable[[], object]]) -> None:
        with torch.no_grad():
            for fn in fns:
                fn()

    parts = {
        "floor::bp_step": bp_step,
        "floor::weight_grad": lambda: run_all(wgrads),
        "floor::projection": lambda: run_all(projections),
    }
    sync = synchronizer(_device_of(bp.model))
    for run in parts.values():  # warm-up
        run()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            for label, run in parts.items():
                with torch.profiler.record_function(label):
                    run()
                    sync()
    _zero_grads(bp.model)
    durations: dict[str, list[float]] = {label: [] for label in parts}
    for event in prof.events():
        if event.name in durations:
            durations[event.name].append(event.cpu_time_total * 1e-6)
    step, wgrad, proj = (statistics.median(durations[label]) for label in parts)
    scale = bp_step_s / step
    return {
        "bp_weight_grad_s": wgrad * scale,
        "lance_projection_s": proj * scale,
        "floor_s": bp_step_s - (wgrad - proj) * scale,
        "floor_over_bp": 1 - (wgrad - proj) / step,
    }


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

    def loss() -> torch.Tensor:
        return nn.functional.cross_entropy(forward(handle.model, batch), batch[1])

    _zero_grads(handle.model)
    with handle.bypassed():
        loss().backward()
    reference = [p.grad.detach().clone() for p in params]
    _zero_grads(handle.model)
    loss().backward()
    grads = [p.grad.detach().clone() for p in params]
    _zero_grads(handle.model)
    return gradient_angle(reference, grads)
