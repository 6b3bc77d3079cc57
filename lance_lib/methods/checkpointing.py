"""Checkpointing baseline: recompute the trainable region, in segments, during backward.

Gradient checkpointing (Chen et al., 2016; ref. [10] of LANCE) keeps no activation of
a checkpointed segment between the forward and the backward pass, only the segment's
input, and runs the segment's forward a second time during backward to rebuild what
autograd needs.  The gradients are exactly BP's; the price is one extra forward.

:func:`checkpoint_region` splits a model at its first trainable module into a frozen
prefix and the trainable region (the rest of the network), cuts the region into
``segments`` consecutive pieces (as ``torch.utils.checkpoint.checkpoint_sequential``
does) and returns a :class:`Checkpointed` module that runs each piece under
``torch.utils.checkpoint.checkpoint(use_reentrant=False)``.

Memory
------
Between the passes the region keeps the segments' inputs; during backward one
segment at a time is recomputed and holds what BP's forward of that segment saves,
while the inputs of the segments before it are still kept.  The peak is therefore
``max_i (sum_{j <= i} input_j + recompute_i)``: with one segment BP's (plus the
region's input); more segments lower the recomputation and add inputs.
:func:`lance_lib.methods.measure_method` measures every part with saved-tensor hooks
(:meth:`Checkpointed.measure_segments`, :func:`backward_peak`); nothing is assumed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..accounting import SavedTensorReport, measure_saved_tensors
from ..models import split_at
from ..validation import check_choice, check_int
from .registry import Applied, MethodSettings, Recomputation, register_method

__all__ = ["REGIONS", "CheckpointSettings", "Checkpointed", "backward_peak", "checkpoint_region"]

#: ``"auto"``: split at the first trainable layer; ``"whole"``: the model is the region.
REGIONS = ("auto", "whole")


def _segments(region: nn.Module, segments: int) -> list[nn.Module]:
    """``region`` cut into ``segments`` consecutive runs of its children (Sequential only)."""
    if segments == 1:
        return [region]
    if not isinstance(region, nn.Sequential):
        raise TypeError(
            f"segments={segments} needs an nn.Sequential region to cut, got "
            f"{type(region).__name__}; use segments=1 or region='auto'"
        )
    children = list(region)
    if segments > len(children):
        raise ValueError(
            f"segments={segments} exceeds the region's {len(children)} top-level modules; "
            f"use segments <= {len(children)}"
        )
    size, extra = divmod(len(children), segments)
    out, start = [], 0
    for i in range(segments):
        stop = start + size + (1 if i < extra else 0)
        out.append(region[start:stop])
        start = stop
    return out


class Checkpointed(nn.Module):
    """``region(prefix(x))`` with the region recomputed, segment by segment, in backward.

    Parameters
    ----------
    prefix
        Frozen modules before the trainable region (may be empty).
    region
        The trainable region.
    segments
        Number of consecutive checkpointed pieces of ``region`` (an
        ``nn.Sequential`` when more than one).

    Attributes
    ----------
    enabled
        When ``False`` the region runs as plain autograd (used to take BP reference
        gradients); checkpointing is also skipped when grad mode is off.
    pieces
        The segments, in order (they share their modules with ``region``).
    """

    def __init__(self, prefix: nn.Module, region: nn.Module, segments: int = 1) -> None:
        super().__init__()
        self.prefix = prefix
        self.region = region
        self.enabled = True
        object.__setattr__(self, "pieces", _segments(region, segments))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Prefix, then each segment, checkpointed when training with gradients."""
        h = self.prefix(x)
        if not (self.enabled and torch.is_grad_enabled()):
            return self.region(h)
        for piece in self.pieces:
            h = checkpoint(piece, h, use_reentrant=False)
        return h

    def measure_segments(self, x: torch.Tensor) -> tuple[list[int], list[SavedTensorReport]]:
        """Each segment's input bytes and what its recomputation saves, measured.

        Runs the prefix and the segments once as plain autograd, each segment on its
        own under :func:`lance_lib.accounting.measure_saved_tensors`, with its input
        detached as checkpointing's recomputation sees it.  Returns the inputs' bytes
        (kept between the passes) and one report per segment, in forward order.
        """
        inputs, reports = [], []
        h = self.prefix(x)
        for piece in self.pieces:
            h = h.detach().requires_grad_(h.requires_grad)
            inputs.append(h.untyped_storage().nbytes())
            out: list[torch.Tensor] = []

            def run(piece: nn.Module = piece, h: torch.Tensor = h, out: list = out) -> None:
                out.append(piece(h))

            reports.append(measure_saved_tensors(self.region, run))
            h = out.pop()
        return inputs, reports

    def set_enabled(self, enabled: bool) -> None:
        """Checkpoint the region (``True``) or run it as plain autograd (``False``)."""
        self.enabled = enabled

    def recomputation(
        self, x: torch.Tensor, step: Callable[[], None], names: list[str]
    ) -> Recomputation:
        """The backward pass's peak, its largest recomputation and what the modules
        ``names`` hold then (:meth:`measure_segments`, :func:`backward_peak`)."""
        inputs, segments = self.measure_segments(x)
        recomputed = [r.activation_bytes for r in segments]
        return Recomputation(
            recompute_bytes=max(recomputed),
            peak_bytes=backward_peak(inputs, recomputed),
            layer_bytes=max(r.bytes_of(names) for r in segments),
        )


