"""Paper-vs-ours tables: the published number, ours and their difference side by side."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

__all__ = ["paper_vs_ours"]


def paper_vs_ours(
    ours: pd.DataFrame,
    paper: pd.DataFrame,
    keys: Sequence[str],
    metrics: Sequence[str],
) -> pd.DataFrame:
    """Put the paper's number, ours and their difference side by side, per metric.

    Parameters
    ----------
    ours, paper
        Frames holding ``keys`` and ``metrics`` columns (one row per key); ``paper`` is
        usually :func:`lance_lib.reporting.paper_table`.
    keys
        Columns identifying a row (e.g. ``["model", "method", "layers", "dataset"]``).
    metrics
        Metric columns (e.g. ``["Acc", "MB"]``).

    Returns
    -------
    DataFrame
        ``keys`` then, per metric ``m``: ``"m (paper)"``, ``"m (ours)"`` and
        ``"m (ours-paper)"``.  Rows of ``ours`` are kept in order (left join); a
        missing published number gives NaN in the paper and difference columns.

    Raises
    ------
    KeyError
        If a key or metric column is missing from either frame.
    ValueError
        If ``paper`` has several rows for one key.
    """
    keys, metrics = list(keys), list(metrics)
    for name, frame in (("ours", ours), ("paper", paper)):
        missing = [c for c in keys + metrics if c not in frame.columns]
        if missing:
            raise KeyError(f"{name} lacks columns {missing}; it has {list(frame.columns)}")
    if paper.duplicated(keys).any():
        raise ValueError(f"the paper frame has several rows for some {keys}")
    merged = ours[keys + metrics].merge(
        paper[keys + metrics], on=keys, how="left", suffixes=(" (ours)", " (paper)")
    )
    out = merged[keys].copy()
    for m in metrics:
        p = pd.to_numeric(merged[f"{m} (paper)"], errors="coerce")
        o = pd.to_numeric(merged[f"{m} (ours)"], errors="coerce")
        out[f"{m} (paper)"] = p
        out[f"{m} (ours)"] = o
        out[f"{m} (ours-paper)"] = o - p
    return out
