"""Result files: keyed by their settings, written atomically, reused when present.

Every experiment writes one JSON file whose name carries a hash of all its settings,
so that a re-run with the same settings finds it and skips the work, and an
interrupted run never leaves a half-written file behind (write to a temporary file in
the same folder, then ``os.replace``).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["cached_json", "read_json", "result_path", "settings_key", "write_json_atomic"]


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return obj.item()
    return obj


def settings_key(settings: Mapping[str, Any]) -> str:
    """Short stable hash (12 hex digits) of a settings mapping (canonical JSON)."""
    canonical = json.dumps(_jsonable(settings), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def result_path(directory: str | os.PathLike, name: str, settings: Mapping[str, Any]) -> Path:
    """``directory/<name>-<settings_key>.json``."""
    return Path(directory) / f"{name}-{settings_key(settings)}.json"


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically (temporary file + ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(_jsonable(obj), fh, indent=2, sort_keys=True)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_json(path: str | os.PathLike) -> Any | None:
    """The JSON content of ``path``, or ``None`` when it is missing or unreadable.

    An unreadable (corrupt) file is reported with a warning and treated as missing, so
    the caller recomputes it.
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        warnings.warn(f"ignoring unreadable result file {path}: {err}", stacklevel=2)
        return None


def cached_json(path: str | os.PathLike, compute: Callable[[], Any], force: bool = False) -> Any:
    """Return the result stored at ``path``, or ``compute()`` it and store it atomically."""
    if not force:
        cached = read_json(path)
        if cached is not None:
            return cached
    result = compute()
    write_json_atomic(path, result)
    return result
