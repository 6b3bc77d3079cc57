"""Exclusive claims: one holder at a time, stale claims of dead or silent holders broken."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lance_lib.experiments.locks import claim_is_stale, read_claim, try_claim
from lance_lib.io import write_json_atomic


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_held_claim_excludes_others_until_released(tmp_path):
    path = tmp_path / "x.claim"
    claim = try_claim(path)
    assert claim is not None and claim.held
    assert try_claim(path) is None  # a live holder (this process) has it
    claim.release()
    assert not path.exists()
    with try_claim(path) as again:
        assert again.held
    assert not path.exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no drafts left behind


def test_the_claim_of_a_dead_process_on_this_machine_is_broken_at_once(tmp_path):
    path = tmp_path / "x.claim"
    with try_claim(path) as mine:
        holder = dict(mine.holder)
    write_json_atomic(path, {**holder, "pid": dead_pid()})  # fresh mtime, dead holder
    assert claim_is_stale(path)
    claim = try_claim(path)
    assert claim is not None and read_claim(path)["pid"] == os.getpid()
    claim.release()


def test_a_remote_holder_is_trusted_while_its_heartbeat_is_fresh(tmp_path):
    path = tmp_path / "x.claim"
    write_json_atomic(path, {"machine": "elsewhere|pid:[1]", "pid": 1, "token": "t"})
    assert not claim_is_stale(path, stale_after=60)
    assert try_claim(path, stale_after=60) is None
    old = time.time() - 120
    os.utime(path, (old, old))  # its heartbeat stopped two minutes ago
    assert claim_is_stale(path, stale_after=60)
    claim = try_claim(path, stale_after=60)
    assert claim is not None
    claim.release()


def test_the_heartbeat_keeps_a_long_computation_claimed(tmp_path):
    path = tmp_path / "x.claim"
    with try_claim(path, heartbeat=0.05, stale_after=1.0):
        old = time.time() - 100
        os.utime(path, (old, old))
        time.sleep(0.3)
        assert time.time() - path.stat().st_mtime < 1.0
        assert not claim_is_stale(path, stale_after=1.0)


def test_a_holder_whose_claim_was_broken_does_not_delete_the_new_one(tmp_path):
    path = tmp_path / "x.claim"
    first = try_claim(path)
    path.unlink()  # broken by someone who found it stale
    second = try_claim(path)
    assert second is not None and not first.held
    first.release()
    assert second.held and path.exists()
    second.release()


def test_heartbeat_must_be_shorter_than_the_staleness(tmp_path):
    with pytest.raises(ValueError, match="stale_after must lie in"):
        try_claim(tmp_path / "x.claim", heartbeat=10, stale_after=5)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_a_killed_holder_not_yet_reaped_counts_as_dead(tmp_path):
    path = tmp_path / "x.claim"
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while Path(f"/proc/{zombie.pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    with try_claim(path) as mine:
        holder = dict(mine.holder)
    write_json_atomic(path, {**holder, "pid": zombie.pid})
    try:
        assert claim_is_stale(path)  # os.kill(pid, 0) alone would call it alive
    finally:
        zombie.wait()
