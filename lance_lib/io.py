"""Files the library writes: atomically, with the umask's mode, into folders checked first.

Every output of the project (result records, figures, tables, executed notebooks,
checkpoints, subspaces) goes through :func:`atomic_write`: the content is written to a
temporary file in the target's folder, flushed to disk, given the mode an ordinary
``open(path, "w")`` would give it (``0o666 & ~umask``; ``tempfile.mkstemp`` alone makes
``0o600``, which other users of a shared results folder cannot read), then renamed over
the target with ``os.replace``. A reader therefore sees the old file or the new one,
never half of one, and an interrupted writer leaves at most a ``*.tmp`` file behind.

:func:`ensure_writable` is called before long work starts, so that a read-only results
folder fails in the first second instead of after an hour of training.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

__all__ = [
    "atomic_write",
    "current_umask",
    "ensure_writable",
    "jsonable",
    "write_json_atomic",
    "write_text_atomic",
]


def current_umask() -> int:
    """The process's umask, read without changing it where the OS allows."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # no other way to read it: set and restore at once
    os.umask(mask)
    return mask


def ensure_writable(directory: str | os.PathLike, what: str = "output folder") -> Path:
    """Create ``directory`` if needed and check that files can be created in it.

    Parameters
    ----------
    directory
        The folder that will receive outputs.
    what
        How the folder is named in the error (e.g. ``"results_dir"``).

    Returns
    -------
    Path
        The folder.

    Raises
    ------
    PermissionError
        The folder (or a parent) cannot be created, is not a folder, or does not accept
        new files; the message names ``what``, the path and the fix.
    """
    path = Path(directory).expanduser()
    fix = "pass a folder you can write to, or fix its permissions"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as error:
        raise PermissionError(
            f"{what} {str(path)!r} cannot be created: a part of it is a file ({error}); {fix}"
        ) from error
    except OSError as error:
        raise PermissionError(f"{what} {str(path)!r} cannot be created ({error}); {fix}") from error
    try:
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-check-", suffix=".tmp")
    except OSError as error:
        raise PermissionError(f"{what} {str(path)!r} is not writable ({error}); {fix}") from error
    os.close(fd)
    os.unlink(probe)
    return path


def atomic_write(
    path: str | os.PathLike, write: Callable[[IO[Any]], object], *, binary: bool = False
) -> Path:
    """Write a file atomically: ``write(handle)`` fills a temporary file, then it is renamed.

    Parameters
    ----------
    path
        The target; its folder is created if missing.
    write
        Called with an open handle (text, or bytes with ``binary=True``) of the
        temporary file.
    binary
        Open the temporary file in binary mode.

    Returns
    -------
    Path
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (:func:`atomic_write`)."""
    return atomic_write(path, lambda handle: handle.write(text))


def jsonable(obj: Any) -> Any:
    """``obj`` with mappings, sequences, paths and numpy/torch scalars made JSON-ready."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return obj.item()
    return obj


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented, key-sorted JSON to ``path`` atomically."""
    text = json.dumps(jsonable(obj), indent=2, sort_keys=True) + "\n"
    return write_text_atomic(path, text)
