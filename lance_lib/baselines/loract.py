"""LoRAct baseline: online low-rank factorisation of each activation with a row sketch.

After "Memory-Efficient Fine-Tuning via Low-Rank Activation Compression" (LoRAct,
arXiv:2509.23472).  At every training step the layer input is flattened to a matrix
``A`` of shape ``(L, n)``, with ``n`` the features the weight acts on:

* Conv2d: ``(B H W, C)``, the channel-last view (each pixel of each image is a row);
* Linear: ``(prod of leading modes, features)``.

A sketch of ``k = ceil(rank_ratio * n)`` rows of ``A``, drawn uniformly without
replacement, is orthonormalised by a reduced QR of its transpose, giving ``Q`` of shape
``(n, k)``, an orthonormal basis of the sampled rows' span.  Autograd keeps ``A Q``
(``(L, k)``) and ``Q``, that is ``L k + n k`` elements instead of ``L n``; the backward
pass reconstructs ``A_tilde = (A Q) Q^T`` for the weight gradient.  The input and bias
gradients are exact.  No calibration data is used.

Notes
-----
The channel-last flattening is chosen because it is the convolutional analogue of
LoRAct's ``(tokens, hidden)`` activations: the weight acts on the channel mode, and
``(B, C H W)`` would leave at most ``B`` rows, so any rank ratio above ``B / (C H W)``
would store more than the input.  With ``k = n`` the basis ``Q`` is square and
orthogonal, ``A_tilde = A``, and the gradients are exactly BP's.  Rows are sampled
with a per-layer ``torch.Generator`` seeded at construction, so a run is reproducible.
LoRAct's optional power iterations are not used (plain sketch, as the issue specifies).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import conv2d_input_grad
from .hosvd_step import PerStepLayer, init_like

__all__ = ["LoRActConv2d", "LoRActLinear", "loract_rank", "row_sketch"]


def loract_rank(n: int, rank_ratio: float, rows: int | None = None) -> int:
    """``k = ceil(rank_ratio * n)``, capped by the number of rows ``rows``."""
    if not 0.0 < rank_ratio <= 1.0:
        raise ValueError(f"rank_ratio must lie in (0, 1], got {rank_ratio}")
    k = max(1, math.ceil(rank_ratio * n - 1e-9))
    return min(k, n) if rows is None else min(k, n, rows)


def row_sketch(a: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Orthonormal basis ``Q`` (``(n, k)``) of the span of ``k`` uniformly sampled rows of ``a``.

    ``a`` is ``(L, n)`` with ``k <= min(L, n)``.  The rows are drawn without
    replacement from ``generator`` (a CPU generator); ``Q`` comes from the reduced QR
    of the sampled rows' transpose.
    """
    rows = torch.randperm(a.shape[0], generator=generator)[:k].to(a.device)
    q, _ = torch.linalg.qr(a.index_select(0, rows).T)
    return q


class _LoRActConv2dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, k, generator, stride, padding, dilation, groups):
        out = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        with torch.no_grad():
            a = x.detach().permute(0, 2, 3, 1).reshape(-1, x.shape[1])
            q = row_sketch(a, k, generator)
            aq = a @ q
        ctx.save_for_backward(aq, q, weight)
        ctx.conf = (tuple(x.shape), stride, padding, dilation, groups, bias is not None)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        aq, q, weight = ctx.saved_tensors
        x_shape, stride, padding, dilation, groups, has_bias = ctx.conf
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = conv2d_input_grad(x_shape, weight, grad_out, stride, padding, dilation, groups)
        if ctx.needs_input_grad[1]:
            b, c, h, w = x_shape
            x_tilde = (aq @ q.T).reshape(b, h, w, c).permute(0, 3, 1, 2)
            grad_w = torch.nn.grad.conv2d_weight(
                x_tilde,
                weight.shape,
                grad_out,
                stride=stride,
                padding=padding,
                dilation=dilation,
                groups=groups,
            )
        if has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum(dim=(0, 2, 3))
        return grad_x, grad_w, grad_b, None, None, None, None, None, None


class _LoRActLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, k, generator):
        out = F.linear(x, weight, bias)
        with torch.no_grad():
            a = x.detach().reshape(-1, x.shape[-1])
            q = row_sketch(a, k, generator)
            aq = a @ q
        ctx.save_for_backward(aq, q, weight)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        aq, q, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        g = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ weight
        if ctx.needs_input_grad[1]:
            # dW = g^T (A Q) Q^T, contracted in the rank-k space first
            grad_w = (g.T @ aq) @ q.T
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum(0)
        return grad_x, grad_w, grad_b, None, None


class _LoRAct(PerStepLayer):
    """LoRAct: per-step sampled-row sketch of the flattened input, rank ``ratio * n``."""

    def __init__(
        self, original: nn.Module, name: str = "", *, rank_ratio: float = 0.25, seed: int = 0
    ) -> None:
        init_like(self, original, name)
        loract_rank(1, rank_ratio)  # validates the ratio
        self.rank_ratio = float(rank_ratio)
        self.generator = torch.Generator().manual_seed(int(seed))
        self.rank: int | None = None

    def _rows_features(self, shape: tuple[int, ...]) -> tuple[int, int]:
        if isinstance(self, nn.Conv2d):
            b, c, h, w = shape
            return b * h * w, c
        return math.prod(shape[:-1]), shape[-1]

    def compressed_forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, n = self._rows_features(tuple(x.shape))
        self.rank = loract_rank(n, self.rank_ratio, rows)
        if isinstance(self, nn.Conv2d):
            return _LoRActConv2dFunction.apply(
                x,
                self.weight,
                self.bias,
                self.rank,
                self.generator,
                self.stride,
                self.padding,
                self.dilation,
                self.groups,
            )
        return _LoRActLinearFunction.apply(x, self.weight, self.bias, self.rank, self.generator)

    def stored_elements(self) -> int:
        if self.rank is None or self.last_input_shape is None:
            raise RuntimeError(f"{self.layer_name}: no compressed forward has run yet")
        rows, n = self._rows_features(self.last_input_shape)
        return rows * self.rank + n * self.rank


class LoRActConv2d(_LoRAct, nn.Conv2d):
    """Conv2d with LoRAct activation compression (channel-last ``(B H W, C)`` sketch)."""


class LoRActLinear(_LoRAct, nn.Linear):
    """Linear layer with LoRAct activation compression (``(rows, features)`` sketch)."""
