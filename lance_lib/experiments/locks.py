"""File locks (exclusive claims): at most one process computes a given result record at a time.

A Dask scheduler that presumes a worker dead (no heartbeat within its time-to-live)
hands the worker's task to another worker, although the first may still be computing;
two grids over the same results folder (two users, ``make grid`` beside a notebook) can
ask for the same experiment. Atomic record writes already keep the results folder
consistent then, but the experiment would be computed twice. A claim prevents that: a
small file that names its holder, created complete and exclusively (written atomically
under a private name, then hard-linked to the claim's name: the link fails if the claim
exists, the ``O_CREAT | O_EXCL`` guarantee, and is atomic on local file systems and on
NFS, where it is the classic lock-file idiom), kept fresh by a heartbeat thread and
removed when the work is done.

A claim is *stale*, and may be broken, when its holder is a process of this machine that
no longer exists (detected at once, e.g. a worker killed by ``SIGKILL``), or when its
heartbeat stopped for longer than ``stale_after`` seconds (a holder on another machine,
or a reused process id). Breaking is itself serialized by a short-lived ``.break`` file,
so that two processes that both saw the same stale claim cannot delete each other's new
claim.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from lance_lib.io import write_json_atomic
from lance_lib.validation import check_real

__all__ = ["Claim", "claim_is_stale", "read_claim", "try_claim"]

#: Seconds between two heartbeats of a held claim.
HEARTBEAT_S = 10.0
#: Seconds without a heartbeat after which any claim is stale.
STALE_AFTER_S = 60.0


def _machine() -> str:
    """This machine and process-id namespace (process ids are comparable within it)."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return f"{socket.gethostname()}|{namespace}"


def _process_exists(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, killed but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):  # no /proc: trust kill()
        return True
    return state != "Z"


def read_claim(path: str | os.PathLike) -> dict[str, Any] | None:
    """The holder recorded in the claim file (``machine``, ``pid``, ``token``), if readable.

    ``None`` when the file is missing or not a claim.
    """
    try:
        holder = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return holder if isinstance(holder, dict) else None


def claim_is_stale(path: str | os.PathLike, *, stale_after: float = STALE_AFTER_S) -> bool:
    """Whether the claim at ``path`` may be broken: its holder is gone or silent.

    ``False`` when there is no claim (nothing to break).
    """
    path = Path(path)
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return False
    holder = read_claim(path)
    if holder is not None and holder.get("machine") == _machine():
        pid = holder.get("pid")
        if isinstance(pid, int) and not _process_exists(pid):
            return True
    return age > stale_after


def _create_exclusive(path: Path, holder: dict[str, Any]) -> bool:
    """Create ``path`` holding ``holder``, complete, unless it exists; whether it was created."""
    draft = path.with_name(f".{path.name}.{holder['token']}")
    write_json_atomic(draft, holder)
    try:
        os.link(draft, path)  # atomic, and fails if ``path`` exists: O_CREAT | O_EXCL
    except FileExistsError:
        return False
    finally:
        draft.unlink()
    return True


def _break(path: Path, observed: dict[str, Any] | None, stale_after: float) -> None:
    """Delete the stale claim ``observed`` at ``path``, unless someone renewed it meanwhile."""
    lock = path.with_name(path.name + ".break")
    breaker = {"machine": _machine(), "pid": os.getpid(), "token": uuid.uuid4().hex}
    if not _create_exclusive(lock, breaker):
        if claim_is_stale(lock, stale_after=stale_after):  # a breaker that died midway
            lock.unlink(missing_ok=True)
        return
    try:
        if read_claim(path) == observed and claim_is_stale(path, stale_after=stale_after):
            path.unlink(missing_ok=True)
    finally:
        lock.unlink(missing_ok=True)


class Claim:
    """A held claim: refreshed by a heartbeat thread until :meth:`release`.

    Use as a context manager; obtain one with :func:`try_claim`.
    """

    def __init__(self, path: Path, holder: dict[str, Any], heartbeat: float) -> None:
        self.path = path
        self.holder = holder
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._beat, args=(heartbeat,), name=f"claim {path.name}", daemon=True
        )
        self._thread.start()

    @property
    def held(self) -> bool:
        """Whether the claim file still names this holder (``False`` once broken by others)."""
        return read_claim(self.path) == self.holder

    def _beat(self, interval: float) -> None:
        while not self._stop.wait(interval):
            if not self.held:
                return
            try:
                os.utime(self.path)
            except FileNotFoundError:
                return

    def release(self) -> None:
        """Stop the heartbeat and remove the claim file if it is still this holder's."""
        self._stop.set()
        self._thread.join()
        if self.held:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def try_claim(
    path: str | os.PathLike,
    *,
    heartbeat: float = HEARTBEAT_S,
    stale_after: float = STALE_AFTER_S,
) -> Claim | None:
    """Claim ``path`` for this process, or return ``None`` if a live holder has it.

    A stale claim (see :func:`claim_is_stale`) is broken first.

    Parameters
    ----------
    path
        The claim file; its folder must exist.
    heartbeat
        Seconds between refreshes of the claim's modification time.
    stale_after
        Seconds without a refresh after which a claim counts as abandoned; must exceed
        ``heartbeat``.

    Returns
    -------
    Claim or None
        The held claim (release it, or use it as a context manager).
    """
    check_real("heartbeat", heartbeat, low=0.0, low_open=True)
    check_real("stale_after", stale_after, low=heartbeat, low_open=True)
    path = Path(path)
    if claim_is_stale(path, stale_after=stale_after):
        _break(path, read_claim(path), stale_after)
    holder = {"machine": _machine(), "pid": os.getpid(), "token": uuid.uuid4().hex}
    if not _create_exclusive(path, holder):
        return None
    return Claim(path, holder, heartbeat)
