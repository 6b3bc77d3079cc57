"""Continual-learning experiments: the validated config, benchmarks, cached records, sweep."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lance_lib.continual import (
    BENCHMARKS,
    STRATEGIES,
    ContinualTask,
    SaturationWarning,
    layer_rank_rows,
    load_benchmark,
    record_row,
)
from lance_lib.data import DatasetNotFoundError
from lance_lib.experiments import continual as runner_module
from lance_lib.experiments.base import experiment_kinds, run_experiment
from lance_lib.experiments.continual import (
    RECORD_FIELDS,
    ContinualConfig,
    run_benchmark,
    table3_configs,
)
from lance_lib.experiments.sweeps import sweep
from lance_lib.methods import METHOD_TABLE
from lance_lib.models import MultiHead


def tiny_model(num_tasks: int) -> MultiHead:
    torch.manual_seed(0)
    backbone = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(256, 8)
    )
    return MultiHead(backbone, 8, num_tasks, 2)


def tiny_task(seed: int) -> ContinualTask:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(64, 3, 8, 8, generator=g), torch.arange(64) % 2
    x[y == 1] += 0.5
    ds = TensorDataset(x, y)
    return ContinualTask(f"toy{seed}", ds, TensorDataset(x[:16], y[:16]), ds)


@pytest.fixture
def toy_benchmark(monkeypatch):
    """``cifar10_mini`` with tiny synthetic tasks and a tiny network; counts data loads."""
    loads = []

    def load(spec, root=None, seed=0):
        loads.append(spec.name)
        return [tiny_task(t) for t in range(spec.num_tasks)]

    monkeypatch.setattr(runner_module, "load_benchmark", load)
    monkeypatch.setattr(runner_module, "build_benchmark_model", lambda spec, n: tiny_model(n))
    return loads


# ---------------------------------------------------------------------------- the config


def test_config_validates_counts_and_names_before_any_work(tmp_path, toy_benchmark):
    bad = [
        ({"epochs": 0}, ValueError, "epochs must be >= 1"),
        ({"epochs": 1.5}, ValueError, "epochs must be a whole number"),
        ({"num_batches": 1.5}, ValueError, "num_batches must be a whole number"),
        ({"num_tasks": 0}, ValueError, "num_tasks must be >= 1"),
        ({"batch_size": "64"}, TypeError, "batch_size must be an integer"),
        ({"eps": 1.2}, ValueError, r"eps must lie in \(0.0, 1.0\]"),
        ({"lr_factor": 0.5}, ValueError, "lr_factor"),
        ({"memory_rule": "eq3"}, ValueError, "memory_rule must be one of 'eq5', 'residual'"),
        ({"modes": "batch"}, ValueError, "modes must be one of"),
        ({"gpm_samples": [10, 0]}, ValueError, "gpm_samples must be >= 1"),
        ({"learning_rate": 0.1}, TypeError, r"unknown benchmark settings \['learning_rate'\]"),
    ]
    for overrides, error, message in bad:
        with pytest.raises(error, match=message):
            run_benchmark("cifar10_mini", "lance", results_dir=tmp_path, **overrides)
    with pytest.raises(ValueError, match="method must be one of 'finetune', 'gpm'"):
        run_benchmark("cifar10_mini", "ewc", results_dir=tmp_path)
    with pytest.raises(ValueError, match="benchmark must be one of"):
        run_benchmark("nope", "lance", results_dir=tmp_path)
    with pytest.raises(ValueError, match="seed must be >= 0"):
        run_benchmark("cifar10_mini", "lance", seed=-1, results_dir=tmp_path)
    with pytest.raises(ValueError, match="device must be a torch device"):
        ContinualConfig("cifar10_mini", "gpm", device="gpu0")
    with pytest.raises(TypeError, match="unknown continual settings"):
        ContinualConfig.from_dict({"benchmark": "cifar10_mini", "method": "gpm", "epoch": 2})
    assert toy_benchmark == [] and list(tmp_path.iterdir()) == []  # nothing ran, nothing written


def test_config_settings_are_normalised_and_keyed():
    a = ContinualConfig("cifar10_mini", "lance", 0, {"epochs": 2.0, "gpm_samples": [5] * 5})
    b = ContinualConfig("cifar10_mini", "lance", 0, {"epochs": 2, "gpm_samples": (5,) * 5})
    assert a.key() == b.key() and a.overrides == {"epochs": 2, "gpm_samples": (5,) * 5}
    rule = ContinualConfig("cifar10_mini", "lance", 0, {"epochs": 2, "memory_rule": "eq5"})
    assert rule.key() != a.key()
    assert a.settings()["spec"]["memory_rule"] == "residual"  # the default reading
    assert rule.spec().memory_rule == "eq5"
    assert experiment_kinds()["continual"] is ContinualConfig
    assert ContinualConfig.from_dict(
        {"benchmark": "cifar10_mini", "method": "gpm", "seed": 1}
    ) == ContinualConfig("cifar10_mini", "gpm", 1)


# ------------------------------------------------------------------------------ benchmarks


def test_benchmark_settings_and_missing_datasets(tmp_path):
    spec = BENCHMARKS["split_cifar100"]
    assert (spec.lr, spec.min_lr, spec.lr_factor, spec.patience, spec.epochs) == (
        0.01,
        1e-5,
        2.0,
        6,
        200,
    )
    assert (BENCHMARKS["five_datasets"].eps_cl, BENCHMARKS["split_miniimagenet"].eps_cl) == (
        0.97,
        0.985,
    )
    assert BENCHMARKS["split_miniimagenet"].model_options == {"first_stride": 2}
    nosvhn = BENCHMARKS["five_datasets_nosvhn"]
    assert "svhn" not in nosvhn.datasets and nosvhn.num_tasks == 4
    assert "SVHN" in nosvhn.label and any("SVHN" in d for d in nosvhn.deviations)
    assert any("epochs" in d for d in nosvhn.deviations) and nosvhn.epochs < 100
    # the full benchmark never runs on a part of its datasets: it says what is missing
    with pytest.raises(DatasetNotFoundError, match="svhn.*five_datasets_nosvhn"):
        load_benchmark(BENCHMARKS["five_datasets"], root=tmp_path)
    assert set(STRATEGIES) == {"lance", "gpm", "finetune", "multitask"}
    assert set(STRATEGIES) <= set(METHOD_TABLE)  # every strategy has a label and colour


# ---------------------------------------------------------------------------- the record


def test_records_are_cached_by_settings_and_hold_every_field(tmp_path, toy_benchmark, one_thread):
    kw = dict(epochs=1, results_dir=tmp_path, progress=False, batch_size=16, num_tasks=2)
    first = run_benchmark("cifar10_mini", "gpm", gpm_samples=8, **kw)
    files = list(tmp_path.glob("cl-cifar10_mini-gpm-*.json"))
    assert len(files) == 1 and toy_benchmark == ["cifar10_mini"]
    stored = json.loads(files[0].read_text())
    assert set(RECORD_FIELDS) <= set(stored)
    assert stored["settings"]["spec"]["epochs"] == 1 and stored["settings"]["kind"] == "continual"
    assert stored["task_names"] == ["toy0", "toy1"] and stored["peak_gpu_memory_mb"] is None
    assert len(stored["layer_ranks"]) == len(stored["frozen_layers"]) == 2
    assert stored["provenance"]["seeds"] == [0]
    again = run_benchmark("cifar10_mini", "gpm", gpm_samples=8, **kw)
    assert again["acc_matrix"] == first["acc_matrix"] and toy_benchmark == ["cifar10_mini"]
    # another seed is another record; an incomplete record is recomputed
    run_benchmark("cifar10_mini", "gpm", gpm_samples=8, seed=1, **kw)
    assert len(list(tmp_path.glob("cl-cifar10_mini-gpm-*.json"))) == 2
    files[0].write_text(json.dumps({k: v for k, v in stored.items() if k != "frozen_layers"}))
    with pytest.warns(UserWarning, match="lacks the fields"):
        run_benchmark("cifar10_mini", "gpm", gpm_samples=8, **kw)
    assert len(toy_benchmark) == 3


def test_every_strategy_runs_through_run_experiment(tmp_path, toy_benchmark, one_thread):
    records = {}
    for method in sorted(STRATEGIES):
        config = ContinualConfig(
            "cifar10_mini",
            method,
            0,
            {"epochs": 1, "num_tasks": 2, "batch_size": 16, "gpm_samples": 8, "num_batches": 2},
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SaturationWarning)
            records[method] = run_experiment(config, results_dir=tmp_path, progress=False)
    for method, r in records.items():
        row = record_row(r)
        assert row["method"] == method and 0 <= row["ACC"] <= 100
        assert row["Mem_MB"] >= 0 and len(row["frozen_per_task"]) == len(r["layer_ranks"])
        ranks = layer_rank_rows(r)
        assert {x["layer"] for x in ranks} == {"0", "3"}
        assert all(0 <= x["rank_d"] <= x["size_d"] for x in ranks)
    assert record_row(records["lance"])["variant"] == "lance/residual"
    assert records["multitask"]["BWT"] is None and len(records["multitask"]["acc_matrix"]) == 1
    gpm = record_row(records["gpm"])
    assert gpm["Mem_MB_projection"] == records["gpm"]["memory"]["projection_matrices_mb"]


def test_table3_sweep_runs_lance_once_per_rule():
    params = {
        "benchmarks": ["cifar10_mini"],
        "methods": ["lance", "gpm"],
        "seeds": [0, 1],
        "epochs": 3,
        "overrides": {"num_tasks": 2},
        "variants": {"lance": [{"memory_rule": "residual"}, {"memory_rule": "eq5"}]},
    }
    configs = sweep("table3_continual", params)
    assert configs == table3_configs(
        ["cifar10_mini"],
        ["lance", "gpm"],
        [0, 1],
        epochs=3,
        overrides={"num_tasks": 2},
        variants=params["variants"],
    )
    assert [(c.method, c.spec().memory_rule, c.seed) for c in configs] == [
        ("lance", "residual", 0),
        ("lance", "residual", 1),
        ("lance", "eq5", 0),
        ("lance", "eq5", 1),
        ("gpm", "residual", 0),
        ("gpm", "residual", 1),
    ]
    assert all(c.spec().epochs == 3 and c.spec().num_tasks == 2 for c in configs)


@pytest.mark.slow
def test_embedded_benchmark_default_rule_keeps_every_conv_learning(tmp_path):
    # Issue 13: with the GPM-style reading of the rank rule (the old default), tasks 2 and
    # 3 of the embedded benchmark got channel rank 0 in every conv.  The default must
    # leave no layer with a non-empty null space frozen (the GPM-style option's freezing
    # is pinned down on a small network in test_continual.py).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SaturationWarning)
        record = run_benchmark(
            "cifar10_mini",
            "lance",
            epochs=1,
            num_tasks=3,
            max_steps=3,
            num_batches=2,
            num_batches_cl=2,
            results_dir=tmp_path,
            progress=False,
        )
    assert record["settings"]["spec"]["memory_rule"] == "residual"
    for task in (1, 2):
        for name in ["backbone.conv1", "backbone.conv2", "backbone.conv3"]:
            memory_rank = record["tasks"][task - 1]["memory_rank"][name]
            assert memory_rank < record["layer_ranks"][0][name][1], name  # null space left
            assert record["layer_ranks"][task][name][1] >= 1, name  # so the conv learns
    assert record["frozen_layers"] == [[], [], []]