def backward_peak(inputs: list[int], recomputed: list[int]) -> int:
    """Peak saved bytes of a checkpointed backward pass from per-segment measurements.

    Backward runs the segments last to first; while segment ``i`` is recomputed the
    inputs of segments ``1..i`` are still kept (the later ones are freed), so the peak
    is ``max_i (sum_{j <= i} input_j + recompute_i)``.
    """
    return max(sum(inputs[: i + 1]) + rec for i, rec in enumerate(recomputed))


def checkpoint_region(
    model: nn.Module, first_trainable: str | None, segments: int = 1
) -> Checkpointed:
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
    segments
        Checkpointed pieces of the region (see :class:`Checkpointed`).

    Returns
    -------
    Checkpointed
        Shares every module with ``model``; training it trains ``model``.
    """
    if first_trainable is None:
        return Checkpointed(nn.Identity(), model, segments)
    if isinstance(model, nn.Sequential):
        head = first_trainable.split(".")[0]
        names = [name for name, _ in model.named_children()]
        if head not in names:
            raise KeyError(f"no child of the Sequential contains {first_trainable!r}")
        i = names.index(head)
        prefix, region = model[:i], model[i:]
    else:
        try:
            prefix, region = split_at(model, first_trainable)
        except TypeError as err:
            raise TypeError(
                f"checkpointing needs a model split_at supports or an nn.Sequential: {err}"
            ) from None
    return Checkpointed(prefix, region, segments)


@register_method("checkpoint")
@dataclass(frozen=True)
class CheckpointSettings(MethodSettings):
    """Gradient checkpointing of the trainable region.

    Attributes
    ----------
    region
        ``"auto"`` splits the model at its first trainable layer; ``"whole"``
        checkpoints the whole model (when it is already the trainable tail).
    segments
        Consecutive checkpointed pieces of the region (1: the region at once).
    """

    region: str = "auto"
    segments: int = 1

    def validate(self) -> None:
        check_choice("region", self.region, REGIONS)
        self._normalise("segments", check_int("segments", self.segments, minimum=1))

    def apply(
        self,
        model: nn.Module,
        targets: Mapping[str, nn.Module],
        *,
        calib_loader: Iterable[Any] | None = None,
        forward: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    ) -> Applied:
        """Wrap the model in a :class:`Checkpointed` (nothing is swapped); the wrapper
        switches itself off for plain BP and measures its recomputation."""
        order = [n for n, _ in model.named_modules() if n in targets]
        first = order[0] if self.region == "auto" else None
        wrapper = checkpoint_region(model, first, self.segments)
        return Applied(
            wrapper, set_enabled=wrapper.set_enabled, recomputation=wrapper.recomputation
        )
