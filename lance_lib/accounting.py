"""Accounting: activation memory (analytic and measured), FLOPs, latency, gradient angle.

Two analytic memory conventions are provided and kept apart:

* :func:`appendix_c_elements` - LANCE's Appendix C: a compressed activation costs
  ``prod_i r_i + sum_i n_i r_i`` elements (core plus factors) against ``prod_i n_i``.
* :func:`published_mb` - the convention of the published per-step HOSVD / ASI code
  and of the paper's tables: only the inputs of the fine-tuned convolutions count,
  ``elements x 4 bytes / 2**20``.  For ResNet18's last 4 convs at batch 128 and
  224x224 input this gives the paper's 61.25 MB (24.5 MB for 2 convs).

:func:`measure_saved_tensors` counts what autograd really keeps: every tensor packed
for backward during a training forward, seen through
``torch.autograd.graph.saved_tensors_hooks``, de-duplicated by storage, attributed to
the leaf module that saved it, with parameters and buffers (e.g. LANCE's shared
factors) reported apart from activations.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .calibration import LayerSubspace

__all__ = [
    "SavedTensorReport",
    "appendix_c_elements",
    "conv_flops",
    "gradient_angle",
    "lance_layer_mb",
    "measure_flops",
    "measure_saved_tensors",
    "paper_flops",
    "published_mb",
    "subspace_elements",
    "time_step",
]

MIB = 2**20


def appendix_c_elements(shape: Sequence[int], ranks: Sequence[int]) -> tuple[int, int]:
    """Activation elements kept by BP and by LANCE for one layer, Appendix C.

    Returns ``(prod_i n_i, prod_i r_i + sum_i n_i r_i)``: the full input against the
    core plus one ``(n_i, r_i)`` factor per mode, as Appendix C writes ``S_Mem``.
    """
    full = math.prod(shape)
    core = math.prod(ranks)
    factors = sum(n * r for n, r in zip(shape, ranks, strict=True))
    return full, core + factors


def subspace_elements(sub: LayerSubspace) -> tuple[int, int]:
    """Appendix C elements ``(BP, LANCE)`` of one calibrated layer.

    Factors are counted for the compressed modes only (an uncompressed mode stores
    no factor).
    """
    full = math.prod(sub.input_shape)
    core = math.prod(sub.ranks)
    factors = sum(
        n * r
        for n, r, u in zip(sub.input_shape, sub.ranks, sub.factors, strict=True)
        if u is not None
    )
    return full, core + factors


def published_mb(elements: int | Iterable[int], bytes_per_element: int = 4) -> float:
    """Activation memory in MB as the paper's tables count it: ``elements x 4 / 2**20``."""
    total = elements if isinstance(elements, int) else sum(elements)
    return total * bytes_per_element / MIB


@dataclass
class SavedTensorReport:
    """What autograd kept for backward during one forward pass.

    Sizes are bytes of storages.  ``activation_bytes`` counts each distinct storage
    once (what the whole region keeps).  ``by_module`` gives what each module keeps
    for its own backward, de-duplicated within the module: a storage saved by two
    modules (a ReLU output that is also the next conv's input) counts for both, so
    the per-module numbers may sum to more than ``activation_bytes``.  ``by_kind``
    sums ``by_module`` per kind of module.  ``buffers_by_module`` gives the buffers each
    module saved (LANCE's factors for a compressed layer, running statistics for a
    BatchNorm in eval mode).  Parameters and buffers (LANCE's shared
    factors are buffers) are counted apart, once each.
    """

    by_module: dict[str, int] = field(default_factory=dict)
    buffers_by_module: dict[str, int] = field(default_factory=dict)
    by_kind: dict[str, int] = field(default_factory=dict)
    activation_bytes: int = 0
    parameter_bytes: int = 0
    buffer_bytes: int = 0
    count: int = 0

    def bytes_of(self, names: Iterable[str]) -> int:
        """Activation bytes kept by the given modules."""
        return sum(self.by_module.get(n, 0) for n in names)

    def buffer_bytes_of(self, names: Iterable[str]) -> int:
        """Buffer bytes (e.g. LANCE's factors) saved for backward by the given modules."""
        return sum(self.buffers_by_module.get(n, 0) for n in names)


