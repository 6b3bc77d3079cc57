"""One figure style for the project: seaborn theme, figure sizes, method labels and colours.

Every figure of the project is drawn after :func:`use_style` and sized with
:func:`figure_size`, so that the gallery's figures share one panel size and one font
size, whatever the number of panels; :func:`lance_lib.reporting.save_figure` caps the
width of figures sized by hand at :data:`MAX_WIDTH`. Method labels and colours come from
the one method table, :data:`lance_lib.methods.METHOD_TABLE` (:func:`method_label`,
:func:`method_color` are re-exported here for plotting code).
"""

from __future__ import annotations

import seaborn as sns

from lance_lib.methods.registry import METHOD_TABLE, method_color, method_label
from lance_lib.validation import check_int

__all__ = [
    "MAX_WIDTH",
    "METHOD_COLORS",
    "METHOD_LABELS",
    "PANEL_HEIGHT",
    "PANEL_WIDTH",
    "figure_size",
    "method_color",
    "method_label",
    "use_style",
]

#: Width and height of one panel, inches.
PANEL_WIDTH = 3.6
PANEL_HEIGHT = 2.9
#: The widest figure written (inches); wider ones are scaled down when saved.
MAX_WIDTH = 11.0

#: Display names of the methods, read from the one method table
#: (:data:`lance_lib.methods.METHOD_TABLE`); prefer :func:`method_label`.
METHOD_LABELS: dict[str, str] = {name: info.label for name, info in METHOD_TABLE.items()}

#: One colour per method, the same in every figure, from the method table; prefer
#: :func:`method_color`.
METHOD_COLORS: dict[str, str] = {name: info.color for name, info in METHOD_TABLE.items()}


def figure_size(ncols: int = 1, nrows: int = 1) -> tuple[float, float]:
    """The project's size for a grid of ``nrows`` x ``ncols`` panels, in inches.

    Panels are :data:`PANEL_WIDTH` x :data:`PANEL_HEIGHT`; the width is capped at
    :data:`MAX_WIDTH` (panels then get narrower, fonts stay the same size).
    """
    check_int("ncols", ncols, minimum=1)
    check_int("nrows", nrows, minimum=1)
    return min(PANEL_WIDTH * ncols, MAX_WIDTH), PANEL_HEIGHT * nrows


def use_style() -> None:
    """Apply the project's one figure style (seaborn ``whitegrid``, ``paper`` context).

    Fonts are sized for figures shown at their own size (notebook and gallery): 10 pt
    text, 9 pt legends, a legend without frame.
    """
    sns.set_theme(
        context="paper",
        style="whitegrid",
        palette="colorblind",
        font_scale=1.1,
        rc={
            "figure.dpi": 100,
            "figure.figsize": figure_size(2),
            "figure.constrained_layout.use": True,  # room for suptitles and legends
            "savefig.dpi": 200,
            "savefig.bbox": "tight",
            "axes.titleweight": "bold",
            "legend.frameon": False,
            "legend.fontsize": 9,
            "legend.title_fontsize": 9,
            "pdf.fonttype": 42,  # embed TrueType: editable text in the PDF
        },
    )
