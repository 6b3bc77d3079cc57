"""LoRAct's pre-norm trick: one compressed LayerNorm output serves the norm and its projection.

In a pre-norm transformer block every sub-layer starts with ``y = LN(x)`` followed by
a projection ``z = y W^T + b`` (the fused query/key/value projection of attention, the
first layer of the MLP).  Plain backpropagation keeps two activations there: the
LayerNorm's input ``x`` (for its backward) and the projection's input ``y`` (for the
weight gradient).  LoRAct (arXiv:2509.23472, "pre-norm activation compression")
keeps only the normalised output, compressed, and derives both backward passes from
it.  Here, with ``x_hat = (x - mu) * s`` the normalised rows (``s`` the inverse
standard deviation) and ``y = gamma * x_hat + beta``:

* forward: ``x_hat`` is flattened to ``A`` (``(L, D)``, one row per token) and
  sketched as in layer-wise LoRAct (:func:`lance_lib.baselines.loract.row_sketch`):
  ``k = ceil(r D)`` sampled rows give an orthonormal ``Q`` (``(D, k)``); autograd keeps
  ``A Q`` (``(L, k)``), ``Q`` and ``s`` (``(L,)``), that is ``L k + D k + L`` elements
  instead of BP's ``2 L D`` (plus the statistics);
* backward: ``x_hat_tilde = (A Q) Q^T`` stands for ``x_hat``.  With ``delta`` the
  projection's output gradient and ``g = delta W`` the gradient at ``y`` (exact: it
  needs only ``W``),

  - ``dW = delta^T y_tilde = ((delta^T A Q) Q^T) diag(gamma) + (delta^T 1) beta^T``,
    contracted in the rank-``k`` space first; ``db = delta^T 1``;
  - ``dgamma = sum_rows g * x_hat_tilde``, ``dbeta = sum_rows g``;
  - ``dx = s * (g_hat - mean(g_hat) - x_hat_tilde * mean(g_hat * x_hat_tilde))`` with
    ``g_hat = g * gamma`` and means over the feature mode: the LayerNorm backward
    written with the normalised output and the inverse standard deviation only
    (:func:`layer_norm_backward`).

At ``r = 1`` the basis ``Q`` is square and orthogonal, ``x_hat_tilde = x_hat``, and
every gradient is BP's.  Below that, unlike layer-wise LoRAct (whose input gradients
are exact), the LayerNorm's input gradient uses the approximated ``x_hat`` too, so the
approximation also reaches the blocks below.

Notes
-----
The summary of LoRAct describes storing "only the Norm output as a shared activation";
we store the normalised rows ``x_hat`` before the affine map rather than ``y``.  Both
determine each other through ``gamma``, ``beta`` (kept as parameters anyway), and
``x_hat`` is what the LayerNorm backward reads, so no division by ``gamma`` is needed.
The sketch of ``x_hat`` is not that of ``y`` (the affine map rescales the features),
a detail the summary leaves open.  A block's fused ``qkv`` Linear is the three
projections of the query, key and value; they share the one stored activation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .loract import loract_rank, row_sketch

__all__ = ["LoRActPreNorm", "layer_norm_backward", "prenorm_linear"]


def layer_norm_backward(
    grad_y: torch.Tensor, x_hat: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor | None
) -> torch.Tensor:
    """LayerNorm input gradient from the normalised output and the inverse std alone.

    For ``y = gamma * x_hat + beta`` with ``x_hat = (x - mean(x)) * rstd`` over the
    last mode,
    ``dx = rstd * (g_hat - mean(g_hat) - x_hat * mean(g_hat * x_hat))``,
    ``g_hat = grad_y * gamma`` (``grad_y`` when ``weight`` is ``None``).

    Parameters
    ----------
    grad_y
        Gradient at the LayerNorm's output, ``(..., D)``.
    x_hat
        Normalised input (or its reconstruction), ``(..., D)``.
    rstd
        Inverse standard deviation ``1 / sqrt(var + eps)``, ``(..., 1)``.
    weight
        ``gamma`` (``(D,)``) or ``None``.
    """
    g = grad_y if weight is None else grad_y * weight
    mean_g = g.mean(dim=-1, keepdim=True)
    mean_gx = (g * x_hat).mean(dim=-1, keepdim=True)
    return rstd * (g - mean_g - x_hat * mean_gx)


class _PreNormLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, norm_weight, norm_bias, weight, bias, eps, k, generator):
        y, mean, rstd = torch.native_layer_norm(x, x.shape[-1:], norm_weight, norm_bias, eps)
        out = F.linear(y, weight, bias)
        x_hat = (x - mean) * rstd
        a = x_hat.reshape(-1, x.shape[-1])
        q = row_sketch(a, k, generator)
        ctx.save_for_backward(a @ q, q, rstd, norm_weight, norm_bias, weight)
        ctx.shape = tuple(x.shape)
        ctx.has = (norm_weight is not None, norm_bias is not None, bias is not None)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        aq, q, rstd, norm_weight, norm_bias, weight = ctx.saved_tensors
        has_gamma, has_beta, has_bias = ctx.has
        d = ctx.shape[-1]
        delta = grad_out.reshape(-1, grad_out.shape[-1])
        grads = [None] * 8
        need_x, need_gamma, need_beta, need_w, need_b = ctx.needs_input_grad[:5]
        if need_w:
            # delta^T y_tilde with y_tilde = x_hat_tilde diag(gamma) + 1 beta^T
            grad_w = (delta.T @ aq) @ q.T
            grad_w = grad_w * norm_weight if has_gamma else grad_w
            if has_beta:
                grad_w = grad_w + delta.sum(0)[:, None] * norm_bias[None, :]
            grads[3] = grad_w
        if has_bias and need_b:
            grads[4] = delta.sum(0)
        if need_x or need_gamma or need_beta:
            g = delta @ weight  # gradient at y = LN(x), exact
            x_hat = aq @ q.T  # (L, D), the reconstruction of the normalised rows
            if has_gamma and need_gamma:
                grads[1] = (g * x_hat).sum(0)
            if has_beta and need_beta:
                grads[2] = g.sum(0)
            if need_x:
                rows = layer_norm_backward(
                    g, x_hat, rstd.reshape(-1, 1), norm_weight if has_gamma else None
                )
                grads[0] = rows.reshape(ctx.shape[:-1] + (d,))
        return tuple(grads)


def prenorm_linear(
    x: torch.Tensor,
    norm_weight: torch.Tensor | None,
    norm_bias: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    k: int,
    generator: torch.Generator,
    eps: float = 1e-5,
) -> torch.Tensor:
    """``F.linear(F.layer_norm(x), weight, bias)`` keeping a rank-``k`` sketch of the norm.

    Parameters
    ----------
    x
        ``(..., D)``; normalised over the last mode.
    norm_weight, norm_bias
        The LayerNorm's ``gamma`` and ``beta`` (``(D,)``) or ``None``.
    weight, bias
        The projection's parameters.
    k
        Sketch rank, ``1 <= k <= min(rows, D)``; see :func:`lance_lib.baselines.loract_rank`.
    generator
        CPU generator of the row sampling.
    eps
        The LayerNorm's ``eps``.
    """
    return _PreNormLinearFunction.apply(x, norm_weight, norm_bias, weight, bias, eps, k, generator)


class LoRActPreNorm(nn.Module):
    """A LayerNorm and the Linear it feeds, replaced by LoRAct's pre-norm trick.

    Parameters
    ----------
    norm
        The sub-layer's LayerNorm (over the last mode only).
    linear
        The projection it feeds (a block's fused ``qkv`` or first MLP layer).
    name
        Name of the replaced unit, for messages.
    rank_ratio
        ``r``: the sketch keeps ``k = ceil(r D)`` directions, as layer-wise LoRAct.
    seed
        Seed of the row sampling (a per-module CPU generator).

    Attributes
    ----------
    norm, linear
        The original modules (their parameters are trained as usual).
    rank
        ``k`` of the last training forward pass.
    """

    def __init__(
        self,
        norm: nn.LayerNorm,
        linear: nn.Linear,
        name: str = "",
        *,
        rank_ratio: float = 0.25,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if len(norm.normalized_shape) != 1 or norm.normalized_shape[0] != linear.in_features:
            raise ValueError(
                f"{name}: the pre-norm trick needs a LayerNorm over the {linear.in_features} "
                f"input features of the projection, got normalized_shape {norm.normalized_shape}"
            )
        loract_rank(1, rank_ratio)  # validates the ratio
        self.norm = norm
        self.linear = linear
        self.layer_name = name
        self.rank_ratio = float(rank_ratio)
        self.generator = torch.Generator().manual_seed(int(seed))
        self.rank: int | None = None
        self.last_input_shape: tuple[int, ...] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``linear(norm(x))``; compressed when a gradient will be needed, else plain."""
        trainable = x.requires_grad or any(p.requires_grad for p in self.parameters())
        if not (torch.is_grad_enabled() and trainable):
            return self.linear(self.norm(x))
        rows, d = math.prod(x.shape[:-1]), x.shape[-1]
        self.rank = loract_rank(d, self.rank_ratio, rows)
        self.last_input_shape = tuple(x.shape)
        return prenorm_linear(
            x,
            self.norm.weight,
            self.norm.bias,
            self.linear.weight,
            self.linear.bias,
            self.rank,
            self.generator,
            self.norm.eps,
        )

    def stored_elements(self) -> int:
        """Elements kept for backward: ``L k + D k + L`` (sketch, basis, inverse std)."""
        if self.rank is None or self.last_input_shape is None:
            raise RuntimeError(f"{self.layer_name}: no compressed forward has run yet")
        rows, d = math.prod(self.last_input_shape[:-1]), self.last_input_shape[-1]
        return rows * self.rank + d * self.rank + rows
