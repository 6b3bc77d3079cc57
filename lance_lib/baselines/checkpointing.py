"""Checkpointing baseline: recompute the trainable region in the backward pass.

Gradient checkpointing (Chen et al., 2016; ref. [10] of LANCE) keeps no activation of
the checkpointed region between the forward and the backward pass, only its input,
and runs the region's forward a second time during backward to rebuild what autograd
needs.  The gradients are exactly BP's; the price is one extra forward of the region.

:func:`checkpoint_region` splits a model at its first trainable module into a frozen
prefix and the trainable region (the rest of the network) and returns a
:class:`Checkpointed` module that runs the region under
``torch.utils.checkpoint.checkpoint(use_reentrant=False)``.  With a single segment the
peak memory during backward equals BP's for the region: the saving is between the
passes, not at the peak.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..models import split_at

__all__ = ["Checkpointed", "checkpoint_region"]


class Checkpointed(nn.Module):
    """``region(prefix(x))`` with ``region`` recomputed in the backward pass.

    Parameters
    ----------
    prefix
        Frozen modules before the trainable region (may be empty).
    region
        The trainable region.

    Attributes
    ----------
    enabled
        When ``False`` the region runs as plain autograd (used to take BP reference
        gradients); checkpointing is also skipped when grad mode is off.
    stored_bytes
        Bytes of the region's input kept between the passes by the last checkpointed
        forward (what checkpointing stores instead of the region's activations).
    """

    def __init__(self, prefix: nn.Module, region: nn.Module) -> None:
        super().__init__()
        self.prefix = prefix
        self.region = region
        self.enabled = True
        self.stored_bytes = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Prefix, then the region, checkpointed when training with gradients."""
        h = self.prefix(x)
        if not (self.enabled and torch.is_grad_enabled()):
            return self.region(h)
        self.stored_bytes = h.untyped_storage().nbytes()
        return checkpoint(self.region, h, use_reentrant=False)


def _sequential_split(model: nn.Sequential, first_trainable: str) -> tuple[nn.Module, nn.Module]:
    head = first_trainable.split(".")[0]
    names = [name for name, _ in model.named_children()]
    if head not in names:
        raise KeyError(f"no child of the Sequential contains {first_trainable!r}")
    i = names.index(head)
    return model[:i], model[i:]


def checkpoint_region(model: nn.Module, first_trainable: str | None) -> Checkpointed:
    """Wrap ``model`` so that everything from ``first_trainable`` on is checkpointed.

    Parameters
    ----------
    model
        A torchvision ResNet / MobileNetV2 (split by :func:`lance_lib.models.split_at`)
        or an ``nn.Sequential`` (e.g. the tail :func:`split_at` returns), split at the
        child that contains ``first_trainable``.  Any module when ``first_trainable``
        is ``None``.
    first_trainable
        Name (in ``model.named_modules()``) of the earliest trainable module, or
        ``None`` to checkpoint the whole model (the model is a trainable tail).

    Returns
    -------
    Checkpointed
        Shares every module with ``model``; training it trains ``model``.
    """
    if first_trainable is None:
        return Checkpointed(nn.Identity(), model)
    if isinstance(model, nn.Sequential):
        prefix, region = _sequential_split(model, first_trainable)
    else:
        try:
            prefix, region = split_at(model, first_trainable)
        except TypeError as err:
            raise TypeError(
                f"checkpointing needs a model split_at supports or an nn.Sequential: {err}"
            ) from None
    return Checkpointed(prefix, region)
