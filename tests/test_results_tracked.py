"""The tracked results folder: records found again anywhere, nothing recomputed, no paths."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from lance_lib.paths import repo_root
from tests.test_finetune import TINY as FINETUNE_TINY

#: A tiny fine-tune (random weights, 2 classes at 16 px): seconds on one core.
TINY = {**FINETUNE_TINY, "epochs": 1, "measure": False}

#: Run in a fresh interpreter: fine-tune TINY through the grid's own code path (or, with
#: ``forbid``, find its record without any run being allowed) and print the record's path.
SCRIPT = """
import json, sys
import lance_lib.experiments.finetune as finetune_mod
from lance_lib.experiments.finetune import FinetuneConfig
from lance_lib.experiments.grid import compute, find_record, plan

config = FinetuneConfig(**json.loads(sys.argv[1]))
if sys.argv[2] == "forbid":
    def fail(*args, **kwargs):
        raise AssertionError("recomputed a record the results folder holds")
    finetune_mod._run = fail
    assert plan({"nb": [config]})[0].record is not None
print(json.dumps({"found": str(find_record(config)), "computed": compute(config)}))
"""


def _fresh_process(results: Path, cwd: Path, mode: str) -> dict[str, str]:
    env = {**os.environ, "LANCE_RESULTS": str(results), "PYTHONPATH": str(repo_root())}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(TINY), mode],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _strings(value: object) -> list[str]:
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return [value] if isinstance(value, str) else []


def test_record_is_found_by_a_fresh_process_elsewhere_and_not_recomputed(tmp_path):
    here, there = tmp_path / "machine-a" / "results", tmp_path / "machine-b" / "clone" / "results"
    first = _fresh_process(here, tmp_path, "run")
    assert first["found"] == "None"
    written = Path(first["computed"])
    assert written.parent == here / "finetune" and written.suffix == ".json"
    record = json.loads(written.read_text())
    # nothing in the record names this machine's folders (the repository, the results)
    for text in _strings(record):
        assert str(tmp_path) not in text and str(repo_root()) not in text, text
    assert "path" not in record
    # the folder as committed and cloned elsewhere: found by name and settings, not rerun
    shutil.copytree(here, there)
    again = _fresh_process(there, tmp_path / "machine-b", "forbid")
    assert Path(again["found"]) == there / "finetune" / written.name
    assert again["computed"] == again["found"]
    assert json.loads(Path(again["found"]).read_text()) == record


def test_git_tracks_records_and_ignores_claims_and_partial_writes():
    def ignored(path: str) -> bool:
        done = subprocess.run(
            ["git", "check-ignore", "--no-index", "-q", path], cwd=repo_root(), check=False
        )
        return done.returncode == 0

    if shutil.which("git") is None or not (repo_root() / ".git").exists():
        return
    assert not ignored("results/finetune/finetune-resnet18-lance-0123456789ab.json")
    assert not ignored("results/continual/continual-0123456789ab.json")
    assert ignored("results/finetune/.finetune-0123456789ab.claim")
    assert ignored("results/finetune/.finetune-x.json.a1b2.tmp")
