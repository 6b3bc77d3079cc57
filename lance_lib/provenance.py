"""Where a number came from: code version, software, hardware, threads, seeds, weights.

Two runs of the same commit can differ (other thread counts, another CPU, other
weights); :func:`environment` records what a reader needs to tell why, and every output
of the project (result records, figures, tables, the weights manifest) carries it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import platform
import subprocess
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from lance_lib.io import jsonable

__all__ = [
    "DECIDING_PATHS",
    "cpu_model",
    "environment",
    "git_commit",
    "parameters_sha256",
    "record",
]

_REPO = Path(__file__).resolve().parent.parent

#: What decides a number: a change here (tracked, or a new file git does not ignore)
#: makes the checkout dirty.
DECIDING_PATHS = ("lance_lib", "profiles", "notebooks", "bench", "Makefile")
_PACKAGES = ("torch", "torchvision", "tensorly", "numpy")


@functools.cache
def git_commit() -> dict[str, Any]:
    """The commit of the checkout holding the library and whether it is clean.

    Returns
    -------
    dict
        ``commit`` (sha or ``None`` outside git), ``dirty`` (``True`` when a file under
        :data:`DECIDING_PATHS` differs from the commit or is new and not ignored: the
        numbers then come from code, profiles or notebooks that no commit holds; ``None``
        when git cannot tell) and ``dirty_paths`` (those files, at most 20).
    """

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", *args], cwd=_REPO, capture_output=True, text=True, check=True, timeout=10
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout

    commit = (git("rev-parse", "HEAD") or "").strip()
    if not commit:
        return {"commit": None, "dirty": None, "dirty_paths": []}
    status = git("status", "--porcelain", "--untracked-files=all", "--", *DECIDING_PATHS)
    if status is None:
        return {"commit": commit, "dirty": None, "dirty_paths": []}
    paths = [line[3:] for line in status.splitlines() if line.strip()]
    return {"commit": commit, "dirty": bool(paths), "dirty_paths": paths[:20]}


def parameters_sha256(parameters: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON of resolved parameters (a notebook's, a config's).

    Keys sorted, no whitespace, values made JSON-ready by :func:`lance_lib.io.jsonable`:
    equal parameters give equal hashes whatever their order or container types.
    """
    canonical = json.dumps(jsonable(parameters), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


@functools.cache
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else :func:`platform.processor`)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def environment(device: str | torch.device | None = None) -> dict[str, Any]:
    """Software and hardware of this process.

    Parameters
    ----------
    device
        The device the experiment ran on; its GPU name is recorded when it is CUDA.

    Returns
    -------
    dict
        ``commit``, ``dirty``, ``python``, ``versions`` (torch, torchvision, tensorly,
        numpy), ``platform``, ``cpu``, ``cpu_count``, ``torch_threads``, ``device`` and
        ``gpu`` (name or ``None``).
    """
    import os

    device = torch.device(device) if device is not None else torch.device("cpu")
    gpu = None
    if device.type == "cuda" and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(device)
    return {
        **git_commit(),
        "python": platform.python_version(),
        "versions": {name: _version(name) for name in _PACKAGES},
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "gpu": gpu,
    }


def record(
    *,
    seeds: Sequence[int] | int | None = None,
    weights: Mapping[str, str] | None = None,
    device: str | torch.device | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A provenance record: :func:`environment` plus the run's seeds and weights.

    Parameters
    ----------
    seeds
        The seeds the output depends on.
    weights
        ``{name: sha256}`` of every weight file used (see
        :func:`lance_lib.weights.manifest_entry`).
    device
        As in :func:`environment`.
    **extra
        Anything else worth keeping (profile, datasets, models, notes).

    Returns
    -------
    dict
        JSON-ready.
    """
    if isinstance(seeds, int):
        seeds = [seeds]
    return {
        **environment(device),
        "seeds": None if seeds is None else sorted({int(s) for s in seeds}),
        "weights": dict(weights or {}),
        **extra,
    }
