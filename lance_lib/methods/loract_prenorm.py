"""LoRAct for pre-norm transformer blocks: its pre-norm mode, and a narrower variant.

In a pre-norm block every sub-layer starts with ``y = LN(x)``: attention is
``x + Attn(LN_1(x))``, the MLP ``x + MLP(LN_2(x))``.  Plain backpropagation keeps,
per sub-layer, the LayerNorm's input, the first projection's input ``y`` and every
activation inside the sub-layer (queries, keys, values, attention output, the MLP's
hidden pre-activation and GELU output).

``loract_prenorm`` - LoRAct's pre-norm mode (:class:`LoRActPreNormBlock`)
    What LoRAct's public code (``shijxcs/meft``, ``patch_locations="sublayer"``: a
    compressed LayerNorm plus checkpointed attention and MLP) keeps: per sub-layer only
    the LayerNorm output ``y``, sketched once (:func:`lance_lib.methods.loract.qb_sketch`,
    ``k = int(r D)``), and the inverse standard deviation.  In the backward pass the
    sub-layer is recomputed from the reconstruction ``y_tilde`` (the checkpoint) to
    get its parameters' gradients and the gradient ``g`` at ``y``; the LayerNorm's
    gradients follow from ``y_tilde`` too, with
    ``x_hat_tilde = (y_tilde - beta) / gamma``.  The block keeps ``2 (L k + k D + L)``
    elements between the passes; during backward one sub-layer's recomputation holds
    what BP's forward of that sub-layer saves.  Our blocks' MLP (``fc1``, GELU,
    ``fc2``) is recomputed whole; the reference recomputes the whole MLP of
    LLaMA-style models and, for Hugging Face's ViT, only its first layer and GELU
    (``fc2``'s input is then stored in full there).

``loract_prenorm_linear`` - the LayerNorm and its first projection (:class:`LoRActPreNormLinear`)
    One sketched normalised output serves the backward of the LayerNorm and of the
    projection it feeds (the fused ``qkv`` of attention, ``fc1`` of the MLP); nothing
    is recomputed, and everything after the projection is stored as BP stores it.
    With ``x_hat = (x - mu) * s`` the normalised rows (``s`` the inverse standard
    deviation) and ``y = gamma * x_hat + beta``: the forward keeps the sketch of
    ``x_hat`` (``L k + k D``) and ``s``; the backward uses
    ``x_hat_tilde = left @ right`` for ``x_hat``, with ``delta`` the projection's output
    gradient and ``g = delta W`` the gradient at ``y`` (exact: it needs only ``W``),

    - ``dW = delta^T y_tilde = ((delta^T left) right) diag(gamma) + (delta^T 1) beta^T``;
      ``db = delta^T 1``;
    - ``dgamma = sum_rows g * x_hat_tilde``, ``dbeta = sum_rows g``;
    - ``dx = s * (g_hat - mean(g_hat) - x_hat_tilde * mean(g_hat * x_hat_tilde))``
      with ``g_hat = g * gamma`` and means over the feature mode
      (:func:`layer_norm_backward`).

Both are registered methods (:class:`LoRActPreNormBlockSettings`,
:class:`LoRActPreNormLinearSettings`): ``apply_method(tail, "loract_prenorm",
block_linear_names(tail), rank_ratio=0.25)`` swaps the units holding the given block
Linear layers, and the harness measures them as any other method.

At ``r = 1`` (tall activations) the sketch is exact and every gradient is BP's.  Below
that, unlike layer-wise LoRAct (whose input gradients are exact), the LayerNorm's input
gradient uses the approximated normalised rows, so the approximation also reaches the
blocks below.

Notes
-----
The pre-norm mode sketches ``y`` (what the reference compresses, and what the
recomputed sub-layer reads) and divides by ``gamma`` to get ``x_hat``, as the
reference's LayerNorm backward does; a ``gamma`` entry that is exactly zero is
therefore not supported there.  The narrower variant sketches ``x_hat`` (what the
LayerNorm backward reads; no division).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..accounting import SavedBytesCounter
from ..models.surgery import set_submodule
from ..models.vit import Block, NormLinear
from .loract import LoRActSettings, check_rank_ratio, loract_rank, qb_sketch
from .registry import Applied, Recomputation, Recompute, register_method
from .seeding import layer_generator

__all__ = [
    "LoRActPreNormBlock",
    "LoRActPreNormBlockSettings",
    "LoRActPreNormLinear",
    "LoRActPreNormLinearSettings",
    "layer_norm_backward",
    "prenorm_checkpoint",
    "prenorm_linear",
]


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


def _norm_grads(
    g: torch.Tensor,
    x_hat: torch.Tensor,
    rstd: torch.Tensor,
    gamma: torch.Tensor | None,
    needs: Sequence[bool],
) -> list[torch.Tensor | None]:
    """``[dx, dgamma, dbeta]`` of a LayerNorm from the gradient ``g`` at its output."""
    need_x, need_gamma, need_beta = needs
    return [
        layer_norm_backward(g, x_hat, rstd, gamma) if need_x else None,
        (g * x_hat).sum(0) if gamma is not None and need_gamma else None,
        g.sum(0) if need_beta else None,
    ]


class _PreNormLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, norm_weight, norm_bias, weight, bias, eps, k, generator):
        y, mean, rstd = torch.native_layer_norm(x, x.shape[-1:], norm_weight, norm_bias, eps)
        out = F.linear(y, weight, bias)
        x_hat = ((x - mean) * rstd).reshape(-1, x.shape[-1])
        left, right = qb_sketch(x_hat, k, generator)
        ctx.save_for_backward(left, right, rstd, norm_weight, norm_bias, weight)
        ctx.shape = tuple(x.shape)
        ctx.has = (norm_weight is not None, norm_bias is not None, bias is not None)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        left, right, rstd, norm_weight, norm_bias, weight = ctx.saved_tensors
        has_gamma, has_beta, has_bias = ctx.has
        delta = grad_out.reshape(-1, grad_out.shape[-1])
        grads: list[torch.Tensor | None] = [None] * 8
        need_x, need_gamma, need_beta, need_w, need_b = ctx.needs_input_grad[:5]
        if need_w:
            # delta^T y_tilde with y_tilde = x_hat_tilde diag(gamma) + 1 beta^T
            grad_w = (delta.T @ left) @ right
            grad_w = grad_w * norm_weight if has_gamma else grad_w
            if has_beta:
                grad_w = grad_w + delta.sum(0)[:, None] * norm_bias[None, :]
            grads[3] = grad_w
        if has_bias and need_b:
            grads[4] = delta.sum(0)
        if need_x or need_gamma or need_beta:
            g = delta @ weight  # gradient at y = LN(x), exact
            x_hat = left @ right  # (L, D), the reconstruction of the normalised rows
            needs = (need_x, need_gamma, need_beta and has_beta)
            dx, dgamma, dbeta = _norm_grads(
                g, x_hat, rstd.reshape(-1, 1), norm_weight if has_gamma else None, needs
            )
            grads[0] = None if dx is None else dx.reshape(ctx.shape)
            grads[1], grads[2] = dgamma, dbeta
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
        Sketch rank, ``1 <= k <= min(rows, D)``; see
        :func:`lance_lib.methods.loract.loract_rank`.
    generator
        CPU generator of the sampling.
    eps
        The LayerNorm's ``eps``.
    """
    return _PreNormLinearFunction.apply(x, norm_weight, norm_bias, weight, bias, eps, k, generator)


