"""Activation memory: the two analytic conventions and what autograd really keeps.

Two analytic memory conventions are provided and kept apart:

* :func:`subspace_elements` - LANCE's Appendix C: a compressed activation costs
  ``prod_i r_i + sum_i n_i r_i`` elements (core plus the compressed modes' factors)
  against ``prod_i n_i``.
* :func:`published_mb` - the convention of the published per-step HOSVD / ASI code
  and of the paper's tables: only the inputs of the fine-tuned convolutions count,
  ``elements x 4 bytes / 2**20``.  For ResNet18's last 4 convs at batch 128 and
  224x224 input this gives the paper's 61.25 MB (24.5 MB for 2 convs).

:func:`measure_saved_tensors` counts what autograd really keeps: every tensor packed
for backward during a training forward, seen through
``torch.autograd.graph.saved_tensors_hooks``, de-duplicated by storage, attributed to
the leaf module that saved it, with parameters and buffers (e.g. LANCE's shared
factors) reported apart from activations.  :class:`SavedBytesCounter` counts the same
way inside any block of code (e.g. a recomputation during backward), and
:func:`cuda_peak_bytes` reads ``torch.cuda.max_memory_allocated`` around a step on a
GPU.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import TracebackType

import torch
from torch import nn

from ..subspaces import LayerSubspace

__all__ = [
    "MIB",
    "SavedBytesCounter",
    "SavedTensorReport",
    "cuda_peak_bytes",
    "measure_saved_tensors",
    "module_kind",
    "published_mb",
    "subspace_elements",
]

MIB = 2**20


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
    the per-module numbers may sum to more than ``activation_bytes``.
    ``distinct_by_module`` attributes each distinct storage once, to the first module
    that saved it, so it sums to ``activation_bytes`` (:meth:`distinct_bytes_under`
    gives what a subtree keeps, e.g. one transformer block).  ``by_kind``
    sums ``by_module`` per kind of module.  ``buffers_by_module`` gives the buffers each
    module saved (LANCE's factors for a compressed layer, running statistics for a
    BatchNorm in eval mode).  Parameters and buffers (LANCE's shared
    factors are buffers) are counted apart, once each.
    """

    by_module: dict[str, int] = field(default_factory=dict)
    distinct_by_module: dict[str, int] = field(default_factory=dict)
    buffers_by_module: dict[str, int] = field(default_factory=dict)
    by_kind: dict[str, int] = field(default_factory=dict)
    activation_bytes: int = 0
    parameter_bytes: int = 0
    buffer_bytes: int = 0
    count: int = 0

    def bytes_of(self, names: Iterable[str]) -> int:
        """Activation bytes kept by the given modules."""
        return sum(self.by_module.get(n, 0) for n in names)

    def distinct_bytes_under(self, prefixes: Iterable[str]) -> int:
        """Distinct activation bytes first saved at or under the given module names."""
        roots = list(prefixes)
        return sum(
            nbytes
            for name, nbytes in self.distinct_by_module.items()
            if any(name == r or name.startswith(r + ".") for r in roots)
        )

    def buffer_bytes_of(self, names: Iterable[str]) -> int:
        """Buffer bytes (e.g. LANCE's factors) saved for backward by the given modules."""
        return sum(self.buffers_by_module.get(n, 0) for n in names)


def module_kind(module: nn.Module | None) -> str:
    """The kind a module's saved tensors are reported under (``"conv"``, ``"batchnorm"``...)."""
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
    distinct_by_module: dict[str, int] = defaultdict(int)
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
            by_kind[module_kind(modules.get(owner))] += key[1]
        if key not in seen:
            seen.add(key)
            report.activation_bytes += key[1]
            distinct_by_module[owner] += key[1]
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
    report.distinct_by_module = dict(distinct_by_module)
    report.buffers_by_module = dict(buffers_by_module)
    report.by_kind = dict(by_kind)
    return report


class SavedBytesCounter:
    """Context manager: distinct bytes of the activations autograd saves inside the block.

    ``with SavedBytesCounter(exclude=model.parameters()) as counter: ...`` then
    ``counter.bytes``.  Storages are counted once; those of ``exclude`` (parameters,
    buffers) are skipped.  Used where :func:`measure_saved_tensors` cannot reach, e.g.
    a recomputation that runs inside another function's backward pass.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        self._skip = {_storage_key(t)[0] for t in exclude}
        self._seen: set[tuple[int, int]] = set()
        self.bytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key[0] not in self._skip and key not in self._seen:
            self._seen.add(key)
            self.bytes += key[1]
        return t

    def __enter__(self) -> SavedBytesCounter:
        self._hooks.__enter__()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self._hooks.__exit__(kind, error, trace)


def cuda_peak_bytes(
    device: torch.device | str, run: Callable[[], object]
) -> tuple[int, int] | None:
    """``(allocated before, peak allocated during)`` ``run()`` on a CUDA ``device``.

    ``torch.cuda.max_memory_allocated`` after resetting the peak statistics: the peak
    of everything allocated (weights, inputs, activations, gradients, workspaces).
    ``None`` on any other device.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    run()
    torch.cuda.synchronize(device)
    return before, torch.cuda.max_memory_allocated(device)
