"""Fine-tuning loop: results file round trip, skipping, interrupted runs, prefix cache."""

from __future__ import annotations

import pytest
import torch

import lance_lib.train as train_mod
from lance_lib.data import class_subset, get_dataset
from lance_lib.models import build_model, last_n_convs, split_at
from lance_lib.experiments.prefix_cache import PrefixCache
from lance_lib.results import read_json

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


def test_results_json_round_trips_and_runs_are_skipped(tmp_path, monkeypatch):
    result = train_mod.finetune({**TINY, "method": "lance"}, results_dir=tmp_path, progress=False)
    stored = read_json(result["path"])
    assert stored == {k: v for k, v in result.items() if k != "path"}
    assert stored["settings"]["method_settings"] == {
        "method": "lance",
        "eps": 0.7,
        "num_batches": 2,
        "modes": None,
    }
    assert len(stored["accuracy"]) == len(stored["angle_deg"]) == 2
    m = stored["measurements"]
    assert m["analytic_mb"] < m["analytic_bp_mb"] and m["measured_layer_bytes"] > 0
    assert stored["prefix_cache"]["speedup"] > 0
    assert len(stored["ranks"]) == 2

    def fail(*args, **kwargs):
        raise AssertionError("a run with stored results must be skipped")

    monkeypatch.setattr(train_mod, "_run", fail)
    again = train_mod.finetune({**TINY, "method": "lance"}, results_dir=tmp_path, progress=False)
    assert again["accuracy"] == stored["accuracy"]


def test_killed_run_leaves_no_file_and_reruns(tmp_path, monkeypatch):
    config = {**TINY, "method": "hosvd", "measure": False}
    calls = {"n": 0}
    real = train_mod.evaluate

    def dies_in_second_epoch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "evaluate", dies_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train_mod.finetune(config, results_dir=tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(train_mod, "evaluate", real)
    result = train_mod.finetune(config, results_dir=tmp_path, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == [result["path"].split("/")[-1]]
    assert len(result["accuracy"]) == 2


def test_bad_settings_are_rejected(tmp_path):
    with pytest.raises(TypeError, match="unknown fine-tuning settings"):
        train_mod.finetune({"modle": "resnet18"}, results_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown method"):
        train_mod.finetune({**TINY, "method": "adam"}, results_dir=tmp_path)


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
