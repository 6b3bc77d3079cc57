"""Checks at the boundary: each names the argument, the value it got and what would work.

Public functions validate their arguments once, on entry, with these helpers, so that a
bad value fails before any work starts and says how to fix it (never a bare
``int()``/``float()`` ``TypeError`` from deep inside).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection
from typing import Any

__all__ = ["check_choice", "check_int", "check_real"]


def _got(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def check_int(
    name: str,
    value: Any,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
    allow_none: bool = False,
) -> int | None:
    """``value`` as an ``int``, or a ``TypeError``/``ValueError`` naming ``name``.

    Integral floats (``2.0``) are accepted; ``1.5``, ``True``, strings and ``None``
    (unless ``allow_none``) are not.
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be an integer, got {_got(value)}")
    if isinstance(value, numbers.Integral):
        out = int(value)
    elif math.isfinite(float(value)) and float(value).is_integer():
        out = int(value)
    else:
        raise ValueError(
            f"{name} must be a whole number, got {_got(value)}; e.g. {name}="
            f"{max(minimum or 1, int(value) if math.isfinite(value) else 1)}"
        )
    if minimum is not None and out < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {out}; e.g. {name}={minimum}")
    if maximum is not None and out > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {out}; e.g. {name}={maximum}")
    return out


def check_real(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    allow_none: bool = False,
    hint: str = "",
) -> float | None:
    """``value`` as a finite ``float`` within the bounds, or an error naming ``name``.

    ``low_open``/``high_open`` exclude the bound itself (``eps`` lies in ``(0, 1]``).
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {_got(value)}{hint and '; ' + hint}")
    out = float(value)
    left = "(" if low_open else "["
    right = ")" if high_open else "]"
    span = f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
    bad = not math.isfinite(out)
    if low is not None:
        bad = bad or out < low or (low_open and out == low)
    if high is not None:
        bad = bad or out > high or (high_open and out == high)
    if bad:
        raise ValueError(f"{name} must lie in {span}, got {_got(value)}{hint and '; ' + hint}")
    return out


def check_choice(name: str, value: Any, choices: Collection[Any]) -> Any:
    """``value`` if it is one of ``choices``, else a ``ValueError`` listing them."""
    if value not in choices:
        listed = ", ".join(repr(c) for c in sorted(choices, key=str))
        raise ValueError(f"{name} must be one of {listed}; got {_got(value)}")
    return value
