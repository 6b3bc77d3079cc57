"""Saving a figure: PNG + PDF + provenance sidecar, written atomically and shown inline.

A notebook draws with matplotlib / seaborn after :func:`lance_lib.reporting.use_style`
and ends the cell with :func:`save_figure`. The figure is written as ``<stem>.png`` and
``<stem>.pdf`` (and ``<stem>.provenance.json``), and, inside a Jupyter kernel (JupyterLab,
or papermill under ``make figures``), the PNG just written is displayed in the cell
output, so the reader sees exactly the file the gallery shows, and the executed
notebooks under ``build/`` carry it as an ``image/png`` output whatever matplotlib
backend the kernel runs.
"""

from __future__ import annotations

import os
import textwrap
import warnings
from pathlib import Path

import matplotlib.figure
import matplotlib.pyplot as plt

from lance_lib.io import atomic_write
from lance_lib.paths import display_path
from lance_lib.progress import in_notebook

from .layout import LayoutWarning, layout_problems
from .provenance import Provenance
from .style import MAX_WIDTH

__all__ = ["SavedFiles", "save_figure", "show_png"]


class SavedFiles(list):
    """The paths a save wrote; shown as one short line instead of a list of ``PosixPath``.

    The folder is shown relative to the repository root when it lies inside it
    (``saved to figures/smoke: ...``), so a notebook's output names the same place on
    every machine.
    """

    def __repr__(self) -> str:
        if not self:
            return "saved nothing"
        folder = display_path(Path(self[0]).parent)
        return f"saved to {folder}: " + ", ".join(Path(p).name for p in self)


def show_png(path: str | os.PathLike) -> None:
    """Display the PNG at ``path`` in the cell output, at half its pixel size.

    :func:`save_figure` writes PNGs at 200 dpi (``savefig.dpi`` of the style), so half
    the pixel size shows the figure at 100 pixels per inch, the size it was drawn at.
    """
    from IPython.display import Image, display

    display(Image(filename=str(path), retina=True))


def _add_footer(fig: matplotlib.figure.Figure, text: str) -> None:
    """Write ``text`` under everything drawn, in a layout frozen as drawn.

    Legends placed outside the axes (``fig.legend(loc="outside ...")``) are anchored to
    the figure's box, which a tight ``savefig`` moves to include the footer; they are
    pinned where the layout put them first.
    """
    fig.canvas.draw()
    fig.set_layout_engine("none")
    renderer = fig.canvas.get_renderer()
    for legend in fig.legends:
        where = legend.get_window_extent(renderer).transformed(fig.transFigure.inverted())
        legend.set_bbox_to_anchor(where, transform=fig.transFigure)
        legend.set_loc("center")
    box = fig.get_tightbbox(renderer)  # inches
    # wrapped to the drawing's width (7 pt: about 17 characters an inch), so a long
    # caption does not widen the saved figure beyond what it draws
    text = textwrap.fill(text, max(40, int(box.width * 17)), break_long_words=False)
    fig.text(
        box.x0 / fig.get_figwidth(),
        box.y0 / fig.get_figheight() - 0.01,
        text,
        fontsize=7,
        color="0.35",
        ha="left",
        va="top",
    )


def save_figure(
    fig: matplotlib.figure.Figure,
    stem: str | os.PathLike,
    *,
    provenance: Provenance | None = None,
    show: bool | None = None,
    close: bool = True,
) -> SavedFiles:
    """Write ``fig`` as ``<stem>.png`` and ``<stem>.pdf``, each atomically, and show it.

    Parameters
    ----------
    fig
        The figure. One wider than :data:`lance_lib.reporting.style.MAX_WIDTH` inches is
        scaled down to that width first (same aspect; text keeps its size), so every
        figure of the gallery is readable at the same display width.
    stem
        Output path without suffix, e.g. ``figures/smoke/fig4_eps``.
    provenance
        If given, its :meth:`Provenance.caption` is written as a footer on the figure
        and :meth:`Provenance.as_dict` as ``<stem>.provenance.json``.
    show
        Display the written PNG in the cell output; default: when running in a Jupyter
        kernel (:func:`lance_lib.progress.in_notebook`).
    close
        Close the figure afterwards (frees memory, and keeps the inline backend from
        showing it a second time).

    Returns
    -------
    SavedFiles
        The files written (a list of paths).

    Raises
    ------
    ValueError
        ``stem`` carries a ``.png`` or ``.pdf`` suffix.

    Warns
    -----
    LayoutWarning
        Text boxes of the figure overlap, or a legend covers data
        (:func:`lance_lib.reporting.layout.layout_problems`); the files are written anyway.
    """
    stem = Path(stem)
    if stem.suffix in (".png", ".pdf"):
        raise ValueError(f"stem must not carry a suffix, got {stem}; pass {stem.with_suffix('')}")
    width, height = fig.get_size_inches()
    if width > MAX_WIDTH:
        fig.set_size_inches(MAX_WIDTH, height * MAX_WIDTH / width)
    if provenance is not None:
        _add_footer(fig, provenance.caption())
    problems = layout_problems(fig)
    if problems:
        warnings.warn(
            f"{stem.name}: " + "; ".join(problems) + " (move or shrink the text, or the "
            "legend outside the data)",
            LayoutWarning,
            stacklevel=2,
        )
    written = SavedFiles()
    for fmt in ("png", "pdf"):
        path = stem.with_name(f"{stem.name}.{fmt}")
        written.append(
            atomic_write(path, lambda handle, fmt=fmt: fig.savefig(handle, format=fmt), binary=True)
        )
    if provenance is not None:
        written.append(provenance.write_sidecar(stem))
    if in_notebook() if show is None else show:
        show_png(written[0])
    if close:
        plt.close(fig)
    return written
