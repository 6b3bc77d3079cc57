"""The Makefile's promises: FORCE=1 really re-runs up-to-date notebooks; bench and weights."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from lance_lib.paths import repo_root

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")


@pytest.fixture
def up_to_date(tmp_path: Path) -> Path:
    """A copy of the Makefile in a tree whose one executed notebook is newer than its inputs."""
    shutil.copy(repo_root() / "Makefile", tmp_path / "Makefile")
    files = [
        "pyproject.toml",
        "profiles/smoke.yaml",
        "notebooks/a.ipynb",
        ".venv/.installed",
        "build/smoke/a.ipynb",
    ]
    for age, name in enumerate(reversed(files)):  # the later in the list, the newer
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")
        os.utime(path, (1e9 - 60 * age, 1e9 - 60 * age))
    return tmp_path


def make_n(folder: Path, *args: str) -> str:
    done = subprocess.run(
        ["make", "-n", "-C", str(folder), *args], capture_output=True, text=True, check=True
    )
    return done.stdout


def test_an_up_to_date_notebook_is_skipped_without_force(up_to_date):
    assert "notebook_runner" not in make_n(up_to_date, "figures")


def test_force_runs_the_runner_even_for_an_up_to_date_notebook(up_to_date):
    out = make_n(up_to_date, "figures", "FORCE=1")
    assert "-m lance_lib.notebook_runner notebooks/a.ipynb build/smoke/a.ipynb" in out
    assert "--profile smoke --force" in out


def test_bench_and_weights_targets(up_to_date):
    assert ".venv/bin/python -m bench --out bench/latest.json" in make_n(up_to_date, "bench")
    out = make_n(up_to_date, "weights")
    assert ".venv/bin/python -m lance_lib.weights build resnet18 mcunet" in out
