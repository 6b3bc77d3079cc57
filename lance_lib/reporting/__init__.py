"""Reporting: the figure style, figure and table writers, the paper's numbers beside ours.

The only package of the library that plots; experiments return records, notebooks pass
them here.

* :mod:`~lance_lib.reporting.style`: :func:`use_style`, :func:`figure_size`, method
  labels and colours;
* :mod:`~lance_lib.reporting.figures`: :func:`save_figure` (PNG + PDF + provenance,
  atomically, shown inline in a notebook, its layout checked);
* :mod:`~lance_lib.reporting.layout`: :func:`layout_problems` (overlapping text, legends
  over data);
* :mod:`~lance_lib.reporting.tables`: :func:`save_table` (Markdown + LaTeX booktabs);
* :mod:`~lance_lib.reporting.provenance`: :class:`Provenance`, the caption and sidecar;
* :mod:`~lance_lib.reporting.paper_numbers`: the paper's published tables;
* :mod:`~lance_lib.reporting.comparison`: :func:`paper_vs_ours`;
* :mod:`~lance_lib.reporting.accuracy_matrix`: :func:`plot_accuracy_matrix`;
* :mod:`~lance_lib.reporting.finetune_tables`: fine-tuning records as tables, over seeds;
* :mod:`~lance_lib.reporting.intervals`: mean, std and paired t-intervals over seeds;
* :mod:`~lance_lib.reporting.claim_records`: what the claims read from records (readings
  of LANCE, seed pairs, record files, "like for like");
* :mod:`~lance_lib.reporting.claims` and :mod:`~lance_lib.reporting.scorecard`: the
  paper's claims, their fixed rules and verdicts, written as ``claims.json``/``.md``;
* :mod:`~lance_lib.reporting.paper_figures`: Figs. 1c, 2, 3, 4 and Table 3's matrices,
  drawn from the notebooks' rows;
* :mod:`~lance_lib.reporting.converged`: the converged runs the claims rest on
  (``claim_runs``), looked up in the results cache, and their accuracy curves;
* :mod:`~lance_lib.reporting.banner`: :func:`show_banner`, the smoke profile's banner.
"""

from .accuracy_matrix import plot_accuracy_matrix
from .banner import banner_text, show_banner
from .comparison import paper_vs_ours
from .figures import SavedFiles, save_figure, show_png
from .layout import LayoutWarning, layout_problems
from .paper_figures import (
    MODE_STYLES,
    plot_acc_memory,
    plot_accuracy_matrices,
    plot_angle_epochs,
    plot_eps_fidelity,
    plot_lance_ablations,
)
from .paper_numbers import PAPER_DATASET, PAPER_MODEL, paper_table, paper_tables, paper_value
from .provenance import Provenance, record_sources
from .style import (
    MAX_WIDTH,
    METHOD_COLORS,
    METHOD_LABELS,
    PANEL_HEIGHT,
    PANEL_WIDTH,
    figure_size,
    method_color,
    method_label,
    use_style,
)
from .tables import save_table, table_to_latex, table_to_markdown

__all__ = [
    "plot_lance_ablations",
    "plot_eps_fidelity",
    "plot_angle_epochs",
    "plot_accuracy_matrices",
    "plot_acc_memory",
    "MODE_STYLES",
    "MAX_WIDTH",
    "LayoutWarning",
    "METHOD_COLORS",
    "METHOD_LABELS",
    "PANEL_HEIGHT",
    "PANEL_WIDTH",
    "PAPER_DATASET",
    "PAPER_MODEL",
    "Provenance",
    "SavedFiles",
    "banner_text",
    "figure_size",
    "layout_problems",
    "method_color",
    "method_label",
    "paper_table",
    "paper_tables",
    "paper_value",
    "paper_vs_ours",
    "plot_accuracy_matrix",
    "record_sources",
    "save_figure",
    "save_table",
    "show_banner",
    "show_png",
    "table_to_latex",
    "table_to_markdown",
    "use_style",
]
