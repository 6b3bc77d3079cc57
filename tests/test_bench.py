"""``python -m bench``: a package on the library's experiments, no silent skips."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from lance_lib.paths import repo_root
from tests.fake_weights import write_reference

#: A methods section small enough for seconds: ResNet18's last 2 convs at 32 px, batch 4.
TINY = [
    "--resolution",
    "32",
    "--batch-size",
    "4",
    "--layers",
    "2",
    "--calib-batches",
    "1",
    "--repeats",
    "1",
    "--methods",
    "bp",
    "lance",
    "asi",
]


def bench(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m bench`` from the repository root with one torch thread."""
    return subprocess.run(
        [sys.executable, "-m", "bench", *args],
        cwd=repo_root(),
        env={**os.environ, "OMP_NUM_THREADS": "1", "LANCE_PROGRESS": "0", **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_help_lists_every_section_in_order():
    done = bench("--help")
    assert done.returncode == 0, done.stderr
    listed = done.stdout.split("sections (run in this order):")[1]
    positions = [listed.index(f"  {name} ") for name in ("methods", "fig5", "region", "gpu")]
    assert positions == sorted(positions)


def test_an_unknown_section_is_an_error_not_a_skip(tmp_path):
    done = bench("--only", "core", "--out", str(tmp_path / "report.json"))
    assert done.returncode == 2
    assert "invalid choice: 'core'" in done.stderr
    assert not (tmp_path / "report.json").exists()


def test_methods_section_on_reference_weights_reports_ranks_and_ratios(tmp_path):
    weights = tmp_path / "weights"
    entry = write_reference(weights, "resnet18")
    out = tmp_path / "report.json"
    done = bench(
        "--only",
        "methods",
        "gpu",
        *TINY,
        "--out",
        str(out),
        "--results-dir",
        str(tmp_path / "results"),
        env={"LANCE_WEIGHTS": str(weights)},
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert [s["name"] for s in report["sections"]] == ["methods", "gpu"]
    methods = report["methods"]
    assert methods["setting"]["weights"] == "reference"
    assert methods["setting"]["weights_sha256"] == entry["sha256"]
    assert methods["setting"]["trained"] == ["layer4.1.conv1", "layer4.1.conv2"]
    ranks = methods["ranks"]
    assert set(ranks["channel"]) == {"layer4.1.conv1", "layer4.1.conv2"}
    assert ranks["median_layer4_channel_rank"] >= 1
    assert "median layer4 channel rank" in done.stdout
    assert set(methods["measurements"]) == {"bp", "lance", "asi"}
    ratios = report["ratios"]
    assert {"lance_step_over_bp", "bp_mem_over_lance", "asi_step_over_lance"} <= set(ratios)
    assert ratios["bp_mem_over_lance"] > 1  # LANCE keeps less of the trained layers' inputs
    assert report["machine"]["torch_threads"] >= 1
    if report["machine"]["gpu"] is None:  # no CUDA: the gpu section says so, measures nothing
        assert report["gpu"] == {"skipped": report["gpu"]["skipped"]}
        assert "no CUDA device" in report["gpu"]["skipped"] and "gpu: no CUDA" in done.stdout


def test_a_failing_section_fails_the_run_and_keeps_the_previous_report(tmp_path):
    out = tmp_path / "report.json"
    out.write_text('{"previous": true}')
    done = bench(
        "--only",
        "region",
        "--weights",
        "none",
        "--resolution",
        "32",
        "--batch-size",
        "100000",
        "--out",
        str(out),
        "--results-dir",
        str(tmp_path / "results"),
    )
    assert done.returncode != 0
    assert "batch_size=100000" in done.stderr
    assert json.loads(out.read_text()) == {"previous": True}


def test_missing_reference_weights_name_make_weights(tmp_path):
    done = bench(
        "--only",
        "region",
        *TINY[:8],
        "--out",
        str(tmp_path / "report.json"),
        env={"LANCE_WEIGHTS": str(tmp_path / "no-weights")},
    )
    assert done.returncode != 0
    assert "make weights" in done.stderr


def test_bench_is_a_package_that_shadows_no_library_module_and_leaves_sys_path_alone():
    bench_dir = repo_root() / "bench"
    library = {p.stem for p in (repo_root() / "lance_lib").iterdir() if not p.name.startswith("_")}
    modules = {p.stem for p in bench_dir.glob("*.py")}
    assert "__main__" in modules and "__init__" in modules
    assert not modules & library, modules & library
    for source in bench_dir.glob("*.py"):
        assert "sys.path" not in source.read_text(), source
