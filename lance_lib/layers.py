"""Phase II of LANCE: Conv2d and Linear layers that keep only the activation core.

In the forward pass the layer input ``X`` is projected to the core
``G = X x_1 U_1^T ... x_d U_d^T`` (Eq. 1); autograd keeps ``G`` (and references to
the layer's weight and the shared factors ``U_i``), never ``X``.  In the backward
pass

* the input gradient is exact: it needs only the weights;
* the weight gradient is that of the reconstructed input
  ``X_tilde = G x_1 U_1 ... x_d U_d`` (Eq. 4), exactly, whichever modes are
  compressed.  It is computed in the compressed space wherever that saves work (see
  :func:`conv2d_weight_from_core` and :func:`linear_weight_from_core`);
* the bias gradient is exact.

Theorem 1 and its scope
-----------------------
Theorem 1 of LANCE states that the weight gradient from the core is the full gradient
right-multiplied by a projector, ``dW_tilde = dW P``, so that
``<dW_tilde, dW> = ||dW P||^2 >= 0``: the compressed gradient never points away from
the full one.  That holds exactly when **only the feature mode** (the channels of a
Conv2d input, the last mode of a Linear input: the mode the weights act on) is
projected: then ``X_tilde = X x_d (U_d U_d^T)`` and, the weight acting on that mode,
``dW_tilde = dW (U_d U_d^T)`` (per kernel position for a convolution).

When the batch mode or a spatial / token mode is projected as well (Eq. 1 as written
projects every mode), ``dW_tilde`` is still exactly the gradient of the projected
input, but the projection now mixes samples or positions *before* they meet the
output gradient: ``dW_tilde = sum_{b,b'} (U_B U_B^T)[b, b'] delta_b^T x_b'`` is not
``dW`` times a projector, and ``<dW_tilde, dW>`` can be negative: for a Linear layer
on ``16 x 10`` inputs with fixed (calibrated) factors of batch rank 2 and feature
rank 5, about one random batch in ten gives a negative cosine to the full gradient,
while with the feature factor alone the cosine is never negative
(``tests/test_layers.py::test_theorem1_*``).  This is why the fine-tuning harness
compresses the channel mode only by default (``modes="channel"``) and keeps
``"all"`` (Eq. 1 as written) and ``"no_batch"`` as options.

:func:`compress` swaps chosen modules for their LANCE versions in place;
:func:`restore` (or the :func:`compressed` context manager) puts the originals back.
The LANCE modules subclass ``nn.Conv2d`` / ``nn.Linear`` and share the original
``Parameter`` objects, so optimisers, ``state_dict`` keys and ``isinstance`` checks
are unaffected.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .calibration import check_compressible, resolve_layers
from .core_storage import CoreCodec, core_codec
from .models.surgery import set_submodule
from .subspaces import LayerSubspace, Subspaces

__all__ = [
    "LanceConv2d",
    "LanceLinear",
    "check_input_shape",
    "check_subspace_fits",
    "compress",
    "compressed",
    "conv2d_input_grad",
    "conv2d_weight_from_core",
    "fast_project",
    "fast_reconstruct",
    "lance_conv2d",
    "lance_linear",
    "linear_weight_from_core",
    "mode_dot",
    "restore",
    "unprofitable_reason",
]

Factors = Sequence[torch.Tensor | None]


def check_input_shape(x: torch.Tensor, factors: Factors, layer: str = "layer") -> None:
    """Raise a clear error when ``x`` does not fit the calibrated factors.

    A calibrated batch factor ``U_1`` is ``(B, r_1)``: it cannot project a batch of
    another size.
    """
    if len(factors) != x.ndim:
        raise ValueError(
            f"{layer}: input has {x.ndim} modes {tuple(x.shape)}, but {len(factors)} "
            "factors were calibrated"
            + (
                "; a Conv2d takes batched (B, C, H, W) inputs: add the batch dimension "
                "(x.unsqueeze(0))"
                if len(factors) == 4 and x.ndim == 3
                else "; recalibrate on inputs of this shape"
            )
        )
    for i, u in enumerate(factors):
        if u is not None and u.shape[0] != x.shape[i]:
            if i == 0:
                raise ValueError(
                    f"{layer}: batch of size {x.shape[0]}, but the batch mode was calibrated "
                    f"for batches of {u.shape[0]}. Use drop_last=True in the DataLoader (and "
                    "the calibrated batch size), or calibrate with modes that exclude the "
                    "batch mode (modes=(1, 2, 3) for Conv2d) to accept any batch size."
                )
            raise ValueError(
                f"{layer}: input mode {i} has size {x.shape[i]}, but it was calibrated with "
                f"size {u.shape[0]} (input shape {tuple(x.shape)}); recalibrate for this "
                "input size"
            )


def mode_dot(x: torch.Tensor, u: torch.Tensor, mode: int, transpose: bool) -> torch.Tensor:
    """``x x_mode u^T`` (``transpose``, Eq. 1) or ``x x_mode u`` (Eq. 4) as one matmul.

    The mode product is taken on a view of ``x`` - ``(lead, n_mode, trail)``, or
    ``(..., n_mode)`` for the last mode - so no unfolding / folding copy is made (the
    hot-path counterpart of :func:`lance_lib.hosvd.project`, which goes through
    TensorLy's ``unfold`` / ``fold`` and stays the reference it is tested against).
    """
    if mode == x.ndim - 1:
        return x @ u if transpose else x @ u.T
    lead, trail = math.prod(x.shape[:mode]), math.prod(x.shape[mode + 1 :])
    m = u.T if transpose else u
    y = torch.matmul(m, x.reshape(lead, x.shape[mode], trail))
    return y.reshape(*x.shape[:mode], m.shape[0], *x.shape[mode + 1 :])


def fast_project(x: torch.Tensor, factors: Factors) -> torch.Tensor:
    """Core ``G = X x_1 U_1^T ... x_d U_d^T`` of Eq. (1), one matmul per compressed mode."""
    for mode, u in enumerate(factors):
        if u is not None:
            x = mode_dot(x, u, mode, transpose=True)
    return x


def fast_reconstruct(core: torch.Tensor, factors: Factors) -> torch.Tensor:
    """``X_tilde = G x_1 U_1 ... x_d U_d`` (Eq. 4), one matmul per compressed mode."""
    for mode, u in enumerate(factors):
        if u is not None:
            core = mode_dot(core, u, mode, transpose=False)
    return core


def _placeholder(like: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """An uninitialised tensor of ``shape`` whose values are never read.

    The shape argument of ``aten.convolution_backward``; a dense one (not an expanded
    scalar) keeps the op on its fast CPU kernels, it lives for the one call only.
    """
    return like.new_empty(tuple(shape))


def conv2d_input_grad(
    x_shape: Sequence[int],
    weight: torch.Tensor,
    grad_output: torch.Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> torch.Tensor:
    """Exact Conv2d input gradient: it needs only the weights, never the stored input.

    ``aten.convolution_backward`` with output mask ``(True, False, False)``; ``weight``
    is cast to the output gradient's dtype (autocast keeps the parameter in float32).
    """
    return torch.ops.aten.convolution_backward(
        grad_output,
        _placeholder(grad_output, x_shape),
        weight.to(grad_output.dtype),
        None,
        list(stride),
        list(padding),
        list(dilation),
        False,
        [0, 0],
        groups,
        [True, False, False],
    )[0]


def _conv2d_weight(
    x: torch.Tensor,
    weight_shape: Sequence[int],
    grad_output: torch.Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> torch.Tensor:
    """Conv2d weight gradient, ``aten.convolution_backward`` with mask (False, True, False)."""
    return torch.ops.aten.convolution_backward(
        grad_output,
        x,
        _placeholder(grad_output, weight_shape),
        None,
        list(stride),
        list(padding),
        list(dilation),
        False,
        [0, 0],
        groups,
        [False, True, False],
    )[1]


def conv2d_weight_from_core(
    core: torch.Tensor,
    factors: Factors,
    grad_output: torch.Tensor,
    weight_shape: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> torch.Tensor:
    """Conv2d weight gradient of the reconstructed input, Eq. (4), in compressed space.

    ``dW = conv2d_weight(G x_1 U_B x_2 U_C x_3 U_H x_4 U_W, delta)`` computed as:

    1. spatial modes are reconstructed (the sliding window needs every pixel):
       ``Z = G x_3 U_H x_4 U_W`` of shape ``(r_B, r_C, H, W)``;
    2. the batch factor moves to the output gradient,
       ``delta' = delta x_1 U_B^T`` (``(r_B, O, H', W')``), since
       ``sum_b conv(sum_k U_B[b,k] Z_k, delta_b) = sum_k conv(Z_k, delta'_k)``;
    3. the channel factor stays compressed when ``r_C < C / groups``: the weight
       gradient is taken with ``r_C`` input channels, ``dW_r`` of shape
       ``(O, r_C, kh, kw)`` (``aten.convolution_backward``, weight mask only; one
       batched matmul for a pointwise conv), and
       expanded at the end with one matmul, ``dW = dW_r x_2 U_C`` (per group).
       Otherwise ``Z`` is expanded along channels first, which is cheaper.

    All three steps are exact rewritings: the result equals
    ``torch.nn.grad.conv2d_weight(reconstruct(core, factors), ...)``
    (``tests/test_layers.py::test_fast_conv_gradients_match_tensorly_reference``).
    Every tensor is taken in ``grad_output``'s dtype.
    """
    dtype = grad_output.dtype
    u_b, u_c, u_h, u_w = (None if u is None else u.to(dtype) for u in factors)
    out_ch, cin_per_group, kh, kw = weight_shape
    if core.numel() == 0:
        return grad_output.new_zeros(weight_shape)
    z = fast_reconstruct(core.to(dtype), [None, None, u_h, u_w])
    delta = grad_output if u_b is None else mode_dot(grad_output, u_b, 0, transpose=True)
    if u_c is None or u_c.shape[1] >= cin_per_group:
        if u_c is not None:
            z = mode_dot(z, u_c, 1, transpose=False)
        return _conv2d_weight(z, weight_shape, delta, stride, padding, dilation, groups)
    r_c = u_c.shape[1]
    if (kh, kw) == (1, 1) and tuple(stride) == (1, 1) and tuple(padding) == (0, 0):
        # pointwise: dW_r = sum_b delta_b Z_b^T, one batched matmul (faster than the
        # convolution kernels on r_C input channels)
        rows = delta.shape[0]
        dw_r = torch.matmul(
            delta.reshape(rows, out_ch, -1), z.reshape(rows, r_c, -1).transpose(1, 2)
        ).sum(0)
    else:
        dw_r = _conv2d_weight(z, (out_ch, r_c, kh, kw), delta, stride, padding, dilation, 1)
    # dW[g, o, c] = sum_j U_C[g, c, j] dW_r[g, o, j]: one batched matmul over (g, o)
    dw_r = dw_r.reshape(groups, out_ch // groups, r_c, kh * kw)
    u_groups = u_c.reshape(groups, 1, cin_per_group, r_c)
    return torch.matmul(u_groups, dw_r).reshape(weight_shape)


def linear_weight_from_core(
    core: torch.Tensor, factors: Factors, grad_output: torch.Tensor
) -> torch.Tensor:
    """Linear weight gradient of the reconstructed input, Eq. (4), in compressed space.

    For an input ``(n_1, ..., n_{d-1}, F)`` and output gradient
    ``delta`` ``(n_1, ..., n_{d-1}, O)``: the leading factors move to the output
    gradient, ``delta' = delta x_1 U_1^T ... x_{d-1} U_{d-1}^T``, the compressed leading
    modes are contracted with the core, ``dW_r = delta'^T G`` (``(O, r_d)``), and the
    feature factor is expanded at the end, ``dW = dW_r U_d^T``.  Exact rewriting of
    ``delta^T X_tilde``, in ``grad_output``'s dtype.
    """
    dtype = grad_output.dtype
    factors = [None if u is None else u.to(dtype) for u in factors]
    if core.numel() == 0:
        return grad_output.new_zeros(grad_output.shape[-1], factors[-1].shape[0])
    delta = fast_project(grad_output, list(factors[:-1]) + [None])
    dw_r = delta.reshape(-1, delta.shape[-1]).T @ core.to(dtype).reshape(-1, core.shape[-1])
    u_f = factors[-1]
    return dw_r if u_f is None else dw_r @ u_f.T


def _saved(ctx) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, list[torch.Tensor | None]]:
    """``(packed core, weight, factors)`` saved by a LANCE Function's forward."""
    saved = ctx.saved_tensors
    n = ctx.n_packed
    it = iter(saved[n + 1 :])
    return saved[:n], saved[n], [next(it) if w else None for w in ctx.where]


class _LanceConv2dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, factors, conf, codec):
        stride, padding, dilation, groups = conf
        out = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        packed = codec.encode(fast_project(x, factors), 1)
        present = [u for u in factors if u is not None]
        ctx.save_for_backward(*packed, weight, *present)
        ctx.n_packed = len(packed)
        ctx.where = [u is not None for u in factors]
        ctx.x_meta = (tuple(x.shape), x.dtype)
        ctx.conf = conf
        ctx.codec = codec
        return out

    @staticmethod
    def backward(ctx, grad_out):
        packed, weight, factors = _saved(ctx)
        stride, padding, dilation, groups = ctx.conf
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            x_shape, x_dtype = ctx.x_meta
            grad_x = conv2d_input_grad(x_shape, weight, grad_out, stride, padding, dilation, groups)
            grad_x = grad_x.to(x_dtype)
        if ctx.needs_input_grad[1]:
            core = ctx.codec.decode(packed, grad_out.dtype)
            grad_w = conv2d_weight_from_core(
                core, factors, grad_out, weight.shape, stride, padding, dilation, groups
            ).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_b = grad_out.sum(dim=(0, 2, 3)).to(weight.dtype)
        return grad_x, grad_w, grad_b, None, None, None


class _LanceLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, factors, codec):
        out = F.linear(x, weight, bias)
        packed = codec.encode(fast_project(x, factors), -1)
        present = [u for u in factors if u is not None]
        ctx.save_for_backward(*packed, weight, *present)
        ctx.n_packed = len(packed)
        ctx.where = [u is not None for u in factors]
        ctx.x_dtype = x.dtype
        ctx.codec = codec
        return out

    @staticmethod
    def backward(ctx, grad_out):
        packed, weight, factors = _saved(ctx)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_out @ weight.to(grad_out.dtype)).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            core = ctx.codec.decode(packed, grad_out.dtype)
            grad_w = linear_weight_from_core(core, factors, grad_out).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0).to(weight.dtype)
        return grad_x, grad_w, grad_b, None, None


