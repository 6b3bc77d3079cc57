"""A small pre-norm Vision Transformer for 32 x 32 images (the transformer companion).

The LANCE paper states that its method applies to transformers but shows no transformer
result; LoRAct (arXiv:2509.23472) is built for them.  This module gives both a common
network: a ViT in the pre-norm layout of Dosovitskiy et al. (LayerNorm before each
sub-layer, residual connections around them), small enough to pretrain on class split
A of the embedded ``cifar10_mini`` in about a minute on two CPU cores.

Every linear map of a block is an ``nn.Linear`` acting on the last mode of a
``(batch, tokens, features)`` activation, so LANCE (:mod:`lance_lib.layers`), LoRAct
(:mod:`lance_lib.methods.loract`) and the pre-norm trick
(:mod:`lance_lib.methods.loract_prenorm`) can swap them.  Each sub-layer's
LayerNorm and the projection it feeds form one :class:`NormLinear` unit
(``norm_qkv``: LayerNorm + fused query/key/value projection; ``norm_fc1``: LayerNorm
+ first MLP layer), the unit the pre-norm trick replaces as a whole.  Module names of
block ``i``::

    blocks.i.norm_qkv.norm     LayerNorm          (B, T, D) -> (B, T, D)
    blocks.i.norm_qkv.linear   Linear D -> 3D     query, key, value of all heads
    blocks.i.proj              Linear D -> D      attention output projection
    blocks.i.norm_fc1.norm     LayerNorm
    blocks.i.norm_fc1.linear   Linear D -> H      MLP, followed by GELU
    blocks.i.fc2               Linear H -> D

The image is cut into non-overlapping patches (a strided convolution, ``embed.proj``)
with a learned position embedding; there is no class token: the head averages the
tokens, normalises and classifies (``classifier``: mean, LayerNorm, Linear), so
:func:`lance_lib.models.replace_classifier` and :func:`lance_lib.models.last_n_layers`
work on it unchanged.

References
----------
.. [1] Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image
   Recognition at Scale", ICLR 2021.
.. [2] Xiong et al., "On Layer Normalization in the Transformer Architecture", ICML 2020
   (pre-norm).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from lance_lib.models.registry import register_model

__all__ = [
    "Block",
    "NormLinear",
    "PatchEmbed",
    "TokenMean",
    "VisionTransformer",
    "block_linear_names",
    "block_names",
    "split_blocks",
    "vit_tiny",
]


class PatchEmbed(nn.Module):
    """Non-overlapping patches projected to ``dim`` features, plus a learned position embedding.

    ``(B, C, H, W) -> (B, T, dim)`` with ``T = (H / patch) (W / patch)`` tokens in
    row-major order.
    """

    def __init__(self, image_size: int, patch_size: int, dim: int, in_chans: int = 3) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch {patch_size}")
        self.num_tokens = (image_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Token embeddings ``(B, T, dim)``."""
        tokens = self.proj(x).flatten(2).transpose(1, 2)
        if tokens.shape[1] != self.num_tokens:
            raise ValueError(
                f"{tuple(x.shape[-2:])} images give {tokens.shape[1]} patches; the position "
                f"embedding was built for {self.num_tokens}"
            )
        return tokens + self.pos_embed


