"""Wall-clock timing of training steps, synchronised with the device they run on."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

__all__ = ["synchronizer", "time_step"]


def synchronizer(device: torch.device | str | None = None) -> Callable[[], None]:
    """A function that waits for ``device``'s queued work (a no-op on the CPU).

    ``None`` synchronises CUDA when it is available (the default device of a GPU run).
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def time_step(
    step: Callable[[], object],
    repeats: int = 5,
    warmup: int = 1,
    device: torch.device | str | None = None,
) -> list[float]:
    """Wall-clock seconds of ``step()`` over ``repeats`` runs after ``warmup`` runs.

    Uses ``time.perf_counter`` and waits for ``device`` (:func:`synchronizer`) around
    each run.  Absolute times on shared machines are noise; compare methods timed side
    by side in one process.
    """
    sync = synchronizer(device)
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return times