def _kind(module: nn.Module | None) -> str:
    if module is None:
        return "other"
    if isinstance(module, nn.Conv2d):
        return "conv"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.modules.batchnorm._NormBase):
        return "batchnorm"
    if isinstance(module, (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.GELU, nn.SiLU)):
        return "activation_fn"
    if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
        return "pooling"
    if isinstance(module, nn.LayerNorm):
        return "layernorm"
    return type(module).__name__.lower()


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    st = t.untyped_storage()
    return st.data_ptr(), st.nbytes()


def measure_saved_tensors(model: nn.Module, run: Callable[[], object]) -> SavedTensorReport:
    """Count the bytes autograd keeps for backward while ``run()`` executes.

    ``run`` should perform a training forward pass (and typically the loss); the
    graph it builds is released when ``run``'s result is dropped.  Every tensor
    packed through ``saved_tensors_hooks`` is attributed to the innermost module of
    ``model`` whose forward is executing, de-duplicated by storage (a tensor kept by
    two operations, e.g. a ReLU output that is also the next conv's input, counts
    once in ``activation_bytes`` and for each module in ``by_module``).
    """
    stack: list[str] = []
    names = {m: n for n, m in model.named_modules()}
    modules = dict(model.named_modules())
    params = {_storage_key(p)[0] for p in model.parameters()}
    buffers = {_storage_key(b)[0] for b in model.buffers()}
    # LANCE factors are non-persistent buffers: model.buffers() includes them
    seen: set[tuple[int, int]] = set()
    seen_by_module: set[tuple[str, tuple[int, int]]] = set()
    report = SavedTensorReport()
    by_module: dict[str, int] = defaultdict(int)
    buffers_by_module: dict[str, int] = defaultdict(int)
    by_kind: dict[str, int] = defaultdict(int)

    def pre(module: nn.Module, _inputs: object) -> None:
        stack.append(names[module])

    def post(module: nn.Module, _inputs: object, _output: object) -> None:
        stack.pop()

    def pack(t: torch.Tensor) -> torch.Tensor:
        report.count += 1
        key = _storage_key(t)
        owner = stack[-1] if stack else ""
        if key[0] in params or key[0] in buffers:
            if key[0] in buffers and (owner, key) not in seen_by_module:
                seen_by_module.add((owner, key))
                buffers_by_module[owner] += key[1]
            if key not in seen:
                seen.add(key)
                if key[0] in params:
                    report.parameter_bytes += key[1]
                else:
                    report.buffer_bytes += key[1]
            return t
        if (owner, key) not in seen_by_module:
            seen_by_module.add((owner, key))
            by_module[owner] += key[1]
            by_kind[_kind(modules.get(owner))] += key[1]
        if key not in seen:
            seen.add(key)
            report.activation_bytes += key[1]
        return t

    handles = []
    for m in model.modules():
        handles.append(m.register_forward_pre_hook(pre))
        handles.append(m.register_forward_hook(post, always_call=True))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = run()
        del out
    finally:
        for h in handles:
            h.remove()
    report.by_module = dict(by_module)
    report.buffers_by_module = dict(buffers_by_module)
    report.by_kind = dict(by_kind)
    return report


def paper_flops(n: Sequence[int], n_hat: int, r: Sequence[int] | None = None) -> dict[str, float]:
    """FLOPs of Appendix C, Eq. (7)-(9), for a 3-mode activation ``(n_1, n_2, n_3)``.

    The layer maps the last mode ``n_3`` to ``n_hat`` (a Linear layer on a
    ``(batch, tokens, features)`` input, or an unfolded convolution).  Without ``r``
    the BP counts of Eq. (9) are returned; with ``r`` those of LANCE, Eq. (7)-(8).
    Returns ``{"forward", "backward", "total"}``.
    """
    n1, n2, n3 = n
    if r is None:
        fw = bw = n_hat * n1 * n2 * n3
    else:
        r1, r2, r3 = r
        fw = n_hat * n1 * n2 * n3 + n1 * r1 * n2 * n3 + r1 * n2 * r2 * n3 + r1 * r2 * n3 * r3
        bw = (
            n1 * r1 * n2 * r2 * n3 * r3
            + r1 * r2 * r3 * n2
            + r1 * n2 * r3 * n3
            + r1 * n2 * n3 * n_hat
        )
    return {"forward": float(fw), "backward": float(bw), "total": float(fw + bw)}


