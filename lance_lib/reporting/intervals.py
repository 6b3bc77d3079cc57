"""Seeds and intervals for the claims: mean, std and a paired t-interval, judged against a bar.

A claim that compares LANCE with BP over seeds (Table 2's gap, Table 1's gap, Fig. 3's
``N = 2`` against the largest ``N``) reads the per-seed paired differences; their
:func:`paired_interval` is the two-sided Student-t interval of the mean difference, and
:func:`judge` compares it with the rule's threshold: ``reproduced`` when the whole
interval satisfies the rule, ``not reproduced`` when none of it does, ``inconclusive``
when it straddles the threshold. One seed gives no interval: ``inconclusive``, saying so.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["LEVEL", "Interval", "judge", "judge_band", "paired_interval"]

#: Confidence level of every interval of the scorecard.
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """Mean, standard deviation and the t-interval of a sample (one value per seed).

    Attributes
    ----------
    values
        The sample, in seed order.
    seeds
        The seeds the values come from.
    mean, std
        Sample mean and standard deviation (``ddof=1``; ``None`` for one value).
    low, high
        The two-sided ``level`` t-interval of the mean (``None`` for one value).
    level
        Confidence level.
    """

    values: tuple[float, ...]
    seeds: tuple[int, ...]
    mean: float
    std: float | None
    low: float | None
    high: float | None
    level: float = LEVEL

    @property
    def n(self) -> int:
        """Number of seeds."""
        return len(self.values)

    def text(self, unit: str = "") -> str:
        """``-2.10 +- 0.40 points (95 % CI -3.09 .. -1.11, 3 seeds)`` or the one-seed form."""
        if self.low is None or self.high is None or self.std is None:
            return f"{self.mean:+.2f}{unit} (1 seed {list(self.seeds)}: no interval)"
        return (
            f"{self.mean:+.2f} +- {self.std:.2f}{unit} ({100 * self.level:g} % CI "
            f"{self.low:+.2f} .. {self.high:+.2f}, {self.n} seeds {list(self.seeds)})"
        )

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready fields, with ``n``."""
        return {**asdict(self), "values": list(self.values), "seeds": list(self.seeds),
                "n": self.n}  # fmt: skip


def paired_interval(
    differences: Sequence[float], seeds: Sequence[int], level: float = LEVEL
) -> Interval:
    """The t-interval of the mean of per-seed paired differences (LANCE - BP, ...).

    Parameters
    ----------
    differences
        One difference per seed (same seed, same settings but the compared one).
    seeds
        The seeds, in the order of ``differences``.
    level
        Two-sided confidence level in ``(0, 1)``.

    Returns
    -------
    Interval
        ``low = mean - t_{(1+level)/2, n-1} s / sqrt(n)`` and ``high`` likewise; ``std``,
        ``low`` and ``high`` are ``None`` for a single seed.

    Raises
    ------
    ValueError
        No differences, a seed count that differs from theirs, repeated seeds, or
        ``level`` outside ``(0, 1)``.
    """
    from scipy import stats

    values = tuple(float(d) for d in differences)
    seeds = tuple(int(s) for s in seeds)
    if not values or len(values) != len(seeds) or len(set(seeds)) != len(seeds):
        raise ValueError(
            f"paired_interval needs one difference per distinct seed, got {len(values)} "
            f"differences for seeds {list(seeds)}"
        )
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level!r}; e.g. level=0.95")
    mean = statistics.fmean(values)
    if len(values) == 1:
        return Interval(values, seeds, mean, None, None, None, level)
    std = statistics.stdev(values)
    half = float(stats.t.ppf((1 + level) / 2, len(values) - 1)) * std / math.sqrt(len(values))
    return Interval(values, seeds, mean, std, mean - half, mean + half, level)


def judge(interval: Interval, threshold: float) -> tuple[str, str]:
    """Verdict of the rule ``mean >= threshold`` on ``interval``, and a note.

    Returns
    -------
    tuple
        ``("reproduced", "")`` when the whole interval is at or above ``threshold``,
        ``("not reproduced", "")`` when it lies below, ``("inconclusive", why)`` when it
        straddles the threshold or is undefined (one seed).
    """
    if interval.low is None or interval.high is None:
        return "inconclusive", f"one seed ({interval.seeds[0]}): no interval; the rule needs 3"
    if interval.low >= threshold:
        return "reproduced", ""
    if interval.high < threshold:
        return "not reproduced", ""
    return "inconclusive", (
        f"the interval {interval.low:+.2f} .. {interval.high:+.2f} straddles {threshold:+.2f}"
    )


def judge_band(interval: Interval, half_width: float) -> tuple[str, str]:
    """Verdict of the rule ``|mean| <= half_width`` on ``interval`` (as :func:`judge`)."""
    if interval.low is None or interval.high is None:
        return "inconclusive", f"one seed ({interval.seeds[0]}): no interval; the rule needs 3"
    if -half_width <= interval.low and interval.high <= half_width:
        return "reproduced", ""
    if interval.low > half_width or interval.high < -half_width:
        return "not reproduced", ""
    return "inconclusive", (
        f"the interval {interval.low:+.2f} .. {interval.high:+.2f} straddles +-{half_width:g}"
    )