def lance_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    factors: Factors,
    stride: Sequence[int] = (1, 1),
    padding: Sequence[int] = (0, 0),
    dilation: Sequence[int] = (1, 1),
    groups: int = 1,
    core_dtype: torch.dtype | str | None = None,
) -> torch.Tensor:
    """``F.conv2d`` whose autograd keeps only the core of ``x`` (Eq. 1, Eq. 4).

    ``factors`` holds ``(U_B, U_C, U_H, U_W)``, ``None`` for uncompressed modes.  Also
    the building block of the per-step baselines (HOSVD, ASI), which pass factors
    computed at every step.  ``core_dtype``: how the core is stored
    (:mod:`lance_lib.core_storage`).
    """
    check_input_shape(x, factors, "conv2d")
    conf = (tuple(stride), tuple(padding), tuple(dilation), groups)
    return _LanceConv2dFunction.apply(x, weight, bias, tuple(factors), conf, core_codec(core_dtype))


def lance_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    factors: Factors,
    core_dtype: torch.dtype | str | None = None,
) -> torch.Tensor:
    """``F.linear`` whose autograd keeps only the core of ``x`` (Eq. 1, Eq. 4).

    ``x`` is ``(n_1, ..., n_{d-1}, F)``; ``factors`` has one entry per mode.
    """
    check_input_shape(x, factors, "linear")
    return _LanceLinearFunction.apply(x, weight, bias, tuple(factors), core_codec(core_dtype))


