"""Which modes of a layer's input LANCE compresses: the mode selections and their checks.

Eq. (1) projects every mode of a layer input, the batch mode included; Theorem 1 covers
only the feature mode (the mode the weights act on).  A selection is ``None`` /
``"all"``, ``"no_batch"``, ``"channel"``, a sequence of mode indices, or a mapping from
layer name to one of these (:data:`MODE_NAMES`, :func:`resolve_modes`).  Used by
:func:`lance_lib.calibration.calibrate`, the per-step baselines and the experiments'
settings (:func:`canonical_modes` gives equal selections one spelling).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

__all__ = [
    "MODE_NAMES",
    "Modes",
    "canonical_modes",
    "check_modes",
    "feature_mode",
    "modes_jsonable",
    "resolve_modes",
]


def feature_mode(module: nn.Module, ndim: int) -> int:
    """Index of the input mode the layer's weights act on (mode ``d`` of Sec. 2.3).

    The input channels (mode 1) for Conv2d, the last mode for Linear.
    """
    return 1 if isinstance(module, nn.Conv2d) else ndim - 1


Modes = Sequence[int] | Mapping[str, Any] | str | None

#: The named mode selections: ``"all"`` (Eq. 1 as written, every mode), ``"no_batch"``
#: (every mode but the batch mode) and ``"channel"`` (only the mode the weights act on:
#: the channels of a Conv2d input, the last mode of a Linear input; Theorem 1's scope).
MODE_NAMES = ("all", "no_batch", "channel")


def check_modes(modes: Modes, layers: Sequence[str]) -> None:
    """Validate ``modes`` once, before any batch runs, for the layers ``layers``.

    Raises
    ------
    ValueError
        A string that is not one of :data:`MODE_NAMES`, or a per-layer mapping that
        leaves out one of ``layers`` (it would otherwise compress that layer's every
        mode, the batch mode included, without saying so).
    TypeError
        ``modes`` is neither ``None``, a string, a sequence of indices nor a mapping.
    """
    if isinstance(modes, Mapping):
        missing = [name for name in layers if name not in modes]
        if missing:
            raise ValueError(
                f"the modes mapping has no entry for layers {missing}; give every "
                f"calibrated layer its modes, e.g. {{{missing[0]!r}: 'channel'}}, or pass "
                "one setting for all layers (modes='channel', 'no_batch' or 'all')"
            )
        for value in modes.values():
            check_modes(value, ())
        return
    if modes is None:
        return
    if isinstance(modes, str):
        if modes not in MODE_NAMES:
            raise ValueError(
                f"modes={modes!r} is not a mode selection; use one of {MODE_NAMES}, "
                "mode indices or a per-layer mapping"
            )
        return
    if not isinstance(modes, Sequence) or not all(
        isinstance(m, int) and not isinstance(m, bool) for m in modes
    ):
        raise TypeError(
            f"modes must be None, one of {MODE_NAMES}, a sequence of mode indices or a "
            f"per-layer mapping; got {modes!r}"
        )


def canonical_modes(modes: Modes) -> Any:
    """``modes`` checked and in one spelling: ``None`` -> ``"all"``, indices -> a tuple.

    Settings dataclasses store this form, so equal selections give equal results keys.
    """
    check_modes(modes, ())
    if modes is None:
        return "all"
    if isinstance(modes, str):
        return modes
    if isinstance(modes, Mapping):
        return {str(k): canonical_modes(v) for k, v in modes.items()}
    return tuple(int(m) for m in modes)


def modes_jsonable(modes: Modes) -> Any:
    """``modes`` as JSON-ready values (strings and ``None`` as they are, indices as lists)."""
    if modes is None or isinstance(modes, str):
        return modes
    if isinstance(modes, Mapping):
        return {str(k): modes_jsonable(v) for k, v in modes.items()}
    return [int(m) for m in modes]


def resolve_modes(modes: Modes, ndim: int, name: str, feature: int) -> list[int]:
    """Sorted indices of the modes to compress in one layer's ``ndim``-mode input.

    Parameters
    ----------
    modes
        ``None`` / ``"all"`` (every mode), ``"no_batch"`` (every mode but 0),
        ``"channel"`` (``[feature]`` only), indices (negative allowed) or a mapping
        from layer name to any of these.
    ndim
        Number of modes of the layer's input.
    name
        The layer's name (for the mapping and for messages).
    feature
        The mode the layer's weights act on (:func:`feature_mode`).
    """
    if isinstance(modes, Mapping):
        if name not in modes:
            check_modes(modes, [name])
        modes = modes[name]
    check_modes(modes, ())
    if modes is None or modes == "all":
        return list(range(ndim))
    if modes == "no_batch":
        return list(range(1, ndim))
    if modes == "channel":
        return [feature % ndim]
    out = []
    for m in modes:
        if not -ndim <= m < ndim:
            raise ValueError(f"mode {m} does not exist for the {ndim}-mode input of layer {name!r}")
        out.append(m % ndim)
    return sorted(set(out))
