"""Latency experiment (Fig. 5): config validation, one cached record per sweep, ratios, sweep."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import lance_lib.experiments.latency as latency_module
from lance_lib.experiments.base import run_experiment
from lance_lib.experiments.latency import LatencyConfig, latency, latency_floor, latency_ratios
from lance_lib.experiments.sweeps import sweep
from lance_lib.weights import ReferenceWeightsError
from tests.fake_weights import write_reference

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(
    model="mcunet",
    weights=None,
    resolution=32,
    batch_size=4,
    layer_counts=(1, 2),
    methods=("bp", "lance"),
    repeats=1,
    warmup=0,
    num_batches=1,
    device="cpu",
)


@pytest.fixture(scope="module")
def tiny_record(tmp_path_factory):
    return latency(LatencyConfig(**TINY), results_dir=tmp_path_factory.mktemp("latency"))


@pytest.mark.parametrize(
    ("change", "error", "names"),
    [
        ({"layer_counts": (0,)}, ValueError, "layer_counts"),
        ({"layer_counts": (1, 1)}, ValueError, "distinct"),
        ({"methods": ("bp", "sgd")}, ValueError, "methods"),
        ({"repeats": 0}, ValueError, "repeats"),
        ({"batch_size": 2.5}, ValueError, "batch_size"),
        ({"resolution": 4}, ValueError, "resolution"),
        ({"device": "gpu0"}, ValueError, "device"),
        ({"model": "vit_tiny"}, ValueError, "model"),
        ({"methods": ("loract",), "method_options": {"rank_ratio": 2.0}}, ValueError, "rank_ratio"),
        ({"method_options": {"colour": 1}}, TypeError, "colour"),
    ],
)
def test_bad_settings_fail_at_construction_naming_the_setting(change, error, names):
    with pytest.raises(error, match=names):
        LatencyConfig(**{**TINY, **change})


def test_settings_resolve_resolution_and_device_and_normalise_values():
    cfg = LatencyConfig(**{**TINY, "resolution": None, "batch_size": 4.0, "layer_counts": 3})
    settings = cfg.settings()
    assert settings["resolution"] == 128  # the MCU stand-in's native side (random weights)
    assert settings["batch_size"] == 4 and isinstance(settings["batch_size"], int)
    assert settings["layer_counts"] == [3]
    assert settings["device"] == "cpu"
    assert set(settings["method_settings"]) == {"bp", "lance"}
    assert settings["method_settings"]["lance"]["num_batches"] == 1
    assert cfg.key() != cfg.replace(device="cuda").key()  # a CPU timing is not a GPU one
    assert hash(cfg) == hash(cfg.replace())


def test_one_record_holds_every_method_at_every_layer_count(tiny_record):
    rows = tiny_record["rows"]
    assert [(r["layers"], r["method"]) for r in rows] == [
        (1, "bp"),
        (1, "lance"),
        (2, "bp"),
        (2, "lance"),
    ]
    for row in rows:
        assert row["step_s_median"] == pytest.approx(
            row["forward_s_median"] + row["backward_s_median"]
        )
        assert len(row["trained"]) == row["layers"]
        assert row["cuda_peak_bytes"] is None  # CPU
    bp, lance = rows[2], rows[3]
    assert lance["measured_layer_bytes"] < bp["measured_layer_bytes"]
    assert tiny_record["stand_in"] and "stand-in" in tiny_record["model_label"]
    stored = json.loads(Path(tiny_record["path"]).read_text())
    assert stored["settings"] == LatencyConfig(**TINY).settings()
    assert stored["provenance"]["device"] == "cpu"
    # the weights used, hashed, even when made on the fly (here: a seeded random init)
    assert stored["provenance"]["weights"] == {"mcunet": tiny_record["weights"]["sha256"]}


def test_a_stored_record_is_reused_and_force_measures_again(tiny_record, monkeypatch):
    def no_measuring(*args, **kwargs):
        raise AssertionError("measured although a matching record exists")

    monkeypatch.setattr(latency_module, "measure_methods", no_measuring)
    folder = Path(tiny_record["path"]).parent
    again = run_experiment(LatencyConfig(**TINY), results_dir=folder)
    assert again["rows"] == tiny_record["rows"]
    with pytest.raises(AssertionError, match="measured"):
        latency(LatencyConfig(**TINY), results_dir=folder, force=True)


def test_ratios_to_lance_per_layer_count():
    record = {
        "rows": [
            {"layers": 1, "method": "lance", "step_s_median": 1.0},
            {"layers": 1, "method": "bp", "step_s_median": 2.0},
            {"layers": 2, "method": "lance", "step_s_median": 2.0},
            {"layers": 2, "method": "bp", "step_s_median": 3.0},
            {"layers": 3, "method": "lance", "step_s_median": 1.0},
            {"layers": 3, "method": "bp", "step_s_median": 1.2},
        ]
    }
    assert latency_ratios(record) == {"bp": {"min": 1.2, "median": 1.5, "max": 2.0}}


def test_the_notebook_sweep_declares_one_config_from_its_parameters():
    params = dict(
        model_name="mcunet",
        dataset="cifar10_mini",
        batch_size=8,
        resolution=32,
        max_layers=3,
        methods=["bp", "lance", "asi"],
        repeats=2,
        eps=0.7,
        num_batches=2,
        rank_ratio=0.25,
        seed=1,
        finetune={"weights": "pretrained-split-A", "pretrain_epochs": 1, "epochs": 2},
        weights_by_model={"mcunet": None},
    )
    (cfg,) = sweep("fig5_latency", params)
    assert cfg.layer_counts == (1, 2, 3)
    assert cfg.methods == ("bp", "lance", "asi")
    assert cfg.weights is None  # weights_by_model wins over the profile's weights
    assert cfg.pretrain_epochs == 1 and cfg.seed == 1
    assert cfg.method_options == {"rank_ratio": 0.25}


def test_reference_weights_are_verified_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setenv("LANCE_WEIGHTS", str(tmp_path / "weights"))
    entry = write_reference(tmp_path / "weights", "mcunet")
    cfg = LatencyConfig(
        **{**TINY, "weights": "reference", "layer_counts": (1,), "resolution": None}
    )
    record = latency(cfg, results_dir=tmp_path / "results")
    assert record["settings"]["weights_sha256"] == entry["sha256"]
    assert record["provenance"]["weights"] == {"mcunet": entry["sha256"]}
    assert record["weights"]["name"] == "reference"
    assert record["settings"]["resolution"] == 96  # the reference weights' resolution
    (tmp_path / "weights" / entry["file"]).write_bytes(b"altered")
    monkeypatch.setattr(latency_module, "measure_methods", None)  # would fail if reached
    with pytest.raises(ReferenceWeightsError, match="make weights"):
        latency(cfg, results_dir=tmp_path / "results")


def test_the_record_request_names_where_the_runner_stores_the_record(tmp_path, monkeypatch):
    monkeypatch.setenv("LANCE_RESULTS", str(tmp_path))  # the shared cache the grid fills
    cfg = LatencyConfig(**TINY)
    path, settings, required = cfg.record_request()
    assert path == tmp_path / "latency" / f"latency-mcunet-{cfg.key()}.json"
    assert settings == cfg.settings()
    assert {"rows", "model_label", "weights", "device"} <= set(required)


def test_methods_are_timed_interleaved_with_quartiles_and_floor(tiny_record):
    rows = tiny_record["rows"]
    for row in rows:
        q1, q3 = row["step_s_iqr"]
        assert q1 <= row["step_s_median"] <= q3
        assert len(row["step_s"]) == TINY["repeats"]
    floors = {f["layers"]: f for f in tiny_record["floors"]}
    assert set(floors) == set(TINY["layer_counts"])
    for layers, floor in floors.items():
        bp = next(r for r in rows if r["layers"] == layers and r["method"] == "bp")
        assert floor["bp_weight_grad_s"] > 0 and floor["lance_projection_s"] > 0
        expected = bp["step_s_median"] - floor["bp_weight_grad_s"] + floor["lance_projection_s"]
        assert floor["floor_s"] == pytest.approx(expected)
        assert floor["floor_over_bp"] == pytest.approx(floor["floor_s"] / bp["step_s_median"])
    summary = latency_floor(tiny_record)
    values = [f["floor_over_bp"] for f in tiny_record["floors"]]
    assert (summary["min"], summary["max"]) == (min(values), max(values))
    assert latency_floor({"rows": []}) is None
