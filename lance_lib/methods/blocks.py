"""Methods on the blocks of a pre-norm transformer: one handle, one measurement.

Every method acts on the trained blocks of a :class:`lance_lib.models.vit.VisionTransformer`
(or of the tail :func:`lance_lib.models.vit.split_blocks` returns):

``bp``
    plain backpropagation.
``lance``
    every block Linear (``qkv``, ``proj``, ``fc1``, ``fc2``) calibrated once on its
    ``(batch, tokens, features)`` input (Eq. 2-3) and compressed (Eq. 1); by default
    only the feature mode, as in the fine-tuning harness (see below).
``loract``
    layer-wise LoRAct: every block Linear's input sketched on its own
    (:class:`lance_lib.methods.loract.LoRActLinear`).
``loract_prenorm``
    LoRAct's pre-norm mode (:class:`lance_lib.methods.loract_prenorm.LoRActPreNormBlock`):
    each block keeps its two sketched LayerNorm outputs and recomputes attention and
    the MLP from them in backward.
``loract_prenorm_linear``
    the narrower variant (:class:`lance_lib.methods.loract_prenorm.LoRActPreNormLinear`):
    each LayerNorm + first projection unit (``norm_qkv``, ``norm_fc1``) shares one
    sketch, ``proj`` and ``fc2`` are layer-wise LoRAct, the rest is stored in full.

LANCE's modes for 3-D inputs
----------------------------
The default is ``modes="channel"`` (the feature mode only), the reading of Eq. (1)
under which Theorem 1 holds (:mod:`lance_lib.layers`).  ``"no_batch"`` also
compresses the token mode: tokens are patch positions, fixed for a given input size,
so their covariance over calibration batches is a stable statistic and the token
factor compresses well, at the price of gradients that can point away from BP's and a
layer tied to the calibrated token count.  ``"all"`` adds the batch mode: samples in a
shuffled batch are exchangeable, so the expected batch covariance is
``a I + b 1 1^T``; apart from the mean direction no subspace is preferred, Eq. (3)
keeps a large share of the batch directions, and training is tied to the calibrated
batch size.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..accounting import (
    cuda_peak_bytes,
    gradient_angle,
    measure_saved_tensors,
    time_step,
)
from ..models.surgery import set_submodule
from ..models.vit import Block, NormLinear, block_linear_names
from ..modes import Modes
from .harness import MethodHandle, apply_method
from .loract_prenorm import LoRActPreNormBlock, LoRActPreNormLinear
from .registry import METHOD_TABLE

__all__ = [
    "BLOCK_METHODS",
    "BlockMeasurement",
    "BlockMethod",
    "apply_block_method",
    "block_angle_to_bp",
    "measure_block_method",
    "register_block_method",
]

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class BlockMethod:
    """A method applied to every block of a transformer; see :func:`apply_block_method`.

    Attributes
    ----------
    name
        One of :data:`BLOCK_METHODS`.
    model
        The module to train (modified in place).
    settings
        The method's settings (JSON-ready).
    treated
        Names of the modules whose saved tensors are "the compressed layers": the
        blocks' Linear layers, or the modules that replaced them.
    blocks
        Names of the treated blocks (``blocks.2`` ...): "the whole block" of the
        block-memory measurement.
    handle
        The :class:`lance_lib.methods.MethodHandle` of the Linear layers swapped
        through :func:`lance_lib.methods.apply_method` (``bp`` for the pre-norm mode).
    units
        Name -> (original module, replacement) for the modules swapped here (pre-norm
        units or whole blocks).
    """

    name: str
    model: nn.Module
    settings: dict[str, Any]
    treated: list[str]
    blocks: list[str]
    handle: MethodHandle
    units: dict[str, tuple[nn.Module, nn.Module]] = field(default_factory=dict)

    def _swap_units(self, use_originals: bool) -> None:
        for name, (original, replacement) in self.units.items():
            set_submodule(self.model, name, original if use_originals else replacement)

    @contextmanager
    def bypassed(self) -> Iterator[nn.Module]:
        """Plain BP on the same weights inside the block (for evaluation and reference)."""
        self._swap_units(use_originals=True)
        try:
            with self.handle.bypassed() as model:
                yield model
        finally:
            self._swap_units(use_originals=False)

    def restore(self) -> nn.Module:
        """Put the original modules back; returns the model."""
        self._swap_units(use_originals=True)
        self.units.clear()
        return self.handle.restore()

    def factor_bytes(self) -> int:
        """Bytes of LANCE's factors, held as buffers between steps (0 for the others)."""
        return self.handle.factor_bytes()

    def ranks(self) -> dict[str, Any]:
        """LANCE's mode ranks or LoRAct's sketch rank ``k`` per treated module."""
        out = self.handle.ranks()
        out.update({name: unit.rank for name, (_, unit) in self.units.items()})
        return out

    def recomputing(self) -> list[nn.Module]:
        """The swapped modules that recompute during backward (the pre-norm mode's blocks)."""
        return [unit for _, unit in self.units.values() if hasattr(unit, "recompute_bytes")]


