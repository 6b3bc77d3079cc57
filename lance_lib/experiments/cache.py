"""The results cache: one JSON record per experiment, keyed by its settings, never stale.

A record is reused only when it is what the request would compute: a JSON object whose
stored ``settings`` equal the request's settings and which holds every field the caller
requires. Anything else (edited settings, an empty ``{}``, a list, a truncated file, a
record of an older schema) is reported with a :class:`CacheWarning` and recomputed. The
output folder is checked for writability *before* the work starts, and the record is
written atomically (:func:`lance_lib.io.atomic_write`) with its provenance
(:func:`lance_lib.provenance.record`), so an interrupted run leaves nothing half-written.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from lance_lib import provenance
from lance_lib.io import ensure_writable, jsonable, write_json_atomic

__all__ = [
    "CacheWarning",
    "cached_record",
    "load_record",
    "record_path",
    "settings_key",
]


class CacheWarning(UserWarning):
    """A stored record did not match the request and is being recomputed."""


def settings_key(settings: Mapping[str, Any]) -> str:
    """Short stable hash (12 hex digits) of a settings mapping (canonical JSON)."""
    canonical = json.dumps(jsonable(settings), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def record_path(directory: str | os.PathLike, name: str, settings: Mapping[str, Any]) -> Path:
    """``directory/<name>-<settings_key>.json``."""
    return Path(directory) / f"{name}-{settings_key(settings)}.json"


def _differences(stored: Any, wanted: Any, prefix: str = "") -> list[str]:
    """Dotted names of the settings that differ (for the warning)."""
    if isinstance(stored, dict) and isinstance(wanted, dict):
        out: list[str] = []
        for key in sorted(set(stored) | set(wanted)):
            out += _differences(stored.get(key), wanted.get(key), f"{prefix}{key}.")
        return out
    return [] if stored == wanted else [prefix.rstrip(".")]


def load_record(
    path: str | os.PathLike, settings: Mapping[str, Any], required: Iterable[str] = ()
) -> dict[str, Any] | None:
    """The record stored at ``path`` if it answers the request, else ``None`` (with a warning).

    Parameters
    ----------
    path
        The record file.
    settings
        The request's settings; the record's ``settings`` must equal them exactly.
    required
        Fields a complete record holds (its schema).

    Returns
    -------
    dict or None
        ``None`` when the file is missing (silently) or unusable (with a
        :class:`CacheWarning` saying why).
    """
    path = Path(path)
    if not path.exists():
        return None

    def reject(reason: str) -> None:
        warnings.warn(f"not reusing {path}: {reason}; recomputing it", CacheWarning, 3)

    try:
        stored = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return reject(f"unreadable ({type(error).__name__}: {error})")
    if not isinstance(stored, dict):
        return reject(f"a record is a JSON object, this file holds a {type(stored).__name__}")
    wanted = jsonable(settings)
    if stored.get("settings") != wanted:
        if "settings" not in stored:
            return reject("it stores no settings")
        differ = ", ".join(_differences(stored["settings"], wanted)) or "?"
        return reject(f"its stored settings differ from the request ({differ})")
    missing = sorted(set(required) - set(stored))
    if missing:
        return reject(f"it lacks the fields {missing} (incomplete or older schema)")
    return stored


def cached_record(
    path: str | os.PathLike,
    settings: Mapping[str, Any],
    compute: Callable[[], Mapping[str, Any]],
    *,
    required: Iterable[str] = (),
    force: bool = False,
    provenance_extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Return the stored record for ``settings``, or ``compute()`` it and store it.

    Parameters
    ----------
    path
        The record file (see :func:`record_path`).
    settings
        Stored as the record's ``settings`` and compared on reuse.
    compute
        Runs the experiment; returns the record's fields (``settings`` and
        ``provenance`` are added; a ``provenance`` mapping it returns, e.g. the hash of
        weights known only after the run, is merged into the added one).
    required
        Fields a complete record holds; checked on reuse and on the computed record.
    force
        Recompute even when a matching record exists.
    provenance_extra
        Added to the record's ``provenance`` (seeds, weights, profile ...).

    Returns
    -------
    dict
        The record, with ``path`` (where it is stored).

    Raises
    ------
    PermissionError
        The folder cannot receive the record (checked before ``compute`` runs).
    """
    path = Path(path)
    required = tuple(required)
    ensure_writable(path.parent, "results folder")
    if not force:
        stored = load_record(path, settings, required)
        if stored is not None:
            return {**stored, "path": str(path)}
    computed = dict(compute())
    extra = {**dict(provenance_extra or {}), **dict(computed.pop("provenance", None) or {})}
    record = {
        **computed,
        "settings": jsonable(settings),
        "provenance": provenance.record(**extra),
    }
    missing = sorted(set(required) - set(record))
    if missing:
        raise RuntimeError(f"the computed record for {path.name} lacks {missing}")
    write_json_atomic(path, record)
    return {**record, "path": str(path)}
