"""One seaborn style for every figure, atomic figure/table writers, paper-vs-ours tables.

This is the only module of the library that plots.  Notebooks call

* :func:`use_style` once, then draw with matplotlib / seaborn;
* :func:`save_figure` to write ``<stem>.png`` and ``<stem>.pdf`` (and a provenance
  sidecar ``<stem>.provenance.json``) atomically;
* :func:`save_table` to write ``<stem>.md`` and ``<stem>.tex`` (booktabs) atomically;
* :func:`paper_vs_ours` to put the paper's published number, ours and the difference
  side by side;
* :func:`plot_accuracy_matrix` for the continual-learning accuracy matrix
  ``A[j, i]`` (accuracy on task ``i`` after training task ``j``).

Every output states the profile, datasets and models that produced it
(:class:`Provenance`): in the figure's footer or the table's caption, and in the
sidecar JSON.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from .results import write_json_atomic

__all__ = [
    "METHOD_COLORS",
    "METHOD_LABELS",
    "Provenance",
    "method_color",
    "paper_vs_ours",
    "plot_accuracy_matrix",
    "save_figure",
    "save_table",
    "table_to_latex",
    "table_to_markdown",
    "use_style",
]

#: Display names of the methods, as the paper's tables write them.
METHOD_LABELS: dict[str, str] = {
    "bp": "BP",
    "lance": "LANCE",
    "hosvd": "HOSVD",
    "asi": "ASI",
    "loract": "LoRAct",
    "checkpoint": "Checkpointing",
}

#: One colour per method, the same in every figure (seaborn "colorblind" palette).
METHOD_COLORS: dict[str, tuple[float, float, float]] = dict(
    zip(METHOD_LABELS, sns.color_palette("colorblind", len(METHOD_LABELS)), strict=True)
)


def method_color(method: str) -> tuple[float, float, float]:
    """The colour of ``method`` (key of :data:`METHOD_LABELS` or its label), grey if unknown."""
    key = method.lower()
    for k, label in METHOD_LABELS.items():
        if key in (k, label.lower()):
            return METHOD_COLORS[k]
    return (0.5, 0.5, 0.5)


def use_style() -> None:
    """Apply the project's one figure style (seaborn ``whitegrid``, ``paper`` context)."""
    sns.set_theme(
        context="paper",
        style="whitegrid",
        palette="colorblind",
        font_scale=1.1,
        rc={
            "figure.dpi": 110,
            "figure.constrained_layout.use": True,  # room for suptitles and legends
            "savefig.dpi": 200,
            "savefig.bbox": "tight",
            "axes.titleweight": "bold",
            "legend.frameon": False,
            "pdf.fonttype": 42,  # embed TrueType: editable text in the PDF
        },
    )


