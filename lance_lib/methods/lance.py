"""LANCE and plain BP as registered methods of the harness.

``lance`` is Algorithm 1 of the paper: Phase I, a one-shot HOSVD calibration of each
treated layer's input (:func:`lance_lib.calibration.calibrate`, Eq. 2-3), then Phase
II, layers that keep only the core of Eq. (1) for backward
(:func:`lance_lib.layers.compress`).  ``bp`` leaves the layers as they are.

Which modes LANCE compresses by default
---------------------------------------
Eq. (1) as written projects every mode of the input, the batch mode included.  The
harness defaults to ``modes="channel"``: only the mode the weights act on (the
channels of a Conv2d input, the features of a Linear input).  That is the case
Theorem 1 covers: the weight gradient is then the full gradient times a projector, so
it never points away from the full gradient.  Compressing the batch or spatial modes
too keeps the gradient of the projected input exactly, but that gradient can point
away from the full one (see :mod:`lance_lib.layers`); ``modes="all"`` (Eq. 1 as
written) and ``"no_batch"`` stay available.

LANCE's modes for 3-D inputs
----------------------------
On the ``(batch, tokens, features)`` inputs of a transformer block's Linear layers
the default is also ``modes="channel"`` (the feature mode only), the reading of
Eq. (1) under which Theorem 1 holds (:mod:`lance_lib.layers`).  ``"no_batch"`` also
compresses the token mode: tokens are patch positions, fixed for a given input size,
so their covariance over calibration batches is a stable statistic and the token
factor compresses well, at the price of gradients that can point away from BP's and a
layer tied to the calibrated token count.  ``"all"`` adds the batch mode: samples in a
shuffled batch are exchangeable, so the expected batch covariance is
``a I + b 1 1^T``; apart from the mean direction no subspace is preferred, Eq. (3)
keeps a large share of the batch directions, and training is tied to the calibrated
batch size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..calibration import calibrate
from ..core_storage import core_codec
from ..hosvd import check_eps
from ..layers import compress
from ..modes import canonical_modes, check_modes
from ..validation import check_int
from .hosvd_step import tucker_elements
from .registry import Applied, MethodSettings, register_method

__all__ = ["BpSettings", "LanceSettings"]


@register_method("bp")
@dataclass(frozen=True)
class BpSettings(MethodSettings):
    """Plain backpropagation: no setting, nothing swapped."""

    def apply(
        self,
        model: nn.Module,
        targets: Mapping[str, nn.Module],
        *,
        calib_loader: Iterable[Any] | None = None,
        forward: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    ) -> Applied:
        """Nothing to do: the model trains as it is."""
        return Applied(model)


@register_method("lance")
@dataclass(frozen=True)
class LanceSettings(MethodSettings):
    """LANCE (Algorithm 1): one-shot calibration, then core-only layers.

    Attributes
    ----------
    eps
        Energy threshold of Eq. (3) (Table 4: 0.7).
    num_batches
        Calibration batches ``N`` (Table 4: 100).
    modes
        Compressed input modes: ``"channel"`` (default, see the module notes),
        ``"no_batch"``, ``"all"`` (Eq. 1 as written), indices, or a mapping from every
        treated layer to one of these.
    keep_unprofitable
        Also compress layers whose core would not save memory (depthwise convs; see
        :func:`lance_lib.layers.unprofitable_reason`); by default they train
        uncompressed and count their full input.
    core_dtype
        How the cores are stored (:mod:`lance_lib.core_storage`): ``"param"`` (the
        parameters' dtype), ``"bfloat16"``, ``"float16"`` or ``"int8"``.
    """

    eps: float = 0.7
    num_batches: int = 100
    modes: Any = "channel"
    keep_unprofitable: bool = False
    core_dtype: str = "param"

    def validate(self) -> None:
        self._normalise("eps", check_eps(self.eps))
        self._normalise("num_batches", check_int("num_batches", self.num_batches, minimum=1))
        self._normalise("modes", canonical_modes(self.modes))
        if not isinstance(self.keep_unprofitable, bool):
            raise TypeError(
                f"keep_unprofitable must be True or False, got {self.keep_unprofitable!r}"
            )
        self._normalise("core_dtype", core_codec(self.core_dtype).label)

    def apply(
        self,
        model: nn.Module,
        targets: Mapping[str, nn.Module],
        *,
        calib_loader: Iterable[Any] | None = None,
        forward: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    ) -> Applied:
        """Calibrate on ``calib_loader`` (Phase I) and compress the targets (Phase II)."""
        if calib_loader is None:
            raise ValueError(
                "method 'lance' needs calib_loader (Phase I calibration batches), e.g. "
                "the training loader"
            )
        layers = list(targets)
        check_modes(self.modes, layers)
        subspaces = calibrate(
            model,
            calib_loader,
            layers,
            eps=self.eps,
            num_batches=self.num_batches,
            modes=self.modes,
            forward=forward,
        )
        compress(
            model,
            subspaces,
            core_dtype=core_codec(self.core_dtype).dtype,
            keep_unprofitable=self.keep_unprofitable,
        )
        replacements = {name: model.get_submodule(name) for name in layers}
        return Applied(model, replacements, subspaces)

    def kept_elements(self, applied: Applied, name: str, input_shape: tuple[int, ...]) -> int:
        """Core plus the compressed modes' factors, Appendix C, for this input's shape.

        Uncompressed modes keep their full size (the batch size of this step when the
        batch mode is not compressed); a layer left uncompressed
        (:func:`lance_lib.layers.unprofitable_reason`) keeps its whole input.
        """
        if not applied.replacements[name].compressed:
            return math.prod(input_shape)
        sub = applied.subspaces[name]
        compressed = [u is not None for u in sub.factors]
        ranks = [r if c else n for r, n, c in zip(sub.ranks, input_shape, compressed, strict=True)]
        return tucker_elements(input_shape, ranks, compressed)

    def layer_ranks(self, applied: Applied, name: str) -> list[int]:
        """Calibrated mode ranks (full sizes, as calibrated, for uncompressed modes)."""
        return list(applied.subspaces[name].ranks)