class _PreNormCheckpointFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gamma, beta, eps, k, generator, sublayer, counter, *params):
        y, _, rstd = torch.native_layer_norm(x, x.shape[-1:], gamma, beta, eps)
        out = sublayer(y)
        left, right = qb_sketch(y.reshape(-1, x.shape[-1]), k, generator)
        ctx.save_for_backward(left, right, rstd, gamma, beta)
        ctx.sublayer, ctx.counter, ctx.params = sublayer, counter, params
        ctx.shape = tuple(x.shape)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        left, right, rstd, gamma, beta = ctx.saved_tensors
        needs = ctx.needs_input_grad
        trained = [p for p, need in zip(ctx.params, needs[8:], strict=True) if need]
        y_tilde = (left @ right).reshape(ctx.shape)
        with torch.enable_grad():
            y_in = y_tilde.detach().requires_grad_(True)
            if ctx.counter is None:
                out = ctx.sublayer(y_in)
            else:
                with SavedBytesCounter(exclude=ctx.params) as count:
                    out = ctx.sublayer(y_in)
                ctx.counter.append(count.bytes)
            found = torch.autograd.grad(out, [y_in, *trained], grad_out)
        g, param_grads = found[0], iter(found[1:])
        d = ctx.shape[-1]
        y_rows = y_tilde.reshape(-1, d)
        x_hat = y_rows if beta is None else y_rows - beta
        x_hat = x_hat if gamma is None else x_hat / gamma
        dx, dgamma, dbeta = _norm_grads(
            g.reshape(-1, d), x_hat, rstd.reshape(-1, 1), gamma, needs[:3]
        )
        grads = [None if dx is None else dx.reshape(ctx.shape), dgamma, dbeta]
        grads += [None] * 5
        grads += [next(param_grads) if need else None for need in needs[8:]]
        return tuple(grads)


