"""SIGINT, SIGTERM and SIGKILL during work: nothing half-written, and the work resumes.

Each case runs the real thing in a child process on the embedded data with tiny
settings, waits until the child is in the middle of its work (training, or halfway
through writing a file), sends the signal, and checks what is on disk: never a
half-written record, checkpoint or notebook; at most a hidden ``.*.tmp`` file, which
only a process killed outright (SIGTERM, SIGKILL) leaves behind. The children of one
test run side by side, so the test costs about one child's start-up.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.notebook_files import tiny_notebook, tiny_profiles
from tests.test_finetune import TINY as FINETUNE_TINY

ROOT = Path(__file__).resolve().parents[1]
#: Seconds a child may take to reach the marked point (imports are slow on busy machines).
READY_TIMEOUT = 600

pytestmark = pytest.mark.usefixtures("one_thread")


def _default_signals() -> None:
    """Give the child the default SIGINT/SIGTERM actions.

    A test suite started in the background by a non-interactive shell (``make test &``)
    inherits SIGINT ignored, and so would every child: Ctrl-C could not be simulated.
    """
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)


class Child:
    """A child process, interrupted once it reaches the marked point of its work.

    The point is marked by a ``READY`` line on its standard output or, for work done in
    a grandchild (a notebook's kernel), by ``ready_file`` appearing.
    """

    def __init__(self, argv: list[str], log: Path, ready_file: Path | None = None) -> None:
        env = {**os.environ, "LANCE_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
        self.log = log
        with open(log, "w") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, *argv],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                preexec_fn=_default_signals,
            )
        self.ready_file = ready_file
        self.ready = threading.Event()
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.strip() == "READY":
                self.ready.set()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while not (self.ready.is_set() or (self.ready_file and self.ready_file.exists())):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the child never got ready: {self.log.read_text()[-2000:]}")
            time.sleep(0.2)

    def interrupt(self, sig: int) -> int:
        """Wait until the child is ready, send ``sig``, return the exit status."""
        try:
            self._wait_ready()
            self.proc.send_signal(sig)
            status = self.proc.wait(120)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(10)
        assert "DONE\n" not in self.lines
        return status


def _python(code: str, *args: str) -> list[str]:
    return ["-c", code, *args]


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith((".tmp", ".tmp.ipynb")))


# --- fine-tuning ------------------------------------------------------------------------

#: The fine-tuning tests' tiny run, one epoch, no measurements.
TINY = {**FINETUNE_TINY, "epochs": 1, "measure": False}

FINETUNE_CHILD = """
import io, json, sys, time
import lance_lib.experiments.cache as cache
import lance_lib.experiments.finetune as ft
from lance_lib.io import atomic_write, jsonable

def pause():
    print("READY", flush=True)
    time.sleep(600)

if sys.argv[3] == "train":
    def train_epoch(*args, **kwargs):  # a long epoch
        pause()
    ft.train_epoch = train_epoch
else:
    def write_json_atomic(path, obj):  # a slow disk: stopped halfway through the record
        text = json.dumps(jsonable(obj))
        def write(handle):
            handle.write(text[: len(text) // 2])
            handle.flush()
            pause()
            handle.write(text[len(text) // 2 :])
        return atomic_write(path, write)
    cache.write_json_atomic = write_json_atomic
ft.finetune(json.loads(sys.argv[1]), results_dir=sys.argv[2], progress=False)
print("DONE", flush=True)
"""

#: SIGTERM and SIGKILL both end a process without cleanup; SIGINT runs ``finally`` blocks.
FINETUNE_CASES = [("train", signal.SIGTERM), ("write", signal.SIGINT), ("write", signal.SIGKILL)]


def test_interrupted_finetune_leaves_no_record_and_runs_again(tmp_path):
    from lance_lib.experiments.finetune import FinetuneRecord, finetune

    folders = [tmp_path / f"{stage}-{sig.name}" for stage, sig in FINETUNE_CASES]
    children = [
        Child(_python(FINETUNE_CHILD, json.dumps(TINY), str(f), stage), tmp_path / f"{f.name}.log")
        for f, (stage, _) in zip(folders, FINETUNE_CASES, strict=True)
    ]
    for child, folder, (stage, sig) in zip(children, folders, FINETUNE_CASES, strict=True):
        status = child.interrupt(sig)
        assert status != 0, (stage, sig)
        assert not list(folder.glob("*.json")), (stage, sig)  # no record, whole or half
        left = _leftovers(folder)
        if stage == "train" or sig == signal.SIGINT:
            assert left == [], (stage, sig, left)  # SIGINT: the writer removed its .tmp
        else:
            assert [name.startswith(".finetune-") for name in left] == [True], left
    again = finetune(TINY, results_dir=folders[-1], progress=False)  # beside a stale .tmp
    stored = json.loads(Path(again["path"]).read_text())
    assert set(FinetuneRecord.fields()) <= set(stored)


# --- pretraining ------------------------------------------------------------------------

PRETRAIN = dict(resolution=16, epochs=3, batch_size=64, seed=0, progress=False)

PRETRAIN_CHILD = """
import io, json, sys, time
import lance_lib.training.loop as loop
import lance_lib.training.pretrain as pt

def pause():
    print("READY", flush=True)
    time.sleep(600)

calls = []
if sys.argv[3] == "train":
    train_epoch = loop.train_epoch
    def second_epoch_pauses(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            pause()
        return train_epoch(*args, **kwargs)
    loop.train_epoch = second_epoch_pauses
else:
    atomic_write = pt.atomic_write
    def second_state_write_stops_halfway(path, write, binary=False):
        calls.append(1)
        if len(calls) != 2:
            return atomic_write(path, write, binary=binary)
        buffer = io.BytesIO()
        write(buffer)
        data = buffer.getvalue()
        def half(handle):
            handle.write(data[: len(data) // 2])
            handle.flush()
            pause()
        return atomic_write(path, half, binary=True)
    pt.atomic_write = second_state_write_stops_halfway
pt.pretrain("mcunet", "cifar10_mini", [0, 1], cache_dir=sys.argv[2], **json.loads(sys.argv[1]))
print("DONE", flush=True)
"""

PRETRAIN_CASES = [("train", signal.SIGINT), ("train", signal.SIGTERM), ("write", signal.SIGKILL)]


def _state(folder: Path) -> dict:
    (partial,) = folder.glob("*.partial.pt")
    return torch.load(partial, map_location="cpu", weights_only=True)


def test_interrupted_pretraining_keeps_a_valid_epoch_state_and_resumes(tmp_path):
    from lance_lib.training.pretrain import pretrain

    folders = [tmp_path / f"{stage}-{sig.name}" for stage, sig in PRETRAIN_CASES]
    children = [
        Child(
            _python(PRETRAIN_CHILD, json.dumps(PRETRAIN), str(f), stage), tmp_path / f"{f.name}.log"
        )
        for f, (stage, _) in zip(folders, PRETRAIN_CASES, strict=True)
    ]
    for child, folder, (stage, sig) in zip(children, folders, PRETRAIN_CASES, strict=True):
        assert child.interrupt(sig) != 0
        # the state of epoch 1 is whole (stage "write": epoch 2's state never replaced it)
        assert len(_state(folder)["curve"]) == 1, (stage, sig)
        assert [p.name for p in folder.glob("*.pt") if "partial" not in p.name] == []
        if sig == signal.SIGINT:
            assert _leftovers(folder) == []
    saved = _state(folders[-1])["curve"][0]
    model = pretrain("mcunet", "cifar10_mini", [0, 1], cache_dir=folders[-1], **PRETRAIN)
    curve = model.pretrain_record["curve"]
    assert len(curve) == 3 and curve[0] == saved  # resumed after epoch 1, not restarted
    assert not list(folders[-1].glob("*.partial.pt"))


# --- a notebook run -------------------------------------------------------------------

SLOW_CELL = """import os, pathlib, time
pathlib.Path(outputs_dir, "kernel.pid").write_text(str(os.getpid()))
if size == 3:  # the profile's value: a long cell; --set size=4 runs at once
    time.sleep(600)"""


def _ended(pid: int, timeout: float = 60) -> bool:
    """Whether process ``pid`` ends (or is a zombie) within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
            state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        except (ProcessLookupError, FileNotFoundError):
            return True
        if state == "Z":
            return True
        time.sleep(0.5)
    os.kill(pid, signal.SIGKILL)
    return False


def test_interrupted_notebook_run_leaves_no_output_and_runs_again(tmp_path):
    import nbformat

    from lance_lib.notebook_runner import run_notebook

    profiles = tiny_profiles(tmp_path / "profiles")
    notebook = tiny_notebook(tmp_path / "tiny.ipynb", SLOW_CELL)
    signals = [signal.SIGINT, signal.SIGTERM, signal.SIGKILL]
    children = []
    for sig in signals:
        figs, output = tmp_path / sig.name / "figs", tmp_path / sig.name / "tiny.ipynb"
        argv = ["-m", "lance_lib.notebook_runner", str(notebook), str(output)]
        argv += ["--profile", "t", "--profiles-dir", str(profiles), "--outputs-dir", str(figs)]
        children.append(Child(argv, tmp_path / f"{sig.name}.log", figs / "kernel.pid"))
    for child, sig in zip(children, signals, strict=True):
        assert child.interrupt(sig) != 0
        folder = tmp_path / sig.name
        assert not (folder / "tiny.ipynb").exists()  # no output, whole or half
        assert _ended(int(child.ready_file.read_text())), f"{sig.name}: the kernel lives on"
        if sig != signal.SIGKILL:  # cleaned up: the partial run kept for reading, no claim
            nbformat.read(folder / "tiny.failed.ipynb", as_version=4)
            assert _leftovers(folder) == [] and not (folder / ".tiny.ipynb.claim").exists()
    killed = tmp_path / "SIGKILL"
    options = dict(profile="t", profiles_dir=profiles, outputs_dir=killed / "figs")
    assert run_notebook(notebook, killed / "tiny.ipynb", overrides={"size": 4}, **options)
    nbformat.read(killed / "tiny.ipynb", as_version=4)
    assert _leftovers(killed) == [] and not (killed / ".tiny.ipynb.claim").exists()
