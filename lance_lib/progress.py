"""Progress bars a reader sees: tqdm bars, on by default when someone is watching.

Every loop of the library that runs longer than a few seconds wraps its iterable in
:func:`progress_bar`. Whether the bar is drawn is decided once, by
:func:`progress_enabled`:

* ``progress=True`` / ``False`` passed by the caller wins;
* else the environment variable ``LANCE_PROGRESS`` (``1``/``0``, ``on``/``off``,
  ``true``/``false``, ``yes``/``no``); the notebook runner sets it to ``0`` for the
  kernels it starts, so ``make figures`` writes no bars into the executed notebooks;
* else the bar is on in a Jupyter kernel (JupyterLab: a widget bar, through
  ``ipywidgets``) and in a terminal (stderr is a TTY), and off otherwise (logs, CI).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm

__all__ = ["PROGRESS_ENV", "in_notebook", "interactive", "progress_bar", "progress_enabled"]

#: Environment variable that switches bars on or off when the caller does not say.
PROGRESS_ENV = "LANCE_PROGRESS"
_ON = {"1", "on", "true", "yes"}
_OFF = {"0", "off", "false", "no"}


def in_notebook() -> bool:
    """Whether this process is a Jupyter kernel (JupyterLab, papermill, nbclient)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def interactive() -> bool:
    """Whether someone is likely watching: a Jupyter kernel, or stderr on a terminal."""
    if in_notebook():
        return True
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


def progress_enabled(progress: bool | None = None) -> bool:
    """Whether to draw a bar: ``progress`` if given, else ``$LANCE_PROGRESS``, else interactive.

    Raises
    ------
    ValueError
        ``LANCE_PROGRESS`` holds something other than an on/off word.
    """
    if progress is not None:
        return bool(progress)
    value = os.environ.get(PROGRESS_ENV, "").strip().lower()
    if value in _ON:
        return True
    if value in _OFF:
        return False
    if value:
        raise ValueError(
            f"{PROGRESS_ENV}={os.environ[PROGRESS_ENV]!r} is not an on/off value; "
            f"set it to one of {sorted(_ON | _OFF)} or unset it"
        )
    return interactive()


def progress_bar(
    iterable: Iterable[Any] | None = None,
    *,
    progress: bool | None = None,
    desc: str | None = None,
    total: int | None = None,
    leave: bool = False,
    **kwargs: Any,
) -> tqdm:
    """A ``tqdm.auto`` bar over ``iterable`` (or a manual one with ``total``).

    Parameters
    ----------
    iterable
        What to iterate; ``None`` for a bar advanced with ``.update()``.
    progress
        Draw it (``True``), never (``False``), or decide by :func:`progress_enabled`.
    desc, total, leave, **kwargs
        As for :class:`tqdm.tqdm`; bars vanish when done unless ``leave=True``.

    Returns
    -------
    tqdm
        Usable as an iterable and as a context manager, drawn or not.
    """
    return tqdm(
        iterable,
        desc=desc,
        total=total,
        leave=leave,
        disable=not progress_enabled(progress),
        **kwargs,
    )