def prenorm_checkpoint(
    x: torch.Tensor,
    norm: nn.LayerNorm,
    sublayer: Callable[[torch.Tensor], torch.Tensor],
    params: Sequence[nn.Parameter],
    k: int,
    generator: torch.Generator,
    counter: list[int] | None = None,
) -> torch.Tensor:
    """``sublayer(norm(x))`` keeping only a rank-``k`` sketch of ``norm(x)`` (LoRAct's mode).

    Parameters
    ----------
    x
        ``(..., D)``.
    norm
        The sub-layer's LayerNorm over the last mode.
    sublayer
        The rest of the sub-layer, ``y -> out`` (attention, or the MLP); recomputed
        from the reconstructed ``y`` during backward.
    params
        ``sublayer``'s parameters (their gradients are returned through autograd).
    k, generator
        Sketch rank (``1 <= k <= min(rows, D)``) and the sampling's CPU generator.
    counter
        When a list, each backward recomputation appends the bytes it saved
        (:class:`lance_lib.accounting.SavedBytesCounter`).
    """
    return _PreNormCheckpointFunction.apply(
        x, norm.weight, norm.bias, norm.eps, k, generator, sublayer, counter, *params
    )


def _check_norm(norm: nn.LayerNorm, features: int, name: str) -> None:
    if len(norm.normalized_shape) != 1 or norm.normalized_shape[0] != features:
        raise ValueError(
            f"{name}: LoRAct's pre-norm compression needs a LayerNorm over the last mode of "
            f"{features} features, got normalized_shape {norm.normalized_shape}"
        )


