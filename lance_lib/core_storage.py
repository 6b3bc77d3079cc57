"""How LANCE stores the core it keeps for backward: its precision (an option of Phase II).

LANCE keeps the core ``G`` of Eq. (1) between the forward and the backward pass.
By default it is kept in the dtype the forward pass computed it in (the parameters'
dtype, or the autocast dtype).  :func:`lance_lib.layers.compress` can store it in
lower precision instead, with ``core_dtype``:

* ``torch.bfloat16`` / ``torch.float16``: a cast (2 bytes per element);
* ``torch.int8``: symmetric per-channel quantisation, ``G ~= q * s`` with ``q`` int8
  and one float32 scale ``s_j = max |G[..., j, ...]| / 127`` per channel ``j`` of the
  core (the feature mode: dim 1 of a Conv2d core, the last dim of a Linear core),
  1 byte per element plus the scales.

The factors ``U_i`` stay in the parameters' dtype.  The weight gradient of Eq. (4) is
computed from the decoded core, in the output gradient's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["CORE_CODECS", "CoreCodec", "core_codec"]


@dataclass(frozen=True)
class CoreCodec:
    """Stores a core in ``dtype`` (``None``: as computed); see the module notes."""

    dtype: torch.dtype | None = None

    def encode(self, core: torch.Tensor, channel_dim: int) -> tuple[torch.Tensor, ...]:
        """The tensors to save for backward in place of ``core``."""
        if self.dtype is None:
            return (core,)
        if self.dtype != torch.int8:
            return (core.to(self.dtype),)
        amax = core.abs().amax(dim=[d for d in range(core.ndim) if d != channel_dim % core.ndim])
        scale = (amax.float() / 127.0).clamp_min(torch.finfo(torch.float32).tiny)
        shape = [1] * core.ndim
        shape[channel_dim] = -1
        scale = scale.reshape(shape)
        q = torch.round(core.float() / scale).clamp_(-127, 127).to(torch.int8)
        return q, scale

    def decode(self, packed: tuple[torch.Tensor, ...], dtype: torch.dtype) -> torch.Tensor:
        """The core in ``dtype`` from what :meth:`encode` saved."""
        if len(packed) == 1:
            return packed[0].to(dtype)
        q, scale = packed
        return (q.to(torch.float32) * scale).to(dtype)

    @property
    def label(self) -> str:
        """``"param"`` (as computed) or the dtype's short name (``"int8"``...)."""
        return "param" if self.dtype is None else str(self.dtype).removeprefix("torch.")


#: Accepted ``core_dtype`` values by name.
CORE_CODECS: dict[str, CoreCodec] = {
    codec.label: codec
    for codec in (
        CoreCodec(None),
        CoreCodec(torch.float32),
        CoreCodec(torch.bfloat16),
        CoreCodec(torch.float16),
        CoreCodec(torch.int8),
    )
}


def core_codec(core_dtype: torch.dtype | str | None) -> CoreCodec:
    """The codec for ``core_dtype`` (``None`` or ``"param"``, a dtype, or its name).

    Raises
    ------
    ValueError
        ``core_dtype`` is not one of :data:`CORE_CODECS`; the message lists them.
    """
    if core_dtype is None:
        return CORE_CODECS["param"]
    label = str(core_dtype).removeprefix("torch.")
    if label not in CORE_CODECS or not isinstance(core_dtype, (str, torch.dtype)):
        raise ValueError(
            f"core_dtype={core_dtype!r} is not supported; use one of "
            f"{sorted(CORE_CODECS)} (e.g. core_dtype=torch.int8), or None for the "
            "parameters' dtype"
        )
    return CORE_CODECS[label]