class NormLinear(nn.Module):
    """The input of a pre-norm sub-layer: a LayerNorm and the projection it feeds.

    ``linear(norm(x))``.  Kept as one unit so that LoRAct's pre-norm trick
    (:class:`lance_lib.methods.loract_prenorm.LoRActPreNormLinear`) can replace both at once.
    """

    def __init__(self, dim: int, out_features: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.linear = nn.Linear(dim, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``linear(norm(x))``."""
        return self.linear(self.norm(x))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + Attn(LN(x))``, then ``x + MLP(LN(x))``.

    Parameters
    ----------
    dim
        Token features ``D``.
    heads
        Attention heads; ``dim`` must be a multiple.
    mlp_ratio
        Hidden features of the MLP, ``H = mlp_ratio * dim``.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not a multiple of heads {heads}")
        self.heads = heads
        self.norm_qkv = NormLinear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm_fc1 = NormLinear(dim, mlp_ratio * dim)
        self.fc2 = nn.Linear(mlp_ratio * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, D) -> (B, T, D)``."""
        b, t, d = x.shape
        qkv = self.norm_qkv(x).reshape(b, t, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(attended.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.norm_fc1(x)))


class TokenMean(nn.Module):
    """Average over the token mode: ``(B, T, D) -> (B, D)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Mean of the tokens."""
        return x.mean(dim=1)


class VisionTransformer(nn.Module):
    """Pre-norm ViT: patch embedding, ``depth`` :class:`Block` s, mean-pooled classifier.

    Parameters
    ----------
    num_classes
        Classifier outputs.
    image_size, patch_size
        Square input side and patch side (``(image_size / patch_size)^2`` tokens).
    dim, depth, heads, mlp_ratio
        Token features, blocks, attention heads, MLP expansion.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        image_size: int = 32,
        patch_size: int = 4,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: int = 2,
    ) -> None:
        super().__init__()
        self.embed = PatchEmbed(image_size, patch_size, dim)
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_ratio) for _ in range(depth)))
        self.classifier = nn.Sequential(TokenMean(), nn.LayerNorm(dim), nn.Linear(dim, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)`` of images ``(B, 3, image_size, image_size)``."""
        return self.classifier(self.blocks(self.embed(x)))


# the transformer companion: a pre-norm ViT for 32 px inputs
@register_model(label="ViT-Tiny (pre-norm)", native_resolution=32)
def vit_tiny(num_classes: int, *, weights: str | None = None, **kwargs) -> VisionTransformer:
    """The companion's ViT: 32 px, 4 x 4 patches (64 tokens), 4 blocks of width 64, 4 heads.

    Parameters
    ----------
    num_classes
        Classifier outputs.
    weights
        Must be ``None``: the network is pretrained offline on class split A
        (:func:`lance_lib.training.pretrain.pretrain`), never downloaded.
    **kwargs
        Passed to :class:`VisionTransformer`.

    Returns
    -------
    VisionTransformer
        About 0.14 M parameters; MLP width 128.
    """
    if weights is not None:
        raise ValueError("vit_tiny has no downloadable weights; pretrain it on split A")
    return VisionTransformer(num_classes, **kwargs)


def split_blocks(model: VisionTransformer, trained: int) -> tuple[nn.Sequential, nn.Sequential]:
    """Frozen prefix and trainable tail of a ViT whose last ``trained`` blocks are fine-tuned.

    Parameters
    ----------
    model
        The network; the pieces share its modules.
    trained
        ``k``, the number of trailing blocks in the tail (1 to ``depth``).

    Returns
    -------
    prefix, tail : nn.Sequential
        ``prefix`` maps images to the tokens entering block ``depth - k``;
        ``tail`` runs the last ``k`` blocks and the classifier.  ``tail(prefix(x))``
        equals ``model(x)``, and the tail's module names are the model's
        (``blocks.3.fc2``, ``classifier.2``), so layer names carry over.
    """
    depth = len(model.blocks)
    if not 1 <= trained <= depth:
        raise ValueError(f"trained must lie in 1..{depth}, got {trained}")
    first = depth - trained
    prefix = nn.Sequential(model.embed, *list(model.blocks)[:first])
    kept = OrderedDict((str(i), model.blocks[i]) for i in range(first, depth))
    tail = nn.Sequential(
        OrderedDict([("blocks", nn.Sequential(kept)), ("classifier", model.classifier)])
    )
    return prefix, tail


def block_linear_names(model: nn.Module) -> list[str]:
    """Names of the blocks' ``nn.Linear`` layers (not the classifier), in forward order.

    Works on a whole :class:`VisionTransformer` or on a tail from :func:`split_blocks`.
    """
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and name.startswith("blocks.")
    ]


def block_names(model: nn.Module) -> list[str]:
    """Names of the :class:`Block` modules, in forward order (a whole model or a tail)."""
    return [name for name, m in model.named_modules() if isinstance(m, Block)]