class LoRActPreNormLinear(nn.Module):
    """A LayerNorm and the Linear it feeds, sharing one sketch (``loract_prenorm_linear``).

    Parameters
    ----------
    norm
        The sub-layer's LayerNorm (over the last mode only).
    linear
        The projection it feeds (a block's fused ``qkv`` or first MLP layer).
    name
        Name of the replaced unit, for messages and the sampling's seed.
    rank_ratio
        ``r``: the sketch keeps ``k = int(r D)`` directions, as layer-wise LoRAct.
    seed
        Seed of the sampling (combined with ``name``).

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
        _check_norm(norm, linear.in_features, name)
        self.norm = norm
        self.linear = linear
        self.layer_name = name
        self.rank_ratio = check_rank_ratio(rank_ratio)
        self.generator = layer_generator(seed, name)
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
        """Elements kept for backward: ``L k + k D + L`` (sketch factors, inverse std)."""
        if self.rank is None or self.last_input_shape is None:
            raise RuntimeError(f"{self.layer_name}: no compressed forward has run yet")
        rows, d = math.prod(self.last_input_shape[:-1]), self.last_input_shape[-1]
        return rows * self.rank + d * self.rank + rows


class LoRActPreNormBlock(nn.Module):
    """A pre-norm ViT block under LoRAct's pre-norm mode (``loract_prenorm``).

    A twin of a :class:`lance_lib.models.vit.Block` that shares its modules under the
    same names (``norm_qkv``, ``proj``, ``norm_fc1``, ``fc2``; parameter names and
    optimiser state carry over): ``x + Attn(LN_1(x))`` and ``x + MLP(LN_2(x))`` each
    run through :func:`prenorm_checkpoint`, so the block keeps two sketched LayerNorm
    outputs and two inverse standard deviations, and recomputes attention and the MLP
    in backward.  Without a gradient to compute it runs the original block.

    Parameters
    ----------
    block
        The block (``norm_qkv``, ``proj``, ``norm_fc1``, ``fc2``, ``heads``).
    name
        The block's name, for messages and the sampling's seed.
    rank_ratio, seed
        ``r`` (``k = int(r D)``) and the sampling seed.

    Attributes
    ----------
    rank
        ``k`` of the last training forward pass.
    recompute_bytes
        ``None``, or a list to which each backward recomputation appends the bytes it
        saved (set it to ``[]`` to measure).
    """

    def __init__(
        self, block: nn.Module, name: str = "", *, rank_ratio: float = 0.25, seed: int = 0
    ) -> None:
        super().__init__()
        width = block.norm_qkv.linear.in_features
        _check_norm(block.norm_qkv.norm, width, f"{name}.norm_qkv")
        _check_norm(block.norm_fc1.norm, width, f"{name}.norm_fc1")
        self.norm_qkv = block.norm_qkv
        self.proj = block.proj
        self.norm_fc1 = block.norm_fc1
        self.fc2 = block.fc2
        self.heads = block.heads
        self.train(block.training)
        object.__setattr__(self, "_original", block)  # outside the module tree
        self.layer_name = name
        self.rank_ratio = check_rank_ratio(rank_ratio)
        self.generator = layer_generator(seed, name)
        self.rank: int | None = None
        self.last_input_shape: tuple[int, ...] | None = None
        self.recompute_bytes: list[int] | None = None

    def attention(self, y: torch.Tensor) -> torch.Tensor:
        """The attention sub-layer after its LayerNorm: ``proj(SDPA(qkv(y)))``."""
        b, t, d = y.shape
        qkv = self.norm_qkv.linear(y).reshape(b, t, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v)
        return self.proj(attended.transpose(1, 2).reshape(b, t, d))

    def mlp(self, y: torch.Tensor) -> torch.Tensor:
        """The MLP sub-layer after its LayerNorm: ``fc2(GELU(fc1(y)))``."""
        return self.fc2(F.gelu(self.norm_fc1.linear(y)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block; compressed when a gradient will be needed, else the original block."""
        trainable = x.requires_grad or any(p.requires_grad for p in self.parameters())
        if not (torch.is_grad_enabled() and trainable):
            return self._original(x)
        rows, d = math.prod(x.shape[:-1]), x.shape[-1]
        self.rank = loract_rank(d, self.rank_ratio, rows)
        self.last_input_shape = tuple(x.shape)
        attn_params = [*self.norm_qkv.linear.parameters(), *self.proj.parameters()]
        mlp_params = [*self.norm_fc1.linear.parameters(), *self.fc2.parameters()]
        x = x + prenorm_checkpoint(
            x,
            self.norm_qkv.norm,
            self.attention,
            attn_params,
            self.rank,
            self.generator,
            self.recompute_bytes,
        )
        return x + prenorm_checkpoint(
            x,
            self.norm_fc1.norm,
            self.mlp,
            mlp_params,
            self.rank,
            self.generator,
            self.recompute_bytes,
        )

    def stored_elements(self) -> int:
        """Elements kept between the passes: ``2 (L k + k D + L)``."""
        if self.rank is None or self.last_input_shape is None:
            raise RuntimeError(f"{self.layer_name}: no compressed forward has run yet")
        rows, d = math.prod(self.last_input_shape[:-1]), self.last_input_shape[-1]
        return 2 * (rows * self.rank + d * self.rank + rows)