def unprofitable_reason(module: nn.Module, subspace: LayerSubspace) -> str | None:
    """Why keeping ``module``'s core would not save memory, or ``None`` when it does.

    * a depthwise Conv2d (``groups == in_channels > 1``): its input is the output of
      the activation before it, which autograd keeps anyway (an in-place ReLU6 in
      MobileNetV2), and its weight gradient needs the input expanded to every
      channel, so the core saves nothing and costs a reconstruction per step;
    * a core with as many elements as the input (every calibrated rank full).
    """
    if isinstance(module, nn.Conv2d) and module.groups == module.in_channels > 1:
        return "depthwise conv: its input is kept anyway by the activation before it"
    if math.prod(subspace.ranks) >= math.prod(subspace.input_shape):
        return f"core {tuple(subspace.ranks)} is as large as the input {subspace.input_shape}"
    return None


class _LanceMixin:
    """Shared plumbing of the LANCE modules: factor buffers and the original module."""

    def _adopt(
        self,
        original: nn.Module,
        subspace: LayerSubspace,
        name: str,
        codec: CoreCodec,
        uncompressed: str | None,
    ) -> None:
        self.weight = original.weight
        self.bias = original.bias
        self.train(original.training)
        self.layer_name = name
        self.ranks = list(subspace.ranks)
        self.codec = codec
        self.uncompressed = uncompressed
        self._checked_shape: torch.Size | None = None
        self._where = [u is not None for u in subspace.factors]
        for i, u in enumerate(subspace.factors):
            if u is not None:
                buf = u.to(device=original.weight.device, dtype=original.weight.dtype)
                self.register_buffer(f"factor_{i}", buf, persistent=False)
        # kept outside the module tree so it is not a submodule
        object.__setattr__(self, "_original", original)

    @property
    def compressed(self) -> bool:
        """Whether the layer keeps only the core (``False``: see :attr:`uncompressed`)."""
        return self.uncompressed is None

    @property
    def factors(self) -> list[torch.Tensor | None]:
        """The factors ``U_i`` in mode order, ``None`` for uncompressed modes."""
        return [getattr(self, f"factor_{i}") if w else None for i, w in enumerate(self._where)]

    def _check_once(self, x: torch.Tensor) -> None:
        """Check ``x`` against the factors when its shape is new (not on every call)."""
        if x.shape != self._checked_shape:
            check_input_shape(x, self.factors, self.layer_name or type(self).__name__)
            self._checked_shape = x.shape

    def extra_repr(self) -> str:
        base = super().extra_repr()
        if not self.compressed:
            return f"{base}, uncompressed ({self.uncompressed})"
        return f"{base}, ranks={self.ranks}, core_dtype={self.codec.label}"


