"""Fine-tuning experiment: config validation, cached records, reference weights, sweeps."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch

import lance_lib.experiments.finetune as finetune_mod
from lance_lib.data import class_subset, get_dataset
from lance_lib.experiments.base import run_experiment
from lance_lib.experiments.cache import CacheWarning
from lance_lib.experiments.finetune import FinetuneConfig, FinetuneRecord, finetune
from lance_lib.experiments.prefix_cache import PrefixCache
from lance_lib.experiments.sweeps import sweep
from lance_lib.models import build_model, last_n_convs, split_at
from lance_lib.reporting.finetune_tables import fig3_rows, finetune_rows
from lance_lib.weights import REFERENCE_RECIPES, ReferenceWeightsError
from tests.fake_weights import write_reference

TINY = dict(
    model="mcunet",
    weights=None,
    classes=[0, 1],
    resolution=16,
    layers=2,
    epochs=2,
    batch_size=16,
    max_steps_per_epoch=2,
    max_samples=64,
    num_batches=2,
    measure_repeats=1,
)


def _fake_record(**changes):
    """Every field of a record, for tests of the cache around the run."""
    fields = {name: None for name in FinetuneRecord.fields()}
    return {**fields, "final_accuracy": 0.5, "accuracy": [0.5], **changes}


@pytest.fixture
def no_run(monkeypatch):
    """Make any training an error (for checks that must happen before work)."""

    def fail(*args, **kwargs):
        raise AssertionError("the run must not start")

    monkeypatch.setattr(finetune_mod, "_run", fail)


@pytest.fixture
def reference_dir(tmp_path, monkeypatch):
    directory = tmp_path / "weights"
    monkeypatch.setenv("LANCE_WEIGHTS", str(directory))
    return directory


def test_record_round_trips_with_every_field_and_is_reused(tmp_path, monkeypatch, one_thread):
    result = finetune({**TINY, "method": "lance"}, results_dir=tmp_path, progress=False)
    stored = json.loads(open(result["path"]).read())
    assert stored == {k: v for k, v in result.items() if k != "path"}
    assert set(FinetuneRecord.fields()) <= set(stored)
    assert stored["settings"]["kind"] == "finetune" and "device" not in stored["settings"]
    assert stored["settings"]["method_settings"]["method"] == "lance"
    assert stored["settings"]["method_settings"]["num_batches"] == 2
    assert len(stored["accuracy"]) == len(stored["angle_deg"]) == len(stored["train_loss"]) == 2
    assert stored["steps_per_epoch"] == 2 and stored["classes"] == [0, 1]
    m = stored["measurements"]
    assert m["analytic_mb"] < m["analytic_bp_mb"] and m["measured_layer_bytes"] > 0
    assert stored["prefix_cache"]["speedup"] > 0
    assert len(stored["ranks"]) == 2 and stored["cuda_max_memory_allocated"] is None
    assert stored["weights"]["name"] is None and len(stored["weights"]["sha256"]) == 64
    assert stored["provenance"]["seeds"] == [0] and stored["provenance"]["device"] == "cpu"
    # the starting weights' hash is in the provenance whatever the weights (here: random)
    assert stored["provenance"]["weights"] == {"mcunet": stored["weights"]["sha256"]}

    def fail(*args, **kwargs):
        raise AssertionError("a run with a stored record must be skipped")

    monkeypatch.setattr(finetune_mod, "_run", fail)
    again = finetune({**TINY, "method": "lance"}, results_dir=tmp_path, progress=False)
    assert again["accuracy"] == stored["accuracy"]
    assert run_experiment(FinetuneConfig(**TINY), results_dir=tmp_path)["path"] == result["path"]


def test_killed_run_leaves_no_file_and_reruns(tmp_path, monkeypatch, one_thread):
    config = {**TINY, "method": "hosvd", "measure": False}
    calls = {"n": 0}
    real = finetune_mod.evaluate

    def dies_in_second_epoch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(finetune_mod, "evaluate", dies_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        finetune(config, results_dir=tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(finetune_mod, "evaluate", real)
    result = finetune(config, results_dir=tmp_path, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == [result["path"].split("/")[-1]]
    assert len(result["accuracy"]) == 2 and result["measurements"] is None


def test_bad_settings_are_rejected_at_construction_naming_the_fix(tmp_path, no_run):
    with pytest.raises(TypeError, match="unknown finetune settings"):
        finetune({"modle": "resnet18"}, results_dir=tmp_path)
    with pytest.raises(ValueError, match="method must be one of"):
        FinetuneConfig(**{**TINY, "method": "adam"})
    # issue 17: classes out of range, max_steps_per_epoch=0, eps only where it is used
    with pytest.raises(
        ValueError, match=r"classes \[99\] are outside the dataset's labels in 0\.\.9"
    ):
        finetune({**TINY, "classes": [0, 99]}, results_dir=tmp_path)
    with pytest.raises(ValueError, match="max_steps_per_epoch must be >= 1, got 0"):
        FinetuneConfig(**{**TINY, "max_steps_per_epoch": 0})
    bp = FinetuneConfig(**{**TINY, "method": "bp", "eps": 2})
    assert bp.settings()["method_settings"] == {"method": "bp"}
    with pytest.raises(ValueError, match="eps"):
        FinetuneConfig(**{**TINY, "method": "lance", "eps": 2})
    for name, value in (("epochs", 0), ("batch_size", -1), ("layers", 0), ("num_batches", 1.5)):
        with pytest.raises(ValueError, match=name):
            FinetuneConfig(**{**TINY, name: value})
    with pytest.raises(TypeError, match="num_batches must be an integer"):
        FinetuneConfig(**{**TINY, "num_batches": None})
    assert FinetuneConfig(**{**TINY, "num_batches": 2.0}).num_batches == 2
    with pytest.raises(ValueError, match="weights='reference' exists for models"):
        FinetuneConfig(model="resnet34", weights="reference")
    with pytest.raises(ValueError, match="device must name a torch device"):
        FinetuneConfig(**{**TINY, "device": "gpu0"})
    with pytest.raises(TypeError, match=r"unknown method options \['rank'\]"):
        FinetuneConfig(**{**TINY, "method_options": {"rank": 4}})
    with pytest.raises(ValueError, match="model must be one of"):
        FinetuneConfig(**{**TINY, "model": "alexnet_cl"})


def test_stale_empty_or_wrong_shaped_records_are_recomputed(tmp_path, monkeypatch):
    calls = []

    def fake_run(cfg, root, progress):
        calls.append(cfg)
        return _fake_record(final_accuracy=0.25)

    monkeypatch.setattr(finetune_mod, "_run", fake_run)
    first = finetune(TINY, results_dir=tmp_path)
    path = first["path"]
    for content in (
        "{}",
        "[]",
        json.dumps({**first, "settings": {**first["settings"], "eps": 0.1}}),
    ):
        with open(path, "w") as fh:
            fh.write(content)
        with pytest.warns(CacheWarning):
            again = finetune(TINY, results_dir=tmp_path)
        assert again["final_accuracy"] == 0.25 and again["settings"] == first["settings"]
    assert len(calls) == 4


def test_unwritable_results_folder_fails_before_the_run(tmp_path, no_run):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(PermissionError, match="results folder .* a part of it is a file"):
        finetune(TINY, results_dir=blocker / "results")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into read-only folders")
def test_read_only_results_folder_fails_before_the_run(tmp_path, no_run):
    folder = tmp_path / "results"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(PermissionError, match="results folder .* is not writable"):
            finetune(TINY, results_dir=folder)
    finally:
        folder.chmod(0o700)


def test_default_results_folder_is_under_the_results_root(tmp_path, monkeypatch):
    monkeypatch.setenv("LANCE_RESULTS", str(tmp_path / "results"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(finetune_mod, "_run", lambda cfg, root, progress: _fake_record())
    result = finetune(TINY)
    assert result["path"].startswith(str(tmp_path / "results" / "finetune"))


def test_reference_weights_end_to_end(reference_dir, tmp_path, one_thread):
    entry = write_reference(reference_dir, "mcunet")
    config = {**TINY, "weights": "reference", "classes": None, "resolution": None}
    result = finetune(config, results_dir=tmp_path / "r", progress=False)
    split_a = REFERENCE_RECIPES["mcunet"].classes
    assert result["pretrain_classes"] == split_a
    assert result["classes"] == [c for c in range(10) if c not in split_a]  # split B
    assert result["settings"]["resolution"] == 96
    assert result["settings"]["weights_sha256"] == entry["sha256"]
    assert result["weights"]["sha256"] == entry["sha256"]
    assert result["provenance"]["weights"] == {"mcunet": entry["sha256"]}
    assert 0 <= result["final_accuracy"] <= 1
    # rebuilt weights (another SHA-256): the stored record no longer answers the request
    write_reference(reference_dir, "mcunet", seed=1)
    with pytest.warns(CacheWarning, match="weights_sha256"):
        again = finetune(config, results_dir=tmp_path / "r", progress=False)
    assert again["weights"]["sha256"] != entry["sha256"]


def test_missing_reference_weights_fail_before_any_work(reference_dir, tmp_path, no_run):
    with pytest.raises(ReferenceWeightsError, match="make weights"):
        finetune({**TINY, "weights": "reference"}, results_dir=tmp_path)
    assert not list(tmp_path.glob("*.json"))


def test_sweeps_declare_the_notebooks_runs_and_tables_read_them():
    params = {
        "finetune": {**TINY, "classes": None},
        "seed": 1,
        "models": ["mcunet"],
        "datasets": ["cifar10_mini"],
        "methods": ["bp", "lance"],
        "layer_counts": [1, 2],
        "batch_sizes": [16, 4],
        "small_batch_models": ["resnet18"],
        "small_batch_methods": ["lance"],
        "weights_by_model": {"resnet18": "pretrained-split-A"},
    }
    table2 = sweep("table2_finetune", params)
    assert len(table2) == 4 + 2 and all(isinstance(c, FinetuneConfig) for c in table2)
    assert {(c.model, c.weights, c.batch_size, c.seed) for c in table2[4:]} == {
        ("resnet18", "pretrained-split-A", 4, 1)
    }
    with pytest.raises(ValueError, match="split-A -> split-B"):
        sweep("table1_split", {**params, "finetune_overrides": {}})
    table1 = sweep("table1_split", {**params, "finetune_overrides": {"weights": "reference"}})
    assert {c.weights for c in table1} == {"reference"} and len(table1) == 4
    fig3 = {
        **params,
        "eps_dataset": "cifar10_mini",
        "eps_values": [0.5, 0.7],
        "n_dataset": "cifar10_mini",
        "n_eps": 0.7,
        "num_batches_values": [2, 4],
    }
    configs = sweep("fig3_ablation", fig3)
    assert len(configs) == 1 + 2 + 2 - 1  # one BP run; (eps 0.7, N 2) serves both sweeps
    records = {
        c: _fake_record(final_accuracy=c.eps / 10, measurements={"analytic_mb": c.eps})
        for c in configs
    }
    rows = fig3_rows(fig3, records)
    assert list(rows.sweep) == ["eps", "eps", "num_batches", "num_batches"]
    assert list(rows.value) == [0.5, 0.7, 2, 4]
    assert list(rows.memory_mb) == [0.5, 0.7, 0.7, 0.7]


def test_rows_of_real_records(tmp_path, monkeypatch):
    measured = {
        "analytic_mb": 1.0,
        "analytic_bp_mb": 4.0,
        "measured_layer_bytes": 2**20,
        "flops_measured": 10,
        "step_s_median": 0.1,
    }
    monkeypatch.setattr(
        finetune_mod, "_run", lambda cfg, root, progress: _fake_record(measurements=measured)
    )
    df = finetune_rows([finetune(TINY, results_dir=tmp_path)])
    assert df.loc[0, "accuracy"] == 50 and df.loc[0, "measured_mb"] == 1.0
    assert df.loc[0, "model"] == "mcunet" and df.loc[0, "batch_size"] == 16


def test_prefix_cache_serves_prefix_outputs_and_mirrors():
    torch.manual_seed(0)
    model = build_model("mcunet", 2).eval()
    names = [n for n, _ in last_n_convs(model, 2)]
    prefix, tail = split_at(model, names[0])
    data = class_subset(get_dataset("cifar10_mini", "test", resolution=16, augment=False), [0])
    x = torch.stack([data[i][0] for i in range(4)])
    cache = PrefixCache(prefix, [(x[i], 0) for i in range(4)], flips=True, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(cache.features, prefix(x))
        torch.testing.assert_close(cache.mirrored, prefix(x.flip(-1)))
        torch.testing.assert_close(tail(cache.features), model(x))
    served = torch.stack([cache[0][0] for _ in range(40)])
    is_plain = (served - cache.features[0]).abs().flatten(1).amax(1) == 0
    assert 0 < int(is_plain.sum()) < 40


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_run_records_peak_memory(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = finetune({**TINY, "device": "cuda"}, results_dir=tmp_path, progress=False)
    assert result["cuda_max_memory_allocated"] > 0
    assert result["provenance"]["device"] == "cuda" and result["provenance"]["gpu"]


def test_every_profile_declares_the_runs_of_the_finetune_notebooks():
    """The grid builds the sweeps from the profiles alone: every key they read is there."""
    from lance_lib.experiments.sweeps import profile_experiments

    for profile in ("smoke", "cpu", "reference", "paper"):
        planned = profile_experiments(profile)
        for notebook in ("table1_split", "table2_finetune", "fig3_ablation"):
            assert planned[notebook], (profile, notebook)
            assert all(isinstance(c, FinetuneConfig) for c in planned[notebook])


def test_the_grid_finds_the_record_a_reference_run_stored(reference_dir, tmp_path, monkeypatch):
    from lance_lib.experiments.grid import find_record

    write_reference(reference_dir, "mcunet")
    monkeypatch.setenv("LANCE_RESULTS", str(tmp_path / "results"))
    monkeypatch.setattr(finetune_mod, "_run", lambda cfg, root, progress: _fake_record())
    cfg = FinetuneConfig(**{**TINY, "weights": "reference"})
    assert find_record(cfg) is None
    result = finetune(cfg)
    assert find_record(cfg) == cfg.record_request()[0] == Path(result["path"])
    write_reference(reference_dir, "mcunet", seed=1)  # rebuilt weights: the record is stale
    with pytest.warns(CacheWarning, match="weights_sha256"):
        assert find_record(cfg) is None


def test_runs_of_one_process_share_the_prefix_cache_without_changing_results(
    tmp_path, monkeypatch, one_thread
):
    """A sweep builds the frozen prefix's outputs once; reuse leaves the numbers as they are."""
    built = []
    init = PrefixCache.__init__

    def counting(self, *args, **kwargs):
        built.append(1)
        init(self, *args, **kwargs)

    monkeypatch.setattr(PrefixCache, "__init__", counting)
    finetune_mod._TAIL_SETS.clear()
    bp = finetune({**TINY, "method": "bp"}, results_dir=tmp_path / "a", progress=False)
    lance = finetune({**TINY, "method": "lance"}, results_dir=tmp_path / "a", progress=False)
    assert len(built) == 2  # train and test, built for the first run only
    finetune_mod._TAIL_SETS.clear()
    fresh = finetune({**TINY, "method": "lance"}, results_dir=tmp_path / "b", progress=False)
    assert len(built) == 4
    assert fresh["accuracy"] == lance["accuracy"] and fresh["angle_deg"] == lance["angle_deg"]
    assert bp["settings"]["method"] == "bp"