def _units(model: nn.Module, kind: type[nn.Module], targets: Mapping[str, nn.Module]) -> list[str]:
    """Names of the ``kind`` modules of ``model`` that hold one of the ``targets``."""
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, kind) and any(t.startswith(f"{name}.") for t in targets)
    ]


def _measure_recompute(blocks: list[LoRActPreNormBlock]) -> Recompute:
    """The blocks' largest backward recomputation, measured over one training step."""

    def measure(
        _inputs: torch.Tensor, step: Callable[[], None], _names: list[str]
    ) -> Recomputation:
        for block in blocks:
            block.recompute_bytes = []
        try:
            step()
            return Recomputation(max((b for u in blocks for b in u.recompute_bytes), default=0))
        finally:
            for block in blocks:
                block.recompute_bytes = None

    return measure


@dataclass(frozen=True)
class _PreNormSettings(LoRActSettings):
    """What both pre-norm methods share: layer-wise LoRAct's settings (``rank_ratio``,
    ``seed``) and the swap of every unit holding a target (see :meth:`apply`)."""

    #: The kind of module a unit is (a whole block, or a LayerNorm with its projection).
    holder: ClassVar[type[nn.Module]]

    def make_unit(self, original: nn.Module, name: str) -> nn.Module:
        """The compressed twin of the unit ``original`` named ``name``."""
        raise NotImplementedError

    def recomputation(self, units: list[nn.Module]) -> Recompute | None:
        """How to measure what ``units`` recompute in backward (``None``: nothing)."""
        return None

    def apply(
        self,
        model: nn.Module,
        targets: Mapping[str, nn.Module],
        *,
        calib_loader: Iterable[Any] | None = None,
        forward: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    ) -> Applied:
        """Swap every :attr:`holder` unit holding a target for :meth:`make_unit`'s twin
        and sketch the targets outside the units layer by layer (LoRAct); the units
        and those targets are the treated modules."""
        units = _units(model, self.holder, targets)
        rest = {n: m for n, m in targets.items() if not any(n.startswith(f"{u}.") for u in units)}
        applied = super().apply(model, rest)  # layer-wise LoRAct (make_layer)
        for name in units:
            unit = self.make_unit(model.get_submodule(name), name)
            set_submodule(model, name, unit)
            applied.replacements[name] = unit
        applied.treated = units + list(rest)
        applied.recomputation = self.recomputation([applied.replacements[u] for u in units])
        return applied

    def layer_ranks(self, applied: Applied, name: str) -> int | None:
        """The sketch rank ``k`` of the module swapped at ``name`` (``None`` elsewhere)."""
        module = applied.replacements.get(name)
        return None if module is None else module.rank


@register_method("loract_prenorm")
@dataclass(frozen=True)
class LoRActPreNormBlockSettings(_PreNormSettings):
    """LoRAct's pre-norm mode: every block holding a target becomes a
    :class:`LoRActPreNormBlock` (the targets are the blocks' Linear layers), which
    recomputes attention and the MLP in backward.

    Attributes
    ----------
    rank_ratio, seed
        ``r`` (``k = int(r D)``) and the sampling seed.
    """

    holder: ClassVar[type[nn.Module]] = Block

    def make_unit(self, original: nn.Module, name: str) -> nn.Module:
        return LoRActPreNormBlock(original, name, rank_ratio=self.rank_ratio, seed=self.seed)

    def recomputation(self, units: list[nn.Module]) -> Recompute | None:
        return _measure_recompute(units)


@register_method("loract_prenorm_linear")
@dataclass(frozen=True)
class LoRActPreNormLinearSettings(_PreNormSettings):
    """Each LayerNorm + first projection holding a target becomes a
    :class:`LoRActPreNormLinear`; the other targets get layer-wise LoRAct.

    Attributes
    ----------
    rank_ratio, seed
        ``r`` (``k = int(r D)``) and the sampling seed, for both kinds of module.
    """

    holder: ClassVar[type[nn.Module]] = NormLinear

    def make_unit(self, original: nn.Module, name: str) -> nn.Module:
        return LoRActPreNormLinear(
            original.norm, original.linear, name, rank_ratio=self.rank_ratio, seed=self.seed
        )
