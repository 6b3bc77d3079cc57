"""LoRAct baseline: an online low-rank QB sketch of each activation, every step.

After "Memory-Efficient Fine-Tuning via Low-Rank Activation Compression" (LoRAct,
arXiv:2509.23472) and its public code (``shijxcs/meft``: ``linalg.randomized_qb`` with
test matrix ``"subs"`` and no power iteration, the default).  At every training step
the layer input is flattened to a matrix ``A`` of shape ``(L, n)``, with ``n`` the
features the weight acts on:

* Conv2d: ``(B H W, C)``, the channel-last view (each pixel of each image is a row);
* Linear: ``(prod of leading modes, features)``.

The sketch rank is ``k = int(r n)`` (rounded down, as the reference's
``int(tensor.shape[-1] * rank)``), capped at ``min(L, n)`` and at least 1.  The
reference's randomized QB with a sampled-submatrix test matrix
(:func:`qb_sketch`):

* tall ``A`` (``L > n``, the usual case): sample ``k`` columns ``idx`` uniformly
  without replacement, ``Q = orth(A^T A[:, idx])`` (``(n, k)``), keep ``A Q``
  (``(L, k)``) and ``Q^T``: ``A ~= (A Q) Q^T``;
* wide ``A`` (``L <= n``): the transpose, sample ``k`` rows,
  ``Q = orth(A A[idx, :]^T)`` (``(L, k)``), keep ``Q`` and ``Q^T A``:
  ``A ~= Q (Q^T A)``.

Either way autograd keeps ``L k + k n`` elements instead of ``L n``; the backward pass
forms the weight gradient from the two factors (contracted in the rank-``k`` space
first for a Linear layer), and the input and bias gradients are exact.  No
calibration data is used.

Notes
-----
The channel-last flattening is the convolutional analogue of LoRAct's
``(tokens, hidden)`` activations: the weight acts on the channel mode.  With ``k = n``
in the tall case ``Q`` is square and orthogonal, ``A_tilde = A``, and the gradients
are exactly BP's.  Every layer draws its samples from its own generator, seeded from
the run's seed and the layer's name (:func:`lance_lib.methods.seeding.layer_generator`):
a run is reproducible, and layers of the same size sample independently, step after
step, as the reference's global ``torch.randperm`` does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import conv2d_input_grad
from ..validation import check_int, check_real
from .hosvd_step import PerLayerSettings, PerStepLayer, init_like
from .registry import register_method
from .seeding import layer_generator

__all__ = [
    "LoRActConv2d",
    "LoRActLinear",
    "LoRActSettings",
    "check_rank_ratio",
    "loract_rank",
    "qb_sketch",
    "row_sketch",
]


def check_rank_ratio(rank_ratio: float) -> float:
    """``rank_ratio`` as a float in ``(0, 1]``, else a ``ValueError`` naming it."""
    return check_real(
        "rank_ratio",
        rank_ratio,
        low=0.0,
        high=1.0,
        low_open=True,
        hint="LoRAct keeps k = int(rank_ratio * n) directions, e.g. rank_ratio=0.25",
    )


def loract_rank(n: int, rank_ratio: float, rows: int | None = None) -> int:
    """``k = int(rank_ratio * n)`` (LoRAct's rounding), capped at ``n`` and ``rows``, >= 1."""
    k = max(1, int(n * check_rank_ratio(rank_ratio)))
    return min(k, n) if rows is None else min(k, n, rows)


def row_sketch(a: torch.Tensor, rank: int, generator: torch.Generator) -> torch.Tensor:
    """Orthonormal ``Q`` (``(n, rank)``) with ``a ~= a Q Q^T``: ``orth(a^T a[:, idx])``.

    The reference's tall-case sketch: ``rank`` columns ``idx`` of ``a`` (``(L, n)``)
    are sampled uniformly without replacement from ``generator`` (a CPU generator),
    and ``Q`` is the reduced QR basis of ``a^T a[:, idx]``, the range of ``a^T``
    probed by its own sampled columns.  ``rank <= min(L, n)``.
    """
    idx = torch.randperm(a.shape[1], generator=generator)[:rank].to(a.device)
    q, _ = torch.linalg.qr(a.T @ a.index_select(1, idx))
    return q


def qb_sketch(
    a: torch.Tensor, rank: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRAct's randomized QB of ``a`` (``(L, n)``): ``(left, right)`` with ``a ~= left @ right``.

    ``left`` is ``(L, k)`` and ``right`` ``(k, n)``, ``k = min(rank, L, n)``.  Tall
    ``a`` (``L > n``): ``left = a Q``, ``right = Q^T`` with ``Q = row_sketch(a)``;
    otherwise the same on ``a^T``: ``left = Q``, ``right = Q^T a`` with
    ``Q = orth(a a[idx, :]^T)`` over ``k`` sampled rows (the reference's choice of the
    cheaper side).
    """
    k = min(rank, *a.shape)
    with torch.no_grad():
        if a.shape[0] > a.shape[1]:
            q = row_sketch(a, k, generator)
            return a @ q, q.T
        q = row_sketch(a.T, k, generator)
        return q, q.T @ a


class _LoRActConv2dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, k, generator, stride, padding, dilation, groups):
        out = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        a = x.detach().permute(0, 2, 3, 1).reshape(-1, x.shape[1])
        left, right = qb_sketch(a, k, generator)
        ctx.save_for_backward(left, right, weight)
        ctx.conf = (tuple(x.shape), stride, padding, dilation, groups, bias is not None)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        left, right, weight = ctx.saved_tensors
        x_shape, stride, padding, dilation, groups, has_bias = ctx.conf
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = conv2d_input_grad(x_shape, weight, grad_out, stride, padding, dilation, groups)
        if ctx.needs_input_grad[1]:
            b, c, h, w = x_shape
            dtype = grad_out.dtype  # under autocast the sketch halves may differ in dtype
            x_tilde = (left.to(dtype) @ right.to(dtype)).reshape(b, h, w, c).permute(0, 3, 1, 2)
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
        left, right = qb_sketch(x.detach().reshape(-1, x.shape[-1]), k, generator)
        ctx.save_for_backward(left, right, weight)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        left, right, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        g = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ weight.to(g.dtype)
        if ctx.needs_input_grad[1]:
            # dW = g^T A ~= (g^T left) right, contracted in the rank-k space first
            # (in the output gradient's dtype: under autocast the sketch may be float32)
            grad_w = (g.T @ left.to(g.dtype)) @ right.to(g.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum(0)
        return grad_x, grad_w, grad_b, None, None


class _LoRAct(PerStepLayer):
    """LoRAct: per-step randomized QB sketch of the flattened input, rank ``int(r n)``."""

    def __init__(
        self, original: nn.Module, name: str = "", *, rank_ratio: float = 0.25, seed: int = 0
    ) -> None:
        init_like(self, original, name)
        self.rank_ratio = check_rank_ratio(rank_ratio)
        self.generator = layer_generator(seed, name)
        self.rank: int | None = None

    @property
    def ranks(self) -> int | None:
        """The sketch rank ``k`` of the last training step."""
        return self.rank

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


@register_method("loract")
@dataclass(frozen=True)
class LoRActSettings(PerLayerSettings):
    """LoRAct, layer by layer (see the module notes).

    Attributes
    ----------
    rank_ratio
        ``r`` in ``(0, 1]``: the sketch keeps ``k = int(r n)`` directions of the ``n``
        features.
    seed
        Seed of the column sampling (combined with each layer's name).
    """

    rank_ratio: float = 0.25
    seed: int = 0

    def validate(self) -> None:
        self._normalise("rank_ratio", check_rank_ratio(self.rank_ratio))
        self._normalise("seed", check_int("seed", self.seed, minimum=0))

    def make_layer(self, original: nn.Module, name: str) -> nn.Module:
        cls = LoRActConv2d if isinstance(original, nn.Conv2d) else LoRActLinear
        return cls(original, name, rank_ratio=self.rank_ratio, seed=self.seed)