@dataclass
class Provenance:
    """What produced a figure or table: profile, datasets, models, and free notes.

    Parameters
    ----------
    profile
        Name of the ``profiles/<name>.yaml`` profile (``smoke``, ``cpu``, ``paper``).
    datasets, models
        Names as passed to :func:`lance_lib.data.get_dataset` /
        :func:`lance_lib.models.build_model`.
    notes
        Anything else a reader needs (stand-in models, reduced epochs, ...).
    """

    profile: str
    datasets: Sequence[str]
    models: Sequence[str]
    notes: Sequence[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.profile:
            raise ValueError("Provenance needs the profile name")
        for name in ("datasets", "models", "notes"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = [value]
            setattr(self, name, [str(v) for v in value])

    def caption(self) -> str:
        """One line: ``profile: smoke | datasets: ... | models: ...`` (+ notes)."""
        parts = [
            f"profile: {self.profile}",
            f"datasets: {', '.join(self.datasets) or '-'}",
            f"models: {', '.join(self.models) or '-'}",
        ]
        return " | ".join(parts + list(self.notes))

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready mapping."""
        return asdict(self)


_UMASK = os.umask(0)
os.umask(_UMASK)


def _atomic(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then rename it to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give figures the usual mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _write_text(path: Path, text: str) -> Path:
    return _atomic(path, lambda tmp: tmp.write_text(text))


def save_figure(
    fig: matplotlib.figure.Figure,
    stem: str | os.PathLike,
    *,
    provenance: Provenance | None = None,
    close: bool = True,
) -> list[Path]:
    """Write ``fig`` as ``<stem>.png`` and ``<stem>.pdf``, each atomically.

    Parameters
    ----------
    fig
        The figure.
    stem
        Output path without suffix, e.g. ``figures/smoke/fig4_eps``.
    provenance
        If given, its :meth:`Provenance.caption` is written as a footer on the figure
        and its content as ``<stem>.provenance.json``.
    close
        Close the figure afterwards (frees memory in long notebooks).

    Returns
    -------
    list of Path
        The files written.
    """
    stem = Path(stem)
    if stem.suffix in (".png", ".pdf"):
        raise ValueError(f"stem must not carry a suffix, got {stem}")
    if provenance is not None:
        fig.canvas.draw()  # lay out first, then put the footer under everything drawn
        box = fig.get_tightbbox(fig.canvas.get_renderer())
        fig.text(
            box.x0 / fig.get_figwidth(),
            box.y0 / fig.get_figheight() - 0.01,
            provenance.caption(),
            fontsize=7,
            color="0.35",
            ha="left",
            va="top",
        )
    written = []
    for fmt in ("png", "pdf"):
        path = stem.with_name(stem.name + f".{fmt}")
        written.append(_atomic(path, lambda tmp, fmt=fmt: fig.savefig(tmp, format=fmt)))
    if provenance is not None:
        written.append(
            write_json_atomic(stem.with_name(stem.name + ".provenance.json"), provenance.as_dict())
        )
    if close:
        plt.close(fig)
    return written


def _cell(value: Any, float_format: str) -> str:
    if isinstance(value, (float, np.floating)):
        return "" if np.isnan(value) else format(float(value), float_format)
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    return str(value)


def table_to_markdown(df: pd.DataFrame, float_format: str = ".2f") -> str:
    """GitHub-flavoured Markdown for ``df`` (index dropped; NaN as empty cells).

    Numeric columns are right-aligned.  Written here because pandas' ``to_markdown``
    needs the optional ``tabulate`` package.
    """
    cols = [str(c) for c in df.columns]
    numeric = [pd.api.types.is_numeric_dtype(df[c]) for c in df.columns]
    rows = [
        [_cell(v, float_format).replace("|", "\\|") for v in row]
        for row in df.itertuples(index=False, name=None)
    ]
    lines = [
        "| " + " | ".join(cols) + " |",
        "|" + "|".join("---:" if n else "---" for n in numeric) + "|",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "\u2020": r"$\dagger$",
    "\u03b5": r"$\varepsilon$",
}


def _latex_escape(text: object) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def table_to_latex(df: pd.DataFrame, float_format: str = ".2f", caption: str | None = None) -> str:
    """A booktabs ``tabular`` (inside a ``table`` float when ``caption`` is given)."""
    numeric = [pd.api.types.is_numeric_dtype(df[c]) for c in df.columns]
    spec = "".join("r" if n else "l" for n in numeric)
    lines = [
        rf"\begin{{tabular}}{{{spec}}}",
        r"\toprule",
        " & ".join(_latex_escape(c) for c in df.columns) + r" \\",
        r"\midrule",
    ]
    for row in df.itertuples(index=False, name=None):
        lines.append(" & ".join(_latex_escape(_cell(v, float_format)) for v in row) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    if caption is not None:
        lines = [
            r"\begin{table}[t]",
            r"\centering",
            rf"\caption{{{_latex_escape(caption)}}}",
            *lines,
            r"\end{table}",
        ]
    return "\n".join(lines) + "\n"


def save_table(
    df: pd.DataFrame,
    stem: str | os.PathLike,
    *,
    caption: str | None = None,
    provenance: Provenance | None = None,
    float_format: str = ".2f",
) -> list[Path]:
    """Write ``df`` as ``<stem>.md`` (Markdown) and ``<stem>.tex`` (LaTeX booktabs), atomically.

    Parameters
    ----------
    df
        The table; its index is dropped (reset it first to keep it).
    stem
        Output path without suffix.
    caption
        Text above the Markdown table and in the LaTeX ``\\caption``.
    provenance
        Appended to the caption, and written as ``<stem>.provenance.json``.
    float_format
        Format spec for floats (``".2f"``); NaN is written as an empty cell.

    Returns
    -------
    list of Path
        The files written.
    """
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"save_table needs a pandas DataFrame, got {type(df).__name__}")
    stem = Path(stem)
    text = caption or ""
    if provenance is not None:
        text = (text + " " if text else "") + f"({provenance.caption()})"
    md = (f"{text}\n\n" if text else "") + table_to_markdown(df, float_format)
    written = [
        _write_text(stem.with_name(stem.name + ".md"), md),
        _write_text(
            stem.with_name(stem.name + ".tex"), table_to_latex(df, float_format, text or None)
        ),
    ]
    if provenance is not None:
        written.append(
            write_json_atomic(stem.with_name(stem.name + ".provenance.json"), provenance.as_dict())
        )
    return written


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
        Long or wide frames holding ``keys`` and ``metrics`` columns (one row per key).
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


def plot_accuracy_matrix(
    acc_matrix: Sequence[Sequence[float]] | np.ndarray,
    ax: matplotlib.axes.Axes | None = None,
    *,
    title: str | None = None,
    percent: bool | None = None,
) -> matplotlib.axes.Axes:
    """Heatmap of the continual-learning accuracy matrix ``A[j, i]``.

    Row ``j`` is "after training task j", column ``i`` "accuracy on task i".  Only the
    lower triangle (``i <= j``, tasks already seen) is drawn.  ACC is the mean of the
    last row and BWT the mean of ``A[T, i] - A[i, i]`` over ``i < T`` (GPM style).

    Parameters
    ----------
    acc_matrix
        Square ``(T, T)`` array; fractions in [0, 1] or percentages.
    ax
        Axes to draw on; a new figure when ``None``.
    title
        Axes title.
    percent
        Whether values are percentages; guessed (any value > 1) when ``None``.

    Returns
    -------
    Axes
    """
    a = np.asarray(acc_matrix, dtype=float)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] == 0:
        raise ValueError(f"acc_matrix must be a non-empty square matrix, got shape {a.shape}")
    if percent is None:
        percent = bool(np.nanmax(a) > 1.0)
    values = a if percent else 100.0 * a
    mask = np.triu(np.ones_like(values, dtype=bool), k=1)
    if ax is None:
        size = 1.2 + 0.45 * a.shape[0]
        _, ax = plt.subplots(figsize=(size + 1.0, size))
    sns.heatmap(
        values,
        mask=mask,
        ax=ax,
        vmin=0.0,
        vmax=100.0,
        cmap="viridis",
        annot=a.shape[0] <= 12,
        fmt=".0f",
        square=True,
        cbar_kws={"label": "accuracy (%)"},
        xticklabels=range(1, a.shape[0] + 1),
        yticklabels=range(1, a.shape[0] + 1),
    )
    ax.set_xlabel("evaluated on task i")
    ax.set_ylabel("after training task j")
    if title:
        ax.set_title(title)
    return ax