BlockApply = Callable[..., BlockMethod]
_BLOCK_METHODS: dict[str, BlockApply] = {}


def register_block_method(*names: str) -> Callable[[BlockApply], BlockApply]:
    """Decorator: ``function(model, name, linears, **settings) -> BlockMethod`` for ``names``.

    ``settings`` is the whole bag of :func:`apply_block_method` (``calib_loader``,
    ``eps``, ``num_batches``, ``modes``, ``rank_ratio``, ``seed``); each function takes
    what its method uses.
    """

    def decorate(function: BlockApply) -> BlockApply:
        for name in names:
            if name not in METHOD_TABLE:
                raise KeyError(f"{name!r} is not in the method table")
            _BLOCK_METHODS[name] = function
        return function

    return decorate


def _block_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, Block)]


@register_block_method("bp", "lance", "loract")
def _layer_wise(model: nn.Module, name: str, linears: list[str], **settings: Any) -> BlockMethod:
    handle = apply_method(model, name, linears, **settings)
    out = {**handle.settings.to_dict(), "method": name}
    return BlockMethod(name, model, out, linears, _block_names(model), handle)


@register_block_method("loract_prenorm_linear")
def _prenorm_linear(
    model: nn.Module, name: str, linears: list[str], *, rank_ratio: float, seed: int, **_: Any
) -> BlockMethod:
    modules = dict(model.named_modules())
    units = [n for n, m in modules.items() if isinstance(m, NormLinear) and n.startswith("blocks.")]
    in_units = {f"{u}.linear" for u in units}
    rest = [n for n in linears if n not in in_units]
    handle = apply_method(model, "loract", rest, rank_ratio=rank_ratio, seed=seed)
    swapped = {}
    for unit_name in units:
        original = modules[unit_name]
        unit = LoRActPreNormLinear(
            original.norm, original.linear, unit_name, rank_ratio=rank_ratio, seed=seed
        )
        set_submodule(model, unit_name, unit)
        swapped[unit_name] = (original, unit)
    settings = {**handle.settings.to_dict(), "method": name}
    return BlockMethod(name, model, settings, units + rest, _block_names(model), handle, swapped)


@register_block_method("loract_prenorm")
def _prenorm(
    model: nn.Module, name: str, linears: list[str], *, rank_ratio: float, seed: int, **_: Any
) -> BlockMethod:
    blocks = _block_names(model)
    handle = apply_method(model, "bp", linears)
    swapped = {}
    for block_name in blocks:
        original = model.get_submodule(block_name)
        unit = LoRActPreNormBlock(original, block_name, rank_ratio=rank_ratio, seed=seed)
        set_submodule(model, block_name, unit)
        swapped[block_name] = (original, unit)
    settings = {"method": name, "rank_ratio": float(rank_ratio), "seed": int(seed)}
    return BlockMethod(name, model, settings, blocks, blocks, handle, swapped)


#: The methods :func:`apply_block_method` knows, in display order.
BLOCK_METHODS: tuple[str, ...] = tuple(n for n in METHOD_TABLE if n in _BLOCK_METHODS)


def apply_block_method(
    model: nn.Module,
    method: str,
    *,
    calib_loader: Iterable[Any] | None = None,
    eps: float = 0.7,
    num_batches: int = 100,
    modes: Modes = "channel",
    rank_ratio: float = 0.25,
    seed: int = 0,
) -> BlockMethod:
    """Apply ``method`` to every transformer block of ``model``.

    Parameters
    ----------
    model
        A :class:`lance_lib.models.vit.VisionTransformer`, or the tail of
        :func:`lance_lib.models.vit.split_blocks` to treat the trained blocks only.
        Modified in place; :meth:`BlockMethod.restore` undoes it.
    method
        One of :data:`BLOCK_METHODS`.
    calib_loader
        ``lance``: calibration batches (Phase I).
    eps, num_batches
        ``lance``: energy threshold of Eq. (3) and calibration batches ``N``.
    modes
        ``lance``: input modes of the ``(batch, tokens, features)`` activations to
        compress; default ``"channel"`` (the features; see the module notes).
    rank_ratio, seed
        The LoRAct variants: sketch rank ratio ``r`` and sampling seed.

    Returns
    -------
    BlockMethod
    """
    if method not in _BLOCK_METHODS:
        raise ValueError(f"unknown block method {method!r}; choose one of {BLOCK_METHODS}")
    linears = block_linear_names(model)
    if not linears:
        raise ValueError("the model has no transformer blocks (modules named 'blocks.*')")
    return _BLOCK_METHODS[method](
        model,
        method,
        linears,
        calib_loader=calib_loader,
        eps=eps,
        num_batches=num_batches,
        modes=modes,
        rank_ratio=rank_ratio,
        seed=seed,
    )


