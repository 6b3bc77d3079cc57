"""Saving a table: Markdown (GitHub) and LaTeX (booktabs), written atomically.

Written here rather than with pandas' ``to_markdown`` (which needs the optional
``tabulate`` package) and ``to_latex`` (whose escaping and rules change between
versions): NaN is an empty cell, numeric columns are right-aligned, special characters
are escaped in both formats.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lance_lib.io import write_text_atomic

from .figures import SavedFiles
from .provenance import Provenance

__all__ = ["save_table", "table_to_latex", "table_to_markdown"]


def _cell(value: Any, float_format: str) -> str:
    if value is None:
        return ""
    if isinstance(value, (float, np.floating)):
        return "" if np.isnan(value) else format(float(value), float_format)
    return str(value)


def table_to_markdown(df: pd.DataFrame, float_format: str = ".2f") -> str:
    """GitHub-flavoured Markdown for ``df`` (index dropped; NaN as empty cells).

    Numeric columns are right-aligned; ``|`` in a cell is escaped.
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
    "\u2021": r"$\ddagger$",
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
) -> SavedFiles:
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
        Appended to the caption, and written as ``<stem>.provenance.json``
        (:meth:`Provenance.as_dict`).
    float_format
        Format spec for floats (``".2f"``); NaN is written as an empty cell.

    Returns
    -------
    SavedFiles
        The files written (a list of paths).

    Raises
    ------
    TypeError
        ``df`` is not a DataFrame.
    """
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"save_table needs a pandas DataFrame, got {type(df).__name__}")
    stem = Path(stem)
    text = caption or ""
    if provenance is not None:
        text = (text + " " if text else "") + f"({provenance.caption()})"
    md = (f"{text}\n\n" if text else "") + table_to_markdown(df, float_format)
    written = SavedFiles(
        [
            write_text_atomic(stem.with_name(stem.name + ".md"), md),
            write_text_atomic(
                stem.with_name(stem.name + ".tex"), table_to_latex(df, float_format, text or None)
            ),
        ]
    )
    if provenance is not None:
        written.append(provenance.write_sidecar(stem))
    return written
