"""The paper's figures drawn from the rows the notebooks compute (Figs. 1c, 2, 3, 4, Table 3).

Each function takes the data frame (or records) its notebook builds and returns the
figure, laid out so that no text overlaps and no legend covers data, whatever the
number of models, datasets and modes (:func:`lance_lib.reporting.layout_problems`,
tested on reference-sized inputs in ``tests/test_paper_figures.py``): many lines become
small multiples, legends sit outside the panels, method colours come from the method
table and the compressed modes keep one line style and marker everywhere.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib.figure
import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from lance_lib.methods.registry import method_color, method_label
from lance_lib.models import MODEL_INFO

from .accuracy_matrix import plot_accuracy_matrix
from .style import MAX_WIDTH, PANEL_HEIGHT, PANEL_WIDTH

__all__ = [
    "MODE_STYLES",
    "plot_acc_memory",
    "plot_accuracy_matrices",
    "plot_angle_epochs",
    "plot_eps_fidelity",
    "plot_lance_ablations",
]

#: Line style, marker and label of each choice of compressed modes (Theorem 1's
#: ``channel`` solid), the same in every figure.
MODE_STYLES: dict[str | None, tuple[str, str, str]] = {
    "channel": ("-", "o", "channel mode only"),
    "no_batch": ("--", "^", "all but the batch mode"),
    "all": (":", "s", "all modes (Eq. 1)"),
    None: ("-", "o", "default modes"),
}


def _model(model: str, width: int = 26) -> str:
    """The model's display name, wrapped to fit a panel title."""
    return textwrap.fill(MODEL_INFO[model].label, width, break_on_hyphens=False)


def _grid(n: int, max_cols: int = 3) -> tuple[int, int]:
    cols = min(n, max_cols)
    return math.ceil(n / cols), cols


def _plain_log(axis: Any) -> None:
    """Readable log ticks: major at 1, 2, 5 x 10^k written as plain numbers, no minor labels."""
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
    axis.set_minor_formatter(NullFormatter())


def _legend_below(fig: matplotlib.figure.Figure, handles: list, labels: list, ncol: int) -> None:
    unique = dict(zip(labels, handles, strict=True))
    fig.legend(list(unique.values()), list(unique), loc="outside lower center", ncol=ncol)


def _mode_handles(modes: Sequence[str | None], color: str) -> tuple[list, list]:
    handles = [
        Line2D([], [], color=color, ls=MODE_STYLES[m][0], marker=MODE_STYLES[m][1]) for m in modes
    ]
    return handles, [MODE_STYLES[m][2] for m in modes]


def plot_acc_memory(rows: pd.DataFrame, layer_counts: Sequence[int]) -> matplotlib.figure.Figure:
    """Fig. 1c: test accuracy against activation memory, one panel per model and dataset.

    ``rows``: one batch size of :func:`lance_lib.reporting.finetune_tables.finetune_rows`
    (columns ``model, dataset, method, layers, analytic_mb, accuracy, flops,
    batch_size``). Marker area follows FLOPs; filled markers train the most layers.
    """
    pairs = list(rows.groupby(["model", "dataset"], sort=False).groups)
    nrows, ncols = _grid(len(pairs))
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(min(PANEL_WIDTH * ncols, MAX_WIDTH), 3.2 * nrows + 0.6),
        squeeze=False,
    )  # fmt: skip
    size = 30 + 300 * rows.flops / rows.flops.max()
    for ax in axes.flat[len(pairs) :]:
        ax.set_visible(False)
    for ax, (model, dataset) in zip(axes.flat, pairs, strict=False):
        for method in rows.method.unique():
            for layers in sorted(rows.layers.unique()):
                sel = (rows.model == model) & (rows.dataset == dataset) & (rows.method == method)
                sel &= rows.layers == layers
                c = method_color(method)
                ax.scatter(rows[sel].analytic_mb, rows[sel].accuracy, s=size[sel],
                           facecolors=c if layers == max(layer_counts) else "none",
                           edgecolors=c, linewidths=1.5,
                           label=f"{method_label(method)}, {layers} layers")  # fmt: skip
        ax.set_xscale("log")
        _plain_log(ax.xaxis)
        ax.margins(0.2)
        batch = rows[rows.model == model].batch_size.iloc[0]
        ax.set(xlabel="activation memory (MB, log)", ylabel="test accuracy (%)",
               title=f"{_model(model)}\n{dataset}, batch {batch}")  # fmt: skip
    handles, labels = axes.flat[0].get_legend_handles_labels()
    _legend_below(fig, handles, labels, ncol=min(len(labels), 4))
    fig.suptitle("Fig. 1c: accuracy vs activation memory (marker area ~ FLOPs)")
    return fig


