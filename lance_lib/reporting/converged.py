"""The converged fine-tunes the claims rest on (the profile's ``claim_runs`` sweep), read back.

``claim_runs`` (:func:`lance_lib.experiments.finetune_sweeps.claim_runs`) is a grid-only
sweep: ``make grid`` computes it, nothing else does. :func:`converged_records` looks its
records up in the results cache without running anything, so a notebook or the
scorecard can show the converged evidence when it is there and say so when it is not;
:func:`plot_accuracy_curves` draws the per-epoch test accuracy of BP and LANCE.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import TYPE_CHECKING

from lance_lib.methods.registry import method_color
from lance_lib.reporting.claim_records import CONVERGED_SWEEP, READINGS, Record, reading

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["CONVERGED_SWEEP", "converged_records", "plot_accuracy_curves"]


def converged_records(profile: str) -> list[Record | None] | None:
    """The stored records of ``profile``'s converged runs, looked up, never computed.

    Parameters
    ----------
    profile
        Which ``profiles/<profile>.yaml``.

    Returns
    -------
    list or None
        One entry per run of the ``claim_runs`` sweep, in its order: the record, or
        ``None`` for a run not computed yet (``make grid PROFILE=<profile>``); ``None``
        when the profile has no ``claim_runs`` section.
    """
    from lance_lib.experiments.base import stored_record
    from lance_lib.experiments.sweeps import grid_only_parameters, sweep

    try:
        params = grid_only_parameters(CONVERGED_SWEEP, profile)
    except KeyError:
        return None
    return [stored_record(config) for config in sweep(CONVERGED_SWEEP, params)]


def _curve_label(record: Record) -> tuple[str, int, str]:
    s = record["settings"]
    if s["method"] == "bp":
        return "BP", s["layers"], "bp"
    return f"LANCE, {READINGS[reading(record)].split(' (')[0]}", s["layers"], "lance"


def plot_accuracy_curves(records: Sequence[Record], ax: Axes) -> list[str]:
    """Per-epoch test accuracy of BP and LANCE (the records' ``accuracy``), mean over seeds.

    One line per method, reading of LANCE and trained layers, at the runs' own eps and N
    (BP's: the eps and N sweeps and the recalibrated diagnostic are left out); the band
    spans the seeds' minimum and maximum; solid lines train the most layers, dashed fewer;
    square markers are Eq. 1 as written, round ones BP and the channel-only reading.

    Parameters
    ----------
    records
        Fine-tuning records (several seeds per setting).
    ax
        Where to draw.

    Returns
    -------
    list of str
        The lines drawn, ``"<label>, <layers> convs: <final mean accuracy> %"``.
    """
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    bp = [r for r in records if r["settings"]["method"] == "bp"]
    point = {(r["settings"]["eps"], r["settings"]["num_batches"]) for r in bp}
    chosen = bp + [
        r for r in records
        if reading(r) and (r["settings"]["eps"], r["settings"]["num_batches"]) in point
    ]  # fmt: skip
    lines: dict[tuple[str, int, str], list[list[float]]] = {}
    for r in chosen:
        lines.setdefault(_curve_label(r), []).append([100 * a for a in r["accuracy"]])
    most = max((layers for _, layers, _ in lines), default=0)
    drawn = []
    for (label, layers, method), curves in sorted(lines.items()):
        length = min(len(c) for c in curves)
        values = np.array([c[:length] for c in curves])
        epochs = np.arange(1, length + 1)
        style = "-" if layers == most else "--"
        marker = "s" if "Eq. 1" in label else "o"
        mean = values.mean(axis=0)
        ax.plot(epochs, mean, style, color=method_color(method), marker=marker, markersize=3,
                label=f"{label}, {layers} convs ({len(curves)} seeds)")  # fmt: skip
        if len(curves) > 1:
            ax.fill_between(epochs, values.min(axis=0), values.max(axis=0),
                            color=method_color(method), alpha=0.15)  # fmt: skip
        drawn.append(f"{label}, {layers} convs: {statistics.fmean(values[:, -1]):.2f} %")
    ax.set(xlabel="epoch", ylabel="test accuracy (%)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return drawn
