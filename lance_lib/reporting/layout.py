"""Layout check of a drawn figure: no text box overlaps another, no legend covers data.

:func:`layout_problems` draws the figure and lists, in words, every pair of text boxes
that overlap (titles, axis labels, drawn tick labels, annotations, figure texts and
whole legends) and every legend that covers a drawn data point or line.
:func:`lance_lib.reporting.save_figure` runs it on every figure it writes and warns
(:class:`LayoutWarning`) with what it found, so an executed notebook shows the problem
under the figure, and the notebook tests, which fail on any stderr output, catch it.
"""

from __future__ import annotations

import itertools

import matplotlib.figure
import numpy as np
from matplotlib.axes import Axes
from matplotlib.collections import PathCollection
from matplotlib.legend import Legend
from matplotlib.patches import Rectangle
from matplotlib.text import Text
from matplotlib.transforms import Bbox

__all__ = ["LayoutWarning", "layout_problems"]

#: Pixels two boxes may share before they count as overlapping (antialiasing, padding).
TOLERANCE_PX = 1.0
#: Points sampled along each segment of a line when checking it against a legend.
LINE_SAMPLES = 20


class LayoutWarning(UserWarning):
    """A saved figure has overlapping text or a legend over its data."""


def _shrunk(box: Bbox) -> Bbox:
    return Bbox.from_extents(
        box.x0 + TOLERANCE_PX, box.y0 + TOLERANCE_PX, box.x1 - TOLERANCE_PX, box.y1 - TOLERANCE_PX
    )


def _drawn(text: Text) -> bool:
    return text.get_visible() and bool(text.get_text().strip())


def _tick_labels(ax: Axes) -> list[tuple[str, Text]]:
    """The tick labels drawn inside the view interval, major and minor, of both axes."""
    out = []
    for name, axis in (("x", ax.xaxis), ("y", ax.yaxis)):
        low, high = sorted(axis.get_view_interval())
        for which, locs, ticks in (
            ("major", axis.get_majorticklocs(), axis.get_major_ticks),
            ("minor", axis.get_minorticklocs(), axis.get_minor_ticks),
        ):
            for loc, tick in zip(locs, ticks(len(locs)), strict=True):
                if not low - 1e-12 * abs(low) <= loc <= high + 1e-12 * abs(high):
                    continue
                for label in (tick.label1, tick.label2):
                    if label.get_visible() and tick.get_visible() and label.get_text().strip():
                        out.append((f"{name} {which} tick label {label.get_text()!r}", label))
    return out


def _texts(fig: matplotlib.figure.Figure) -> list[tuple[str, Text | Legend]]:
    """Every drawn text box of the figure, named; a legend counts as one box."""
    items: list[tuple[str, Text | Legend]] = []
    if fig._suptitle is not None and _drawn(fig._suptitle):
        items.append(("suptitle", fig._suptitle))
    items += [
        (f"figure text {t.get_text()[:30]!r}", t)
        for t in fig.texts
        if _drawn(t) and t is not fig._suptitle  # the suptitle is one of the texts too
    ]
    items += [(f"figure legend {i}", leg) for i, leg in enumerate(fig.legends)]
    for i, ax in enumerate(fig.axes):
        if not ax.get_visible():
            continue
        where = f"axes {i}"
        for title in (ax._left_title, ax.title, ax._right_title):
            if _drawn(title):
                items.append((f"{where} title {title.get_text()[:30]!r}", title))
        for name, label in (("x", ax.xaxis.label), ("y", ax.yaxis.label)):
            if _drawn(label):
                items.append((f"{where} {name} label {label.get_text()[:30]!r}", label))
        items += [(f"{where} {name}", t) for name, t in _tick_labels(ax)]
        items += [(f"{where} text {t.get_text()[:30]!r}", t) for t in ax.texts if _drawn(t)]
        if ax.get_legend() is not None:
            items.append((f"{where} legend", ax.get_legend()))
    return items


def _data_points(ax: Axes) -> np.ndarray:
    """Display coordinates of the data drawn in ``ax``: line vertices and points sampled
    along their segments, scatter points, and the top edge of bars."""
    points = [np.empty((0, 2))]
    for line in ax.lines:
        if not line.get_visible():
            continue
        xy = line.get_transform().transform(np.asarray(line.get_xydata(), float))
        xy = xy[np.isfinite(xy).all(axis=1)]
        if len(xy) > 1 and line.get_linestyle() not in ("None", "", " "):
            t = np.linspace(0, 1, LINE_SAMPLES)[:, None, None]
            xy = np.concatenate([xy, (xy[:-1] + t * (xy[1:] - xy[:-1])).reshape(-1, 2)])
        points.append(xy)
    for collection in ax.collections:
        if isinstance(collection, PathCollection) and collection.get_visible():
            offsets = np.asarray(collection.get_offsets(), float)
            if len(offsets):
                points.append(collection.get_offset_transform().transform(offsets))
    for patch in ax.patches:
        if isinstance(patch, Rectangle) and patch.get_visible() and patch.get_height():
            box = patch.get_window_extent()
            top = box.y1 if patch.get_height() > 0 else box.y0
            points.append(np.column_stack([np.linspace(box.x0, box.x1, 5), np.full(5, top)]))
    out = np.concatenate(points)
    return out[np.isfinite(out).all(axis=1)]


def _inside(box: Bbox, points: np.ndarray) -> bool:
    x, y = points[:, 0], points[:, 1]
    return bool(((x > box.x0) & (x < box.x1) & (y > box.y0) & (y < box.y1)).any())


def layout_problems(fig: matplotlib.figure.Figure) -> list[str]:
    """Draw ``fig`` and list its layout problems, in words (empty when there are none).

    Parameters
    ----------
    fig
        A figure, drawn as it will be saved.

    Returns
    -------
    list of str
        One line per pair of overlapping text boxes and per legend covering data.
    """
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [(name, _shrunk(item.get_window_extent(renderer))) for name, item in _texts(fig)]
    problems = [
        f"{a} overlaps {b}"
        for (a, box_a), (b, box_b) in itertools.combinations(boxes, 2)
        if box_a.overlaps(box_b) and box_a.width > 0 and box_b.width > 0
    ]
    legends = [(n, leg) for n, leg in _texts(fig) if isinstance(leg, Legend)]
    for name, legend in legends:
        box = _shrunk(legend.get_window_extent(renderer))
        for i, ax in enumerate(fig.axes):
            if _inside(box, _data_points(ax)):
                problems.append(f"{name} covers data of axes {i}")
    return problems