def plot_angle_epochs(
    rows: pd.DataFrame, ablation: pd.DataFrame, methods: Sequence[str]
) -> matplotlib.figure.Figure:
    """Fig. 2: the angle to the BP gradient across epochs, and memory against angle.

    Small multiples: one panel per model, dataset and compressed method, one line per
    choice of modes (:data:`MODE_STYLES`), in the method's colour; the last panel puts
    each run's measured memory against its angle before training, the modes of one
    model and dataset joined by a thin line.
    """
    shown = [m for m in methods if m != "bp"]
    groups = list(rows[rows.method.isin(shown)].groupby(["method", "model", "dataset"],
                                                        sort=False).groups)  # fmt: skip
    nrows, ncols = _grid(len(groups) + 1)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(min(PANEL_WIDTH * ncols, MAX_WIDTH), 3.0 * nrows + 0.8),
        squeeze=False, sharey=True,
    )  # fmt: skip
    top = max(90, 10 * (int(rows.angle_deg.max()) // 10 + 2))
    modes = list(dict.fromkeys(rows.modes))
    for ax, (method, model, dataset) in zip(axes.flat, groups, strict=False):
        d = rows[(rows.method == method) & (rows.model == model) & (rows.dataset == dataset)]
        for (_, mode), g in d.groupby(["layers", "modes"], sort=False, dropna=False):
            line, marker, _ = MODE_STYLES[mode]
            ax.plot(g.epoch, g.angle_deg, marker=marker, ms=4, ls=line,
                    color=method_color(method))  # fmt: skip
        ax.axhline(70, color="0.5", lw=0.8, ls=(0, (1, 3)))
        ax.set(ylim=(0, top), xlabel="epoch (angle at its start)",
               title=f"{method_label(method)}: {_model(model)}\n{dataset}, "
               f"{d.layers.iloc[0]} layers")  # fmt: skip
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for row in axes:
        row[0].set_ylabel("angle to BP gradient (deg)")
    ax = axes.flat[len(groups)]
    for (method, _, _), g in ablation.groupby(["method", "model", "dataset"], sort=False):
        g = g.sort_values("measured_memory_ratio")
        ax.plot(g.measured_memory_ratio, g.angle_first, color="0.75", lw=0.8, zorder=1)
        for _, r in g.iterrows():
            ax.scatter(r.measured_memory_ratio, r.angle_first, color=method_color(method),
                       marker=MODE_STYLES[r.modes][1], s=36, zorder=2)  # fmt: skip
    ratios = ablation.measured_memory_ratio
    if ratios.max() > 10 * ratios.min():
        ax.set_xscale("log")
        _plain_log(ax.xaxis)
    ax.set(ylim=(0, top), xlabel="measured memory / BP", title="memory vs angle\nbefore training")
    ax.yaxis.set_tick_params(labelleft=True)
    for extra in axes.flat[len(groups) + 1 :]:
        extra.set_visible(False)
    color = method_color(shown[0]) if len(shown) == 1 else "0.3"
    handles, labels = _mode_handles(modes, color)
    handles.append(Line2D([], [], color="0.5", lw=0.8, ls=(0, (1, 3))))
    labels.append("70° (the paper's bound)")
    _legend_below(fig, handles, labels, ncol=len(labels))
    fig.suptitle("Fig. 2: gradient alignment with full BP across epochs, per compressed modes")
    return fig


def plot_lance_ablations(
    rows: pd.DataFrame, titles: Mapping[str, tuple[str, str]], num_batches_values: Sequence[int]
) -> matplotlib.figure.Figure:
    """Fig. 3: accuracy (solid, left axis) and memory (dashed, right axis, log) of LANCE
    against eps and against the calibration batches N.

    ``rows``: :func:`lance_lib.reporting.finetune_tables.fig3_rows`; ``titles``:
    ``{"eps": (title, x label), "num_batches": (title, x label)}``.
    """
    fig, axes = plt.subplots(1, 2, figsize=(MAX_WIDTH, PANEL_HEIGHT + 1.0))
    markers = ["o", "s", "^", "D"]
    handles: list = []
    labels: list = []
    for ax, kind in zip(axes, ("eps", "num_batches"), strict=True):
        mem_ax = ax.twinx()
        for i, (model, d) in enumerate(rows[rows.sweep == kind].groupby("model", sort=False)):
            label = MODEL_INFO[model].label
            ax.plot(d.value, d.accuracy, marker=markers[i % 4], color=method_color("lance"),
                    label=f"{label}: LANCE accuracy")  # fmt: skip
            mem_ax.plot(d.value, d.memory_mb, marker=markers[i % 4], ls="--", color="0.3",
                        label=f"{label}: LANCE memory")  # fmt: skip
            ax.axhline(d.bp_accuracy.iloc[0], color=method_color("bp"), lw=0.8, ls=":",
                       label=f"{label}: BP accuracy")  # fmt: skip
        mem_ax.set_yscale("log")
        _plain_log(mem_ax.yaxis)
        ax.set(title=titles[kind][0], xlabel=titles[kind][1], ylabel="test accuracy (%)")
        if kind == "num_batches":
            if max(num_batches_values) >= 10 * min(num_batches_values):
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xticks(num_batches_values, [str(v) for v in num_batches_values])
        mem_ax.set_ylabel("activation memory (MB, log)")
        mem_ax.grid(False)
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.append(h), labels.append(lab)
        for h, lab in zip(*mem_ax.get_legend_handles_labels(), strict=True):
            handles.append(h), labels.append(lab)
    _legend_below(fig, handles, labels, ncol=3)
    fig.suptitle("Fig. 3: LANCE ablations (accuracy solid, memory dashed)")
    return fig


def plot_eps_fidelity(rows: pd.DataFrame) -> matplotlib.figure.Figure:
    """Figs. 4 and 6: angle (mean +- std), memory ratio and accuracy against eps, one row
    of panels per model and dataset, one line style per choice of modes.

    ``rows``: :func:`lance_lib.experiments.gradient_fidelity.fidelity_rows`.
    """
    pairs = list(rows.groupby(["model", "dataset"], sort=False))
    fig, axes = plt.subplots(len(pairs), 3, figsize=(MAX_WIDTH, 3.0 * len(pairs) + 0.7),
                             squeeze=False)  # fmt: skip
    color = method_color("lance")
    modes = list(dict.fromkeys(rows.modes))
    for ((model, dataset), d), (ax_a, ax_m, ax_acc) in zip(pairs, axes, strict=True):
        for mode, g in d.groupby("modes", sort=False):
            line, marker, _ = MODE_STYLES.get(mode, MODE_STYLES[None])
            ax_a.errorbar(g.eps, g.angle_mean, yerr=g.angle_std, marker=marker, ls=line,
                          color=color, capsize=3)  # fmt: skip
            ax_m.plot(g.eps, g.measured_memory_ratio, marker=marker, ls=line, color=color)
            ax_m.plot(g.eps, g.memory_ratio, marker=marker, ls=line, color=color, alpha=0.35)
            ax_acc.plot(g.eps, g.accuracy, marker=marker, ls=line, color=color)
        ax_m.set_yscale("log")
        _plain_log(ax_m.yaxis)
        top = max(90, 10 * (int((d.angle_mean + d.angle_std).max()) // 10 + 2))
        ax_a.set(ylim=(0, top), xlabel="eps", ylabel="angle to BP (deg)",
                 title=f"{_model(model, 30)}, {dataset}\nangle")  # fmt: skip
        ax_m.set(
            xlabel="eps", ylabel="memory LANCE / BP", title="memory ratio\n(faint: Appendix C)"
        )
        ax_acc.axhline(d.bp_accuracy.iloc[0], ls="--", color=method_color("bp"))
        ax_acc.set(xlabel="eps", ylabel="test accuracy (%)", title="accuracy\n")
    handles, labels = _mode_handles(modes, color)
    handles.append(Line2D([], [], color=method_color("bp"), ls="--"))
    labels.append(f"{method_label('bp')} accuracy")
    _legend_below(fig, handles, labels, ncol=len(labels))
    fig.suptitle("Fig. 4/6: gradient fidelity, memory and accuracy against eps, per modes")
    return fig


def plot_accuracy_matrices(
    matrices: Sequence[tuple[str, Sequence[Sequence[float]]]],
) -> matplotlib.figure.Figure:
    """Table 3's accuracy matrices side by side (at most 5 a row), one colour bar.

    ``matrices``: ``(title, A)`` pairs, ``A[j, i]`` in percent.
    """
    nrows, ncols = _grid(len(matrices), max_cols=5)
    side = min(2.6, (MAX_WIDTH - 1.0) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(side * ncols + 1.0, (side + 0.9) * nrows),
                             squeeze=False)  # fmt: skip
    chars = int(side * 10)  # a title line's characters that fit above one matrix
    for ax, (title, matrix) in zip(axes.flat, matrices, strict=False):
        title = "\n".join(
            textwrap.fill(line, chars, break_long_words=False) for line in title.split("\n")
        )
        plot_accuracy_matrix(matrix, ax=ax, title=title, percent=True, colorbar=False)
    for ax in axes.flat[len(matrices) :]:
        ax.set_visible(False)
    for ax in axes.flat[1:]:
        ax.set_ylabel("")
    scale = ScalarMappable(Normalize(0, 100), cmap="viridis")
    fig.colorbar(scale, ax=axes, label="accuracy (%)", shrink=0.8)
    return fig
