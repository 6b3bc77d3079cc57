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
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
#: Seconds a child may take to reach the marked point (imports are slow on busy machines).
READY_TIMEOUT = 600

pytestmark = pytest.mark.usefixtures("one_thread")


class Child:
    """A Python child process that prints ``READY`` when it reaches the point to interrupt."""

    def __init__(self, code: str, *args: str) -> None:
        env = {**os.environ, "LANCE_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.ready = threading.Event()
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.strip() == "READY":
                self.ready.set()

    def interrupt(self, sig: int) -> int:
        """Wait for ``READY``, send ``sig``, return the exit status."""
        try:
            if not self.ready.wait(READY_TIMEOUT):
                self.proc.kill()
                pytest.fail(f"the child never got ready: {self.proc.stderr.read()[-2000:]}")
            self.proc.send_signal(sig)
            status = self.proc.wait(120)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(10)
        assert "DONE\n" not in self.lines
        return status


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith(".tmp"))


# --- fine-tuning ------------------------------------------------------------------------

TINY = dict(
    model="mcunet",
    weights=None,
    classes=[0, 1],
    resolution=16,
    layers=2,
    epochs=1,
    batch_size=16,
    max_steps_per_epoch=2,
    max_samples=64,
    num_batches=2,
    measure=False,
)

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
        Child(FINETUNE_CHILD, json.dumps(TINY), str(folder), stage)
        for folder, (stage, _) in zip(folders, FINETUNE_CASES, strict=True)
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
import lance_lib.experiments.loop as loop
import lance_lib.experiments.pretrain as pt

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
    from lance_lib.experiments.pretrain import pretrain

    folders = [tmp_path / f"{stage}-{sig.name}" for stage, sig in PRETRAIN_CASES]
    children = [
        Child(PRETRAIN_CHILD, json.dumps(PRETRAIN), str(folder), stage)
        for folder, (stage, _) in zip(folders, PRETRAIN_CASES, strict=True)
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