def conv_flops(
    input_shape: Sequence[int],
    conv: nn.Conv2d,
    ranks: Sequence[int] | None = None,
) -> dict[str, float]:
    """Analytic multiply-accumulate count x 2 of one conv training step, as implemented here.

    BP: forward conv, input gradient, weight gradient (each ``2 B O H' W' C k^2 / g``).
    LANCE (``ranks`` given, ``(r_B, r_C, r_H, r_W)``): forward conv plus the projection
    of Eq. (1) mode by mode; input gradient as BP; weight gradient in the compressed
    space of :func:`lance_lib.layers.conv2d_weight_from_core` (spatial reconstruction,
    output-gradient projection on the batch factor, weight gradient with ``r_B``
    samples and ``r_C`` channels when ``r_C < C/g``, expansion by ``U_C``).
    """
    b, c, h, w = input_shape
    o = conv.out_channels
    g = conv.groups
    kh, kw = conv.kernel_size
    ho = (h + 2 * conv.padding[0] - conv.dilation[0] * (kh - 1) - 1) // conv.stride[0] + 1
    wo = (w + 2 * conv.padding[1] - conv.dilation[1] * (kw - 1) - 1) // conv.stride[1] + 1
    per_sample = 2.0 * o * ho * wo * (c // g) * kh * kw
    fw = b * per_sample
    grad_in = b * per_sample
    if ranks is None:
        return {"forward": fw, "backward": grad_in + fw, "total": 3 * fw}
    rb, rc, rh, rw = ranks
    proj = 2.0 * (
        b * rb * c * h * w + rb * c * rc * h * w + rb * rc * h * rh * w + rb * rc * rh * rw * w
    )
    recon_spatial = 2.0 * (rb * rc * rh * rw * h + rb * rc * h * rw * w)
    delta_proj = 2.0 * b * rb * o * ho * wo
    if rc < c // g:
        wgrad = 2.0 * rb * o * ho * wo * rc * kh * kw + 2.0 * o * rc * (c // g) * kh * kw
    else:
        wgrad = 2.0 * rb * c * rc * h * w + rb * per_sample
    bw = grad_in + recon_spatial + delta_proj + wgrad
    return {"forward": fw + proj, "backward": bw, "total": fw + proj + bw}


def measure_flops(run: Callable[[], object]) -> int:
    """FLOPs counted by ``torch.utils.flop_counter.FlopCounterMode`` while ``run()`` runs.

    Include the backward call in ``run`` to count a whole training step.
    """
    counter = FlopCounterMode(display=False)
    with counter:
        run()
    return int(counter.get_total_flops())


def gradient_angle(reference: Sequence[torch.Tensor], other: Sequence[torch.Tensor]) -> float:
    """Angle in degrees between two gradients given as lists of tensors (Sec. 3.1, Fig. 2).

    Both are flattened and concatenated; the angle is
    ``arccos(<g_ref, g> / (|g_ref| |g|))``.  Returns 90 when either gradient is zero.
    """
    a = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in reference])
    b = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in other])
    if a.shape != b.shape:
        raise ValueError("gradients have different numbers of elements")
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return 90.0
    cos = torch.clamp(a @ b / (na * nb), -1.0, 1.0)
    return float(torch.rad2deg(torch.arccos(cos)))


