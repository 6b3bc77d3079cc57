"""Lean companions of the LANCE layers: what the rest of the trainable region keeps.

LANCE (Eq. 1, Eq. 4) shrinks what the fine-tuned convolutions keep for backward, but
autograd keeps more than those inputs (Appendix C counts nothing else): a frozen
BatchNorm keeps its input, a ReLU keeps its output, and a compressed conv's input is
often the very tensor the preceding ReLU already keeps.  The modules here remove
those copies, each exactly unless stated:

* :class:`LeanReLU` / :class:`LeanReLU6` keep a bit-packed mask, 1 bit per element,
  instead of their output (32x fewer bytes than a float32 output).  Their backward is
  autograd's: ``grad`` where ``x > 0`` (ReLU) or ``0 < x < 6`` (ReLU6), else 0, with
  PyTorch's conventions at the thresholds (and, for ReLU, at NaN, where the gradient
  passes; PyTorch's own ReLU6 is not consistent at NaN, this one passes it too).
* :class:`LeanBatchNorm2d` in evaluation mode (running statistics) is a per-channel
  affine map ``y = x * scale + shift`` with ``scale = weight / sqrt(var + eps)``; its
  input gradient needs nothing but ``scale`` (``C`` numbers).  With a trainable
  ``bias`` only, nothing more is kept.  With a trainable ``weight`` its gradient
  ``sum(grad * x_hat)`` needs the normalised input ``x_hat``: kept exactly by default
  (PyTorch's own BatchNorm, which keeps its input), or - an approximate option - only
  its core in a one-shot subspace calibrated like LANCE's (:func:`calibrate_batchnorm`,
  Eq. 1-3), the weight gradient then being that of the reconstructed ``x_hat``
  (Eq. 4).  In training mode, or without running statistics, the module is PyTorch's
  BatchNorm.

Each lean module falls back to the plain operation when its input needs no gradient
(a frozen prefix keeps nothing anyway), so the lean swap may cover the whole model:
autograd itself delimits the trainable region.  Pooling (``AdaptiveAvgPool2d``,
``torch.flatten``) and residual additions keep no activation, and the classifier keeps
only its ``(B, features)`` input; :func:`lance_lib.accounting.region_memory_table`
measures all of it.

:func:`make_lean` swaps the lean modules in (in place; they subclass the originals and
share their parameters and buffers), :func:`undo_lean` puts the originals back;
``lance_lib.layers.compress(model, subspaces, lean=True)`` does both at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .hosvd import ModeCovariance, check_eps, leading_subspace, project, reconstruct
from .models.surgery import set_submodule
from .modes import check_modes, modes_jsonable, resolve_modes
from .subspaces import LayerSubspace, Subspaces

__all__ = [
    "LeanBatchNorm2d",
    "LeanDropout",
    "LeanReLU",
    "LeanReLU6",
    "calibrate_batchnorm",
    "is_lean",
    "make_lean",
    "pack_mask",
    "packed_dropout",
    "packed_relu",
    "packed_relu6",
    "undo_lean",
    "unpack_mask",
]

_SHIFTS = torch.arange(8, dtype=torch.uint8)


# --------------------------------------------------------------------------------------
# Bit-packed masks and the ReLU family
# --------------------------------------------------------------------------------------


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Pack a boolean tensor into ``ceil(numel / 8)`` bytes, 8 elements per ``uint8``.

    Element ``8 k + j`` of the flattened mask is bit ``j`` of byte ``k``.  Invert with
    :func:`unpack_mask`.
    """
    if mask.dtype != torch.bool:
        raise TypeError(f"pack_mask expects a bool tensor, got {mask.dtype}")
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    shifts = _SHIFTS.to(mask.device)
    return (flat.view(-1, 8).to(torch.uint8) << shifts).sum(1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """The boolean tensor of ``shape`` packed by :func:`pack_mask`."""
    numel = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.numel() != (numel + 7) // 8:
        raise ValueError(
            f"packed mask of {packed.numel()} {packed.dtype} bytes cannot hold shape {tuple(shape)}"
        )
    bits = (packed.unsqueeze(1) >> _SHIFTS.to(packed.device)) & 1
    return bits.reshape(-1)[:numel].view(shape).bool()


class _PackedClamp(torch.autograd.Function):
    """``clamp(x, lower, upper)`` keeping a 1-bit mask of where the gradient passes."""

    @staticmethod
    def forward(ctx, x, lower, upper, inplace):
        # PyTorch's conventions: relu passes grad where not (result <= 0)
        # (threshold_backward), hardtanh where not (x <= lo or x >= hi); NaN passes
        blocked = x <= lower
        if upper is not None:
            blocked |= x >= upper
        ctx.save_for_backward(pack_mask(~blocked))
        ctx.shape = x.shape
        if inplace:
            ctx.mark_dirty(x)
            return x.clamp_(lower, upper)
        return x.clamp(lower, upper)

    @staticmethod
    def backward(ctx, grad_out):
        (packed,) = ctx.saved_tensors
        passes = unpack_mask(packed, ctx.shape)
        return grad_out.masked_fill(~passes, 0), None, None, None


def _needs_graph(x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


def packed_relu(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``F.relu`` whose backward keeps a bit-packed mask (1 bit per element).

    The input gradient equals autograd's exactly.  Without a graph to build (input
    not requiring grad, or grad disabled) this is plain ``F.relu``.
    """
    if not _needs_graph(x):
        return F.relu(x, inplace=inplace)
    return _PackedClamp.apply(x, 0.0, None, inplace)


def packed_relu6(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``F.relu6`` whose backward keeps a bit-packed mask of ``0 < x < 6``; exact."""
    if not _needs_graph(x):
        return F.relu6(x, inplace=inplace)
    return _PackedClamp.apply(x, 0.0, 6.0, inplace)


class _LeanMixin:
    """Keeps the replaced module (outside the module tree) and its forward hooks."""

    def _adopt(self, original: nn.Module) -> None:
        self.train(original.training)
        # e.g. freeze_batchnorm's eval pre-hook must keep acting on the swapped module
        self._forward_pre_hooks.update(original._forward_pre_hooks)
        self._forward_pre_hooks_with_kwargs.update(original._forward_pre_hooks_with_kwargs)
        self._forward_hooks.update(original._forward_hooks)
        self._forward_hooks_with_kwargs.update(original._forward_hooks_with_kwargs)
        self._forward_hooks_always_called.update(original._forward_hooks_always_called)
        self.__dict__.update(
            {k: v for k, v in original.__dict__.items() if k.startswith("_lance_")}
        )
        object.__setattr__(self, "_original", original)


class LeanReLU(_LeanMixin, nn.ReLU):
    """``nn.ReLU`` keeping a 1-bit mask for backward (see :func:`packed_relu`)."""

    def __init__(self, relu: nn.ReLU) -> None:
        nn.ReLU.__init__(self, inplace=relu.inplace)
        self._adopt(relu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_relu(x, self.inplace)


class LeanReLU6(_LeanMixin, nn.ReLU6):
    """``nn.ReLU6`` keeping a 1-bit mask for backward (see :func:`packed_relu6`)."""

    def __init__(self, relu6: nn.ReLU6) -> None:
        nn.ReLU6.__init__(self, inplace=relu6.inplace)
        self._adopt(relu6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_relu6(x, self.inplace)


class _PackedDropout(torch.autograd.Function):
    """Dropout keeping its keep-mask bit-packed instead of a float (CPU) or bool mask."""

    @staticmethod
    def forward(ctx, x, p, inplace):
        # the draws of PyTorch's CPU dropout: bernoulli_(1 - p), scaled by 1 / (1 - p)
        noise = torch.empty_like(x).bernoulli_(1 - p).div_(1 - p)
        ctx.save_for_backward(pack_mask(noise != 0))
        ctx.shape, ctx.p = x.shape, p
        if inplace:
            ctx.mark_dirty(x)
            return x.mul_(noise)
        return x * noise

    @staticmethod
    def backward(ctx, grad_out):
        (packed,) = ctx.saved_tensors
        noise = unpack_mask(packed, ctx.shape).to(grad_out.dtype).div_(1 - ctx.p)
        return grad_out * noise, None, None


def packed_dropout(
    x: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False
) -> torch.Tensor:
    """``F.dropout`` whose backward keeps a bit-packed keep-mask (1 bit per element).

    On CPU it draws exactly PyTorch's dropout mask (same generator calls), so outputs
    and gradients equal ``F.dropout``'s under the same seed.  On CUDA PyTorch uses a
    fused kernel with other draws: this is then the same dropout with other random
    numbers.  Outside training, for ``p == 0`` or ``p == 1``, or without a graph to
    build, it is plain ``F.dropout``.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability must lie in [0, 1], got {p}")
    if not training or p in (0.0, 1.0) or not _needs_graph(x):
        return F.dropout(x, p, training, inplace)
    return _PackedDropout.apply(x, p, inplace)


class LeanDropout(_LeanMixin, nn.Dropout):
    """``nn.Dropout`` keeping a 1-bit mask for backward (see :func:`packed_dropout`)."""

    def __init__(self, dropout: nn.Dropout) -> None:
        nn.Dropout.__init__(self, dropout.p, dropout.inplace)
        self._adopt(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_dropout(x, self.p, self.training, self.inplace)


# --------------------------------------------------------------------------------------
# BatchNorm with running statistics as a per-channel affine map
# --------------------------------------------------------------------------------------


def _channel_view(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t.view(1, -1, *([1] * (ndim - 2)))


class _LeanBatchNormFunction(torch.autograd.Function):
    """Eval-mode BatchNorm keeping ``scale`` (and, for a trainable weight, a core of x_hat).

    ``factors`` is ``None`` (no weight gradient wanted) or one entry per input mode,
    giving the core ``x_hat x_1 U_1^T ... x_d U_d^T`` (Eq. 1) that replaces ``x_hat``
    in the weight gradient (Eq. 4).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, mean, var, eps, factors):
        out = F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)
        invstd = torch.rsqrt(var + eps)
        scale = invstd if weight is None else weight * invstd
        ctx.ndim = x.ndim
        ctx.has_core = factors is not None
        if ctx.has_core:
            x_hat = (x - _channel_view(mean, x.ndim)) * _channel_view(invstd, x.ndim)
            present = [u for u in factors if u is not None]
            ctx.where = [u is not None for u in factors]
            ctx.save_for_backward(scale, project(x_hat, factors), *present)
        else:
            ctx.save_for_backward(scale)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        scale, *rest = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        reduce = [0, *range(2, ctx.ndim)]
        if ctx.needs_input_grad[0]:
            grad_x = grad_out * _channel_view(scale, ctx.ndim)
        if ctx.has_core and ctx.needs_input_grad[1]:
            core, *present = rest
            it = iter(present)
            factors = [next(it) if w else None for w in ctx.where]
            grad_w = (grad_out * reconstruct(core, factors)).sum(reduce)
        if ctx.needs_input_grad[2]:
            grad_b = grad_out.sum(reduce)
        return grad_x, grad_w, grad_b, None, None, None, None


class LeanBatchNorm2d(_LeanMixin, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that, with running statistics, keeps only a per-channel scale.

    Shares the original's parameters and buffers.  In evaluation mode with running
    statistics:

    * frozen affine parameters, or only ``bias`` trainable: keeps ``scale`` (``C``
      numbers); exact;
    * trainable ``weight`` and no ``subspace``: PyTorch's BatchNorm (keeps its input);
      exact;
    * trainable ``weight`` and a ``subspace`` of the normalised input (from
      :func:`calibrate_batchnorm`): keeps the core of ``x_hat``; the weight gradient is
      that of the reconstructed ``x_hat`` (approximate, as LANCE's conv weight
      gradient, Eq. 4); input and bias gradients stay exact.

    In training mode, or with ``track_running_stats=False``, it is PyTorch's BatchNorm.
    """

    def __init__(self, bn: nn.BatchNorm2d, subspace: LayerSubspace | None = None) -> None:
        nn.BatchNorm2d.__init__(
            self,
            bn.num_features,
            bn.eps,
            bn.momentum,
            bn.affine,
            bn.track_running_stats,
            device="meta",
        )
        self.weight = bn.weight
        self.bias = bn.bias
        self.running_mean = bn.running_mean
        self.running_var = bn.running_var
        self.num_batches_tracked = bn.num_batches_tracked
        self._where = [] if subspace is None else [u is not None for u in subspace.factors]
        if subspace is not None:
            device = bn.running_mean.device if bn.running_mean is not None else None
            dtype = bn.weight.dtype if bn.weight is not None else torch.get_default_dtype()
            for i, u in enumerate(subspace.factors):
                if u is not None:
                    buf = u.to(device, dtype).clone()  # compact storage, whatever u views
                    self.register_buffer(f"factor_{i}", buf, persistent=False)
        self._adopt(bn)

    @property
    def factors(self) -> list[torch.Tensor | None] | None:
        """Factors of the normalised input's subspace, or ``None`` (exact mode)."""
        if not self._where:
            return None
        return [getattr(self, f"factor_{i}") if w else None for i, w in enumerate(self._where)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        affine_grad = self.affine and (self.weight.requires_grad or self.bias.requires_grad)
        lean = (
            not self.training
            and self.running_mean is not None
            and torch.is_grad_enabled()
            and (x.requires_grad or affine_grad)
        )
        weight_grad = self.affine and self.weight.requires_grad
        if not lean or (weight_grad and self.factors is None):
            return nn.BatchNorm2d.forward(self, x)
        factors = self.factors if weight_grad else None
        if factors is not None and len(factors) != x.ndim:
            raise ValueError(f"BatchNorm subspace has {len(factors)} modes, input {x.ndim}")
        if factors is not None:
            for i, u in enumerate(factors):
                if u is not None and u.shape[0] != x.shape[i]:
                    raise ValueError(
                        f"BatchNorm input mode {i} has size {x.shape[i]}, calibrated for "
                        f"{u.shape[0]}; recalibrate (calibrate_batchnorm) for this input"
                    )
        return _LeanBatchNormFunction.apply(
            x,
            self.weight,
            self.bias,
            self.running_mean,
            self.running_var,
            self.eps,
            None if factors is None else tuple(factors),
        )


def calibrate_batchnorm(
    model: nn.Module,
    loader: Iterable[Any],
    layers: Iterable[str] | str,
    eps: float = 0.7,
    num_batches: int = 100,
    modes: Any = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
) -> Subspaces:
    """One-shot subspaces of BatchNorm layers' normalised inputs (the approximate option).

    The same Phase I as :func:`lance_lib.calibration.calibrate` (running mode
    covariances, Eq. 2; energy rank, Eq. 3), applied to
    ``x_hat = (x - running_mean) / sqrt(running_var + eps)``, the tensor a trainable
    BatchNorm weight's gradient needs.  ``modes`` as in ``calibrate``.  Layers must be
    ``BatchNorm2d`` with running statistics; the model runs in eval mode, unchanged.
    Returns subspaces of kind ``"batchnorm2d"`` for :func:`make_lean`'s
    ``batchnorm_subspaces``.
    """
    eps = check_eps(eps)
    if int(num_batches) < 1:
        raise ValueError(f"num_batches must be at least 1, got {num_batches}")
    names = [layers] if isinstance(layers, str) else list(layers)
    modules = dict(model.named_modules())
    for name in names:
        m = modules.get(name)
        if not isinstance(m, nn.BatchNorm2d) or m.running_mean is None:
            raise KeyError(f"{name!r} is not a BatchNorm2d with running statistics")
    check_modes(modes, names)
    covs: dict[str, list[ModeCovariance | None]] = {}
    shapes: dict[str, tuple[int, ...]] = {}

    def make_hook(name: str) -> Callable[..., None]:
        def hook(m: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0]
            x_hat = (x - _channel_view(m.running_mean, x.ndim)) * _channel_view(
                torch.rsqrt(m.running_var + m.eps), x.ndim
            )
            if name not in covs:
                chosen = resolve_modes(modes, x.ndim, name, feature=1)
                covs[name] = [
                    ModeCovariance(n) if i in chosen else None for i, n in enumerate(x.shape)
                ]
                shapes[name] = tuple(x.shape)
            for i, cov in enumerate(covs[name]):
                if cov is not None:
                    cov.update(x_hat, i)

        return hook

    run = forward or (lambda m, b: m(b[0] if isinstance(b, (list, tuple)) else b))
    flags = {m: m.training for m in model.modules()}
    handles = [modules[n].register_forward_pre_hook(make_hook(n)) for n in names]
    try:
        model.eval()
        with torch.no_grad():
            for index, batch in enumerate(loader):
                if index >= num_batches:
                    break
                run(model, batch)
    finally:
        for h in handles:
            h.remove()
        for m, flag in flags.items():
            m.training = flag
    missing = [n for n in names if n not in covs]
    if missing:
        raise ValueError(f"BatchNorm layers {missing} were never called during calibration")
    result = {}
    for name, mode_covs in covs.items():
        shape = shapes[name]
        factors, ranks, energy = [], [], []
        for i, cov in enumerate(mode_covs):
            if cov is None:
                factors.append(None)
                ranks.append(shape[i])
                energy.append(1.0)
                continue
            sub = leading_subspace(cov.cov, eps)
            factors.append(sub.basis.contiguous())
            ranks.append(sub.rank)
            energy.append(sub.energy)
        result[name] = LayerSubspace(factors, ranks, energy, shape, "batchnorm2d")
    settings = {"eps": eps, "num_batches": int(num_batches), "modes": modes_jsonable(modes)}
    return Subspaces(result, settings)


# --------------------------------------------------------------------------------------
# Swapping
# --------------------------------------------------------------------------------------

_LEAN_TYPES = (LeanReLU, LeanReLU6, LeanDropout, LeanBatchNorm2d)


def is_lean(module: nn.Module) -> bool:
    """Whether ``module`` is one of the lean replacements of this module."""
    return isinstance(module, _LEAN_TYPES)


def _in_region(name: str, region: list[str] | None) -> bool:
    return region is None or any(name == r or name.startswith(r + ".") or r == "" for r in region)


def make_lean(
    model: nn.Module,
    region: str | Iterable[str] | None = None,
    *,
    batchnorm_subspaces: Mapping[str, LayerSubspace] | None = None,
) -> nn.Module:
    """Swap in the lean companions (in place); returns ``model``.

    Every ``nn.ReLU``, ``nn.ReLU6``, ``nn.Dropout`` and ``nn.BatchNorm2d`` at or under
    a name in ``region`` (module names, e.g. ``["layer4", "fc"]``; default the whole
    model) becomes :class:`LeanReLU`, :class:`LeanReLU6`, :class:`LeanDropout` or
    :class:`LeanBatchNorm2d`.
    Subclasses with their own forward are left alone.  Lean modules fall back to the
    plain operation where no gradient is needed, so the default covers exactly the
    trainable region as autograd sees it.

    Parameters
    ----------
    model
        Any model; modules reused in several places (torchvision's BasicBlock calls
        one ReLU twice) are swapped once and stay shared.
    region
        Module names whose subtrees are made lean.
    batchnorm_subspaces
        Approximate option: subspaces of BatchNorm normalised inputs
        (:func:`calibrate_batchnorm`) for BatchNorms with a trainable weight; those
        keep a core instead of their input.  Without it every lean module is exact.

    Raises
    ------
    KeyError
        A name in ``region`` or ``batchnorm_subspaces`` is not a module of ``model``
        (or not a BatchNorm2d).
    """
    names = None if region is None else ([region] if isinstance(region, str) else list(region))
    modules = dict(model.named_modules())
    unknown = [n for n in (names or []) if n not in modules]
    if unknown:
        raise KeyError(f"no such modules in the model: {unknown}")
    subs = dict(batchnorm_subspaces or {})
    for name in subs:
        module = modules.get(name)
        if not isinstance(getattr(module, "_original", module), nn.BatchNorm2d):
            raise KeyError(f"batchnorm_subspaces names {name!r}, which is not a BatchNorm2d")
    undo_lean(model)
    done: dict[int, nn.Module] = {}
    for name, m in list(model.named_modules(remove_duplicate=False)):
        if not name or not _in_region(name, names):
            continue
        if id(m) in done:
            set_submodule(model, name, done[id(m)])
            continue
        if type(m) is nn.ReLU:
            new: nn.Module = LeanReLU(m)
        elif type(m) is nn.ReLU6:
            new = LeanReLU6(m)
        elif type(m) is nn.Dropout:
            new = LeanDropout(m)
        elif type(m) is nn.BatchNorm2d:
            new = LeanBatchNorm2d(m, subs.get(name))
        else:
            continue
        done[id(m)] = new
        set_submodule(model, name, new)
    return model


def undo_lean(model: nn.Module) -> nn.Module:
    """Put back the modules replaced by :func:`make_lean`; in place."""
    for name, m in list(model.named_modules(remove_duplicate=False)):
        if name and is_lean(m):
            original = m._original
            original.train(m.training)
            set_submodule(model, name, original)
    return model
