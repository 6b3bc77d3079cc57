"""Where datasets live: the data root, the layouts searched, and the not-found error.

The data root is :func:`data_root`: the ``root`` argument, else ``$LANCE_DATA``, else the
repository's ``data/`` folder (resolved from the repository root, never the working
directory, so a notebook run from ``notebooks/`` and ``make`` from the root read the
same files). A dataset is looked for first in torchvision's layout directly under the
root (``ROOT/cifar-10-batches-py``, ``ROOT/MNIST/raw``, ...), then in the same layout
under a folder named after the registry name (``ROOT/cifar10/cifar-10-batches-py``,
``ROOT/mnist/MNIST/raw``, ...). A missing dataset raises :class:`DatasetNotFoundError`
naming the paths searched and how to obtain it.
"""

from __future__ import annotations

import os
from pathlib import Path

from lance_lib.paths import repo_root

__all__ = [
    "ROOT_RULE",
    "DatasetNotFoundError",
    "data_root",
    "find_base",
    "search_paths",
]

ROOT_RULE = "the data root is the `root` argument, else $LANCE_DATA, else the repository's data/"


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are not under the data root (and ``download`` was not asked)."""


def data_root(root: str | os.PathLike | None = None) -> Path:
    """Return the folder that holds the datasets.

    Parameters
    ----------
    root : str or os.PathLike, optional
        Explicit data root; wins over everything else.

    Returns
    -------
    pathlib.Path
        ``root`` if given, else ``$LANCE_DATA`` if set and non-empty, else the
        repository's ``data/`` folder (:func:`lance_lib.paths.repo_root`), whatever the
        working directory.
    """
    if root is None:
        root = os.environ.get("LANCE_DATA") or repo_root() / "data"
    return Path(root).expanduser()


def search_paths(root: Path, name: str, layout: str) -> list[Path]:
    """Where ``layout`` is searched: ``ROOT/<layout>``, then ``ROOT/<name>/<layout>``."""
    return [root / layout, root / name / layout]


def find_base(root: Path, name: str, layout: str) -> Path | None:
    """Return the torchvision root (``ROOT`` or ``ROOT/<name>``) holding ``layout``."""
    for base in (root, root / name):
        if (base / layout).exists():
            return base
    return None