def time_step(step: Callable[[], object], repeats: int = 5, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of ``step()`` over ``repeats`` runs after ``warmup`` runs.

    Uses ``time.perf_counter`` and synchronises CUDA when available.  Absolute times on
    shared machines are noise; compare methods timed side by side in one process.
    """
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def lance_layer_mb(subspaces: Mapping[str, LayerSubspace]) -> dict[str, float]:
    """Appendix C memory in MB (4 bytes per element) of each calibrated layer under LANCE."""
    return {name: published_mb(subspace_elements(s)[1]) for name, s in subspaces.items()}


from typing import TYPE_CHECKING  # noqa: E402

if TYPE_CHECKING:  # pandas is imported lazily by region_memory_table
    import pandas as pd

_OPERATION = {
    "conv": "conv input (LANCE: core)",
    "linear": "linear / classifier input (LANCE: core)",
    "batchnorm": "BatchNorm input (lean: per-channel scale)",
    "activation_fn": "activation output (lean: 1-bit mask)",
    "dropout": "dropout mask (lean: 1-bit mask)",
    "pooling": "pooling input / indices",
    "top_level": "model's own functional ops and the loss",
}


def region_memory_table(
    model: nn.Module,
    run: Callable[[], object],
    subspaces: Mapping[str, LayerSubspace],
    region: Sequence[str] | None = None,
) -> pd.DataFrame:
    """What the trainable region keeps for backward, per module, under BP, LANCE and lean LANCE.

    ``run()`` performs a training forward pass of ``model`` (and the loss) and is
    measured three times with :func:`measure_saved_tensors`: as the model is (BP, every
    module uncompressed), with the layers of ``subspaces`` compressed
    (:func:`lance_lib.layers.compress`, Eq. 1), and compressed with ``lean=True``
    (:mod:`lance_lib.lean`: 1-bit ReLU / ReLU6 / dropout masks, frozen BatchNorm as a
    per-channel scale).  The model is left restored (uncompressed).

    Parameters
    ----------
    model
        The model, uncompressed; parameters not being trained should have
        ``requires_grad=False`` (a frozen prefix then keeps nothing).
    run
        Training forward pass, e.g. ``lambda: F.cross_entropy(model(x), y)``.
    subspaces
        Calibrated subspaces of the compressed layers.
    region
        Module names; modules at or under them get their own rows, all other modules
        are summed into one row ``"(outside region)"``.  Default: every module.

    Returns
    -------
    pandas.DataFrame
        Columns ``module, kind, operation, bp_bytes, lance_bytes, lean_bytes``.  One
        row per module that kept something (the model's own functional operations and
        the loss, outside any submodule, are the row ``"(top level)"``); a module's row
        counts every storage it saved, so a ReLU output that is also the next conv's
        input appears in both rows.  Three rows of
        kind ``"total"`` follow: ``"activations (distinct storages)"`` (each storage
        once, what the region really keeps), ``"factors (buffers)"`` (LANCE's ``U_i``
        and the lean BatchNorm factors, if any) and ``"region total"`` (their sum;
        parameters excluded).  Appendix C counts only the ``conv`` rows' inputs.
    """
    import pandas as pd

    from .layers import compress, restore

    restore(model)
    reports = {}
    try:
        reports["bp"] = measure_saved_tensors(model, run)
        compress(model, subspaces)
        reports["lance"] = measure_saved_tensors(model, run)
        compress(model, subspaces, lean=True)
        reports["lean"] = measure_saved_tensors(model, run)
    finally:
        restore(model)
    modules = dict(model.named_modules())

    def inside(name: str) -> bool:
        return region is None or any(name == r or name.startswith(r + ".") for r in region)

    rows: dict[str, dict[str, object]] = {}
    for method, report in reports.items():
        for name, nbytes in report.by_module.items():
            if name == "":
                key, kind = "(top level)", "top_level"
            elif inside(name):
                key, kind = name, _kind(modules.get(name))
            else:
                key, kind = "(outside region)", "other"
            empty = {"bp_bytes": 0, "lance_bytes": 0, "lean_bytes": 0}
            row = rows.setdefault(
                key, {"module": key, "kind": kind, "operation": _OPERATION.get(kind, kind), **empty}
            )
            row[f"{method}_bytes"] += nbytes
    order = {n: i for i, n in enumerate(modules)}
    body = sorted(rows.values(), key=lambda r: order.get(r["module"], len(order)))
    totals = [
        ("activations (distinct storages)", {m: r.activation_bytes for m, r in reports.items()}),
        ("factors (buffers)", {m: r.buffer_bytes for m, r in reports.items()}),
        ("region total", {m: r.activation_bytes + r.buffer_bytes for m, r in reports.items()}),
    ]
    for label, values in totals:
        per_method = {f"{m}_bytes": v for m, v in values.items()}
        body.append({"module": label, "kind": "total", "operation": label, **per_method})
    columns = ["module", "kind", "operation", "bp_bytes", "lance_bytes", "lean_bytes"]
    return pd.DataFrame(body, columns=columns)


__all__ += ["region_memory_table"]
