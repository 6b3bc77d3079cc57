"""Where the project's files live, resolved from the repository root, not the working directory.

A notebook opened in JupyterLab runs with ``notebooks/`` as its working directory,
``make figures`` with the repository root, a Dask worker with whatever its launcher
chose: every default location is therefore computed from the repository root, so that
all of them read and write the same results cache, figures and checkpoints.
Environment variables move them elsewhere (shared results folders on a cluster).

Two kinds of run write figures: ``make figures`` (the notebook runner) writes the
committed ``figures/<profile>/``; a notebook run interactively (JupyterLab, or papermill
without the Makefile) writes to the untracked ``build/lab/<profile>/``
(:func:`lab_dir`), so exploring never changes a tracked file. Both share the results
cache (:func:`results_dir`).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "display_path",
    "figures_dir",
    "lab_dir",
    "profiles_dir",
    "repo_root",
    "results_dir",
]


def repo_root() -> Path:
    """The folder holding ``lance_lib/`` (the repository root for a source checkout)."""
    return Path(__file__).resolve().parent.parent


def _from_env(variable: str, default: Path) -> Path:
    value = os.environ.get(variable)
    return Path(value).expanduser().resolve() if value else default


def results_dir(kind: str | None = None) -> Path:
    """The results cache (``$LANCE_RESULTS``, default ``<repo>/results``) or its ``kind``."""
    base = _from_env("LANCE_RESULTS", repo_root() / "results")
    return base / kind if kind else base


def figures_dir(profile: str) -> Path:
    """Figures and tables of ``profile`` (under ``$LANCE_FIGURES``, default ``<repo>/figures``)."""
    return _from_env("LANCE_FIGURES", repo_root() / "figures") / profile


def lab_dir(profile: str) -> Path:
    """Figures and tables of an interactive run of ``profile`` (untracked).

    ``$LANCE_LAB/<profile>``, default ``<repo>/build/lab/<profile>``: where a notebook
    opened in JupyterLab (or run by papermill without the runner) writes, so that only
    ``make figures`` changes the committed ``figures/<profile>/``.
    """
    return _from_env("LANCE_LAB", repo_root() / "build" / "lab") / profile


def display_path(path: str | os.PathLike) -> str:
    """``path`` relative to the repository root when it lies inside it, else as given."""
    resolved = Path(path).resolve()
    try:
        return str(resolved.relative_to(repo_root()))
    except ValueError:
        return str(path)


def profiles_dir() -> Path:
    """The profile files (``$LANCE_PROFILES``, default ``<repo>/profiles``)."""
    return _from_env("LANCE_PROFILES", repo_root() / "profiles")
