"""The grid: plans a profile once, skips stored records, survives a killed Dask worker."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from lance_lib.experiments import cluster, grid
from lance_lib.experiments.base import ExperimentConfig, register_experiment
from lance_lib.experiments.cache import cached_record, record_path
from lance_lib.experiments.locks import read_claim, try_claim
from lance_lib.paths import results_dir


@dataclass(frozen=True)
class ToyConfig(ExperimentConfig):
    """A seeded least-squares fit that takes ``seconds``; placeholder for the real configs."""

    kind: ClassVar[str] = "gridtoy"
    record_fields: ClassVar[tuple[str, ...]] = ("loss", "weights")
    seed: int = 0
    steps: int = 50
    seconds: float = 0.0


#: Keys of the toy experiments this process computed, in order.
COMPUTED: list[str] = []


@register_experiment(ToyConfig)
def run_toy(config: ToyConfig) -> dict:
    def work() -> dict:
        COMPUTED.append(config.key())
        time.sleep(config.seconds)
        generator = torch.Generator().manual_seed(config.seed)
        x = torch.randn(256, 16, generator=generator)
        y = x @ torch.randn(16, 1, generator=generator)
        w = torch.zeros(16, 1, requires_grad=True)
        optimizer = torch.optim.SGD([w], lr=0.05)
        for _ in range(config.steps):
            optimizer.zero_grad()
            loss = ((x @ w - y) ** 2).mean()
            loss.backward()
            optimizer.step()
        return {"loss": loss.item(), "weights": w.detach().flatten().tolist()}

    path = record_path(results_dir(config.kind), config.kind, config.settings())
    return cached_record(path, config.settings(), work, required=ToyConfig.record_fields)


@pytest.fixture
def results(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LANCE_RESULTS", str(tmp_path / "results"))
    return tmp_path / "results"


def records(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.json"))


def without_wall_clock(value):
    """``value`` without the fields that measure time (keys naming ``seconds``)."""
    if isinstance(value, dict):
        return {k: without_wall_clock(v) for k, v in value.items() if "seconds" not in k}
    if isinstance(value, list):
        return [without_wall_clock(v) for v in value]
    return value


def numbers(path: Path) -> dict:
    """What a record computed: without provenance (commit, host, pid) and wall-clock times."""
    record = json.loads(path.read_text())
    assert record.pop("provenance")["torch_threads"] == 1
    return without_wall_clock(record)


def test_plan_lists_a_shared_config_once_with_its_notebooks(results):
    a, b = ToyConfig(seed=1), ToyConfig(seed=2)
    planned = grid.plan({"table_x": [a, b], "fig_y": [b]})
    assert [item.config for item in planned] == [a, b]
    assert planned[1].notebooks == ("table_x", "fig_y")
    assert all(item.record is None for item in planned)


def test_stored_records_are_skipped_and_unusable_ones_recomputed(results):
    done, empty, edited = ToyConfig(seed=1), ToyConfig(seed=2), ToyConfig(seed=3)
    grid.run_grid(grid.plan({"nb": [done, edited]}), grid.GridSettings(progress=False))
    folder = results / "gridtoy"
    empty_path = record_path(folder, "gridtoy", empty.settings())
    empty_path.write_text("{}")  # a truncated run: the cache must not accept it
    edited_path = record_path(folder, "gridtoy", edited.settings())
    stored = json.loads(edited_path.read_text())
    del stored["loss"]  # an older schema
    edited_path.write_text(json.dumps(stored))
    with pytest.warns(UserWarning, match="recomputing"):
        planned = grid.plan({"nb": [done, empty, edited]})
    assert [item.record is not None for item in planned] == [True, False, False]
    with pytest.warns(UserWarning, match="recomputing"):
        report = grid.run_grid(planned, grid.GridSettings(progress=False))
    assert report.stored == (planned[0].key,)
    assert len(report.computed) == 2 and not report.failed
    assert all(item.record is not None for item in grid.plan({"nb": [done, empty, edited]}))


def test_a_failing_experiment_is_reported_and_the_others_still_run(results):
    bad = ToyConfig(seed=1, steps=-1)  # range(-1) is empty: the loss is never defined
    report = grid.run_grid(grid.plan({"nb": [bad, ToyConfig(seed=2)]}), grid.GridSettings())
    assert len(report.computed) == 1
    assert [key for key, _ in report.failed] == [grid.plan({"nb": [bad]})[0].key]


def test_a_task_waits_for_a_live_claim_and_reads_its_record(results):
    config = ToyConfig(seed=4, seconds=1.0)
    folder = results / "gridtoy"
    folder.mkdir(parents=True)
    claim = try_claim(folder / f".gridtoy-{config.key()}.claim")

    def other_process_computes() -> None:  # holds the claim while it computes
        run_toy(config)
        claim.release()

    other = threading.Thread(target=other_process_computes)
    other.start()
    path = grid.compute(config, poll=0.1)
    other.join()
    assert COMPUTED.count(config.key()) == 1  # waited and read, did not compute alongside
    assert path == str(record_path(folder, "gridtoy", config.settings()))


def test_tasks_get_the_client_results_folder(results, monkeypatch):
    assert grid.project_environment()["LANCE_RESULTS"] == str(results.resolve())
    monkeypatch.setenv("LANCE_DATA", "/somewhere/data")
    assert grid.project_environment()["LANCE_DATA"] == "/somewhere/data"


def test_one_gpu_per_worker_round_robin_and_none_hidden_without_gpus(monkeypatch):
    envs = cluster.worker_environments(3, 2, ["0", "1"])
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0", "1", "0"]
    assert all(e["OMP_NUM_THREADS"] == "2" for e in envs)
    assert all("CUDA_VISIBLE_DEVICES" not in e for e in cluster.worker_environments(2, 1, []))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3, 5")
    assert cluster.visible_gpus() == ["3", "5"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert cluster.visible_gpus() == []


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"workers": 0}, "workers must be >= 1"),
        ({"threads": 0}, "threads must be >= 1"),
        ({"scheduler": "localhost:8786"}, "tcp://host:8786"),
        ({"workers": 2, "scheduler": "tcp://h:1"}, "not both"),
    ],
)
def test_grid_settings_are_checked(settings, message):
    with pytest.raises(ValueError, match=message):
        grid.GridSettings(**settings)


def kill_first_claimant(folder: Path, killed: list[int], done: threading.Event) -> None:
    """SIGKILL the worker process that holds the first claim to appear under ``folder``."""
    while not done.is_set():
        for claim in folder.rglob("*.claim"):
            holder = read_claim(claim)
            if holder and holder["pid"] != os.getpid():
                os.kill(holder["pid"], signal.SIGKILL)
                killed.append(holder["pid"])
                return
        time.sleep(0.05)


def tiny_grid() -> list[ExperimentConfig]:
    """Two fine-tune settings and one continual setting of a few seconds each (CPU)."""
    from lance_lib.experiments.continual import ContinualConfig
    from lance_lib.experiments.finetune import FinetuneConfig

    finetune = dict(
        weights=None, resolution=32, layers=2, num_batches=1, epochs=1, batch_size=16,
        max_steps_per_epoch=2, max_samples=64, measure=False, device="cpu",
    )  # fmt: skip
    continual = dict(epochs=1, num_tasks=2, max_steps=2, batch_size=16)
    return [
        FinetuneConfig(method="lance", **finetune),
        FinetuneConfig(method="bp", **finetune),
        ContinualConfig(benchmark="cifar10_mini", method="finetune", overrides=continual),
    ]


@pytest.mark.slow
def test_local_cluster_survives_a_killed_worker_and_matches_in_process(tmp_path, monkeypatch):
    configs = tiny_grid()
    on_cluster, in_process = tmp_path / "cluster", tmp_path / "local"

    monkeypatch.setenv("LANCE_RESULTS", str(on_cluster))
    killed: list[int] = []
    done = threading.Event()
    killer = threading.Thread(target=kill_first_claimant, args=(on_cluster, killed, done))
    killer.start()
    try:
        report = grid.run_grid(grid.plan({"nb": configs}), grid.GridSettings(workers=2))
    finally:
        done.set()
        killer.join()
    assert len(killed) == 1, "no worker was killed mid-task"
    assert not report.failed and len(report.computed) == 3

    monkeypatch.setenv("LANCE_RESULTS", str(in_process))
    grid.run_grid(grid.plan({"nb": configs}), grid.GridSettings(progress=False))

    assert not list(on_cluster.rglob("*.claim"))
    assert len(records(on_cluster)) == 3
    for config in configs:
        [path] = on_cluster.rglob(f"*-{config.key()}.json")  # exactly one record each
        [local] = in_process.rglob(f"*-{config.key()}.json")
        assert grid.find_record(config) == local  # complete: the cache accepts it
        assert numbers(path) == numbers(local)
    monkeypatch.setenv("LANCE_RESULTS", str(on_cluster))
    planned = grid.plan({"nb": configs})  # never recomputed: all found before submission
    assert sorted(item.record for item in planned) == records(on_cluster)