@dataclass(frozen=True)
class BlockMeasurement:
    """One training step of a block method (:func:`measure_block_method`).

    Attributes
    ----------
    step_s, step_s_median
        Seconds of each timed forward + backward and their median.
    layer_bytes
        What the treated modules keep for backward (saved-tensor hooks) plus
        LANCE's factors.
    block_bytes
        Distinct bytes the treated blocks keep between the passes (everything saved
        inside them: LayerNorms, projections, attention, GELU), plus the factors.
    region_bytes
        Every distinct storage the step keeps between the passes (the trained blocks,
        the classifier and the loss; a frozen prefix keeps nothing) plus the factors.
    recompute_bytes
        The largest recomputation's saved bytes during backward (the pre-norm mode's
        attention or MLP, measured inside its backward); 0 when nothing is recomputed.
    peak_bytes
        ``region_bytes + recompute_bytes``.
    factor_bytes
        LANCE's factors, held as buffers.
    cuda_peak_bytes, cuda_baseline_bytes
        On CUDA, ``torch.cuda.max_memory_allocated`` during one step and the memory
        allocated before it; ``None`` elsewhere.
    """

    step_s: list[float]
    step_s_median: float
    layer_bytes: int
    block_bytes: int
    region_bytes: int
    recompute_bytes: int
    peak_bytes: int
    factor_bytes: int
    cuda_peak_bytes: int | None
    cuda_baseline_bytes: int | None

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return asdict(self)


def _zero(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = None


def measure_block_method(
    bm: BlockMethod, batch: Batch, *, repeats: int = 3, warmup: int = 1
) -> BlockMeasurement:
    """Step time and saved-tensor bytes of one training step of ``bm`` on ``batch``.

    Gradients are cleared before and after; weights are not changed.  For the LoRAct
    variants the treated units also stand in for the LayerNorms' stored inputs, which
    BP and the other methods keep outside the treated Linear layers (they are in
    ``block_bytes`` and ``region_bytes`` for every method).
    """
    model = bm.model
    x, y = batch
    device = next((p.device for p in model.parameters()), torch.device("cpu"))

    def loss() -> torch.Tensor:
        return F.cross_entropy(model(x), y)

    def step() -> None:
        _zero(model)
        loss().backward()

    times = time_step(step, repeats=repeats, warmup=warmup, device=device)
    cuda = cuda_peak_bytes(device, step)
    _zero(model)
    report = measure_saved_tensors(model, loss)
    recomputing = bm.recomputing()
    for unit in recomputing:
        unit.recompute_bytes = []
    try:
        step()
        recompute = max((b for u in recomputing for b in u.recompute_bytes), default=0)
    finally:
        for unit in recomputing:
            unit.recompute_bytes = None
        _zero(model)
    factors = bm.factor_bytes()
    region = report.activation_bytes + factors
    return BlockMeasurement(
        step_s=times,
        step_s_median=statistics.median(times),
        layer_bytes=report.bytes_of(bm.treated) + factors,
        block_bytes=report.distinct_bytes_under(bm.blocks) + factors,
        region_bytes=region,
        recompute_bytes=recompute,
        peak_bytes=region + recompute,
        factor_bytes=factors,
        cuda_peak_bytes=None if cuda is None else cuda[1],
        cuda_baseline_bytes=None if cuda is None else cuda[0],
    )


def _gradients(model: nn.Module, batch: Batch, params: Sequence[torch.Tensor]) -> list:
    _zero(model)
    F.cross_entropy(model(batch[0]), batch[1]).backward()
    grads = [p.grad.detach().clone() for p in params]
    _zero(model)
    return grads


def block_angle_to_bp(bm: BlockMethod, batch: Batch) -> float:
    """Angle (degrees) between BP's and the method's gradients of every trainable parameter."""
    params = [p for p in bm.model.parameters() if p.requires_grad]
    with bm.bypassed() as model:
        reference = _gradients(model, batch, params)
    return gradient_angle(reference, _gradients(bm.model, batch, params))