class LanceConv2d(_LanceMixin, nn.Conv2d):
    """Conv2d that keeps only the core of its input for backward (LANCE Phase II).

    With ``uncompressed`` (a reason, see :func:`unprofitable_reason`) it is the plain
    Conv2d: its input is kept as BP keeps it.
    """

    def __init__(
        self,
        conv: nn.Conv2d,
        subspace: LayerSubspace,
        name: str = "",
        core_dtype: torch.dtype | str | None = None,
        uncompressed: str | None = None,
    ) -> None:
        check_compressible(name, conv)
        check_subspace_fits(name, conv, subspace)
        padding = (0, 0) if conv.padding == "valid" else conv.padding
        nn.Conv2d.__init__(
            self,
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            padding,
            conv.dilation,
            conv.groups,
            conv.bias is not None,
            device="meta",
        )
        self._adopt(conv, subspace, name, core_codec(core_dtype), uncompressed)
        self._conf = (tuple(self.stride), tuple(self.padding), tuple(self.dilation), self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.compressed:
            return self._conv_forward(x, self.weight, self.bias)
        self._check_once(x)
        return _LanceConv2dFunction.apply(
            x, self.weight, self.bias, tuple(self.factors), self._conf, self.codec
        )


class LanceLinear(_LanceMixin, nn.Linear):
    """Linear layer that keeps only the core of its input for backward (LANCE Phase II)."""

    def __init__(
        self,
        linear: nn.Linear,
        subspace: LayerSubspace,
        name: str = "",
        core_dtype: torch.dtype | str | None = None,
        uncompressed: str | None = None,
    ) -> None:
        check_subspace_fits(name, linear, subspace)
        nn.Linear.__init__(
            self, linear.in_features, linear.out_features, linear.bias is not None, device="meta"
        )
        self._adopt(linear, subspace, name, core_codec(core_dtype), uncompressed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.compressed:
            return F.linear(x, self.weight, self.bias)
        self._check_once(x)
        return _LanceLinearFunction.apply(
            x, self.weight, self.bias, tuple(self.factors), self.codec
        )


def check_subspace_fits(name: str, module: nn.Module, subspace: LayerSubspace) -> None:
    """Raise if ``subspace`` was not calibrated for a layer like ``module``.

    The kind (Conv2d or Linear), the number of input modes (4 for Conv2d) and the size
    of the feature mode (input channels or features) must match: factors calibrated
    for another layer would fail, or silently mix the wrong directions, in the first
    forward pass.

    Raises
    ------
    TypeError
        ``subspace`` is not a :class:`~lance_lib.subspaces.LayerSubspace`, or its
        kind differs from the module's.
    ValueError
        The modes or the feature size differ; the message names the layer and the fix.
    """
    if not isinstance(subspace, LayerSubspace):
        raise TypeError(
            f"layer {name!r}: expected a LayerSubspace (an entry of calibrate()'s "
            f"result), got {type(subspace).__name__}"
        )
    conv = isinstance(module, nn.Conv2d)
    if conv != (subspace.kind == "conv2d"):
        raise TypeError(
            f"layer {name!r} is a {type(module).__name__}, calibrated as {subspace.kind}; "
            "calibrate this model's layers, or pass the subspaces calibrated for it"
        )
    ndim = len(subspace.input_shape)
    if len(subspace.factors) != ndim or (conv and ndim != 4):
        raise ValueError(
            f"layer {name!r}: the subspace has {len(subspace.factors)} factors for a "
            f"{ndim}-mode input {subspace.input_shape}; recalibrate it with calibrate()"
        )
    expected = module.in_channels if conv else module.in_features
    got = subspace.input_shape[1 if conv else -1]
    if got != expected:
        raise ValueError(
            f"layer {name!r} takes {expected} input {'channels' if conv else 'features'}, "
            f"but its subspace was calibrated on inputs with {got} ({subspace.input_shape}); "
            "calibrate this model's layer, or pass the subspaces calibrated for it"
        )


def compress(
    model: nn.Module,
    subspaces: Subspaces,
    lean: bool = False,
    *,
    core_dtype: torch.dtype | str | None = None,
    keep_unprofitable: bool = False,
) -> nn.Module:
    """Replace the calibrated Conv2d / Linear modules of ``model`` by LANCE versions.

    In place; returns ``model``.  Every layer named in ``subspaces`` must exist, be
    one LANCE can compress (:func:`~lance_lib.calibration.check_compressible`) and fit
    its subspace (:func:`check_subspace_fits`).  Already compressed layers are first
    restored.  All layers are swapped or none: every layer is checked and its LANCE
    version built before the first swap, so an error leaves ``model`` as it was.

    With ``lean=True`` the layers around them are also swapped for their exact lean
    companions (:func:`lance_lib.lean.make_lean`): ReLU / ReLU6 keep a 1-bit mask
    instead of their output, BatchNorm with running statistics and frozen weight
    keeps only a per-channel scale, so the whole trainable region - not only the
    compressed layers' inputs - keeps little for backward.  Gradients are unchanged.
    ``lean=False`` undoes earlier lean swaps, if any.

    ``core_dtype`` stores the cores in lower precision (``torch.bfloat16``,
    ``torch.float16``, or ``torch.int8`` with a per-channel scale; see
    :mod:`lance_lib.core_storage`); the factors stay in the parameters' dtype.

    Layers whose core would not save memory (:func:`unprofitable_reason`: depthwise
    convs, cores as large as the input) are swapped for LANCE modules that run
    uncompressed (``module.compressed`` is ``False``, the repr says why, the memory
    accounting counts their full input); ``keep_unprofitable=True`` compresses them
    too (the behaviour before this option existed).

    Raises
    ------
    TypeError
        ``subspaces`` is not a mapping of :class:`~lance_lib.subspaces.LayerSubspace`,
        or a layer is of another kind than it was calibrated as.
    KeyError, ValueError
        A layer that does not exist, cannot be compressed, or does not fit its
        subspace; ``model`` is left unchanged.
    """
    from . import lean as lean_module  # imported lazily: no import cycle through layers

    if not isinstance(subspaces, Mapping):
        raise TypeError(
            f"subspaces must be the result of calibrate() (a Subspaces mapping of layer "
            f"names to LayerSubspace), got {type(subspaces).__name__}"
        )
    codec = core_codec(core_dtype)
    modules = resolve_layers(model, list(subspaces))
    replacements: dict[str, nn.Module] = {}
    for name, module in modules.items():
        sub = subspaces[name]
        original = getattr(module, "_original", module)
        check_subspace_fits(name, original, sub)
        cls = LanceConv2d if sub.kind == "conv2d" else LanceLinear
        reason = None if keep_unprofitable else unprofitable_reason(original, sub)
        replacements[name] = cls(original, sub, name, codec.dtype, reason)
    for name, module in replacements.items():
        set_submodule(model, name, module)
    if lean:
        lean_module.make_lean(model)
    else:
        lean_module.undo_lean(model)
    return model


def restore(model: nn.Module) -> nn.Module:
    """Put back the original modules replaced by :func:`compress` (lean ones too); in place."""
    from . import lean as lean_module

    for name, module in list(model.named_modules()):
        if isinstance(module, (LanceConv2d, LanceLinear)):
            original = module._original
            original.train(module.training)
            set_submodule(model, name, original)
    lean_module.undo_lean(model)
    return model


@contextmanager
def compressed(model: nn.Module, subspaces: Subspaces) -> Iterator[nn.Module]:
    """Context manager: ``model`` compressed inside the block, restored after it."""
    compress(model, subspaces)
    try:
        yield model
    finally:
        restore(model)
