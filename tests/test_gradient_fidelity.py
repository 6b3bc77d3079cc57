"""The Fig. 2 / Fig. 4 sweeps (modes ablation) and the rows the notebooks plot."""

from __future__ import annotations

import pytest

from lance_lib.experiments.gradient_fidelity import (
    MODES_ABLATION,
    angle_rows,
    fidelity_rows,
    fig2_angle,
    fig4_eps_gradient,
)
from lance_lib.experiments.sweeps import sweep

PARAMS = {
    "finetune": {"weights": "pretrained-split-A", "epochs": 2, "batch_size": 32},
    "seed": 0,
    "models": ["resnet18"],
    "datasets": ["cifar10_mini"],
    "layer_counts": [4],
}


def test_fig2_sweep_runs_bp_and_lance_under_every_modes_setting():
    configs = fig2_angle(PARAMS)
    assert [c.method for c in configs] == ["bp", "lance", "lance", "lance"]
    modes = [c.method_settings()["modes"] for c in configs[1:]]
    assert modes == list(MODES_ABLATION) == ["all", "no_batch", "channel"]
    # the default's run is the other notebooks' run (same settings, same record)
    assert configs[-1].method_options == {}
    assert sweep("fig2_angle", PARAMS) == configs


def test_fig4_sweep_crosses_eps_with_modes_and_runs_bp_once():
    configs = fig4_eps_gradient(
        {**PARAMS, "eps_values": [0.5, 0.9], "modes_values": ["all", "channel"]}
    )
    assert [c.method for c in configs].count("bp") == 1
    pairs = [(c.eps, c.method_settings()["modes"]) for c in configs if c.method == "lance"]
    assert pairs == [(0.5, "all"), (0.5, "channel"), (0.9, "all"), (0.9, "channel")]


def record(method: str, modes: str | None, angles: list[float], layer_bytes: int) -> dict:
    settings = {
        "model": "resnet18",
        "dataset": "cifar10_mini",
        "layers": 4,
        "batch_size": 32,
        "resolution": 32,
        "method": method,
        "eps": 0.7,
        "method_settings": {"method": method} if modes is None else {"modes": modes},
    }
    return {
        "settings": settings,
        "angle_deg": angles,
        "accuracy": [0.5] * len(angles),
        "final_accuracy": 0.5,
        "measurements": {
            "analytic_mb": layer_bytes / 100,
            "analytic_bp_mb": 10.0,
            "measured_layer_bytes": layer_bytes,
        },
        "path": f"/x/{method}-{modes}.json",
    }


def test_rows_put_angle_and_memory_beside_bp():
    records = [
        record("bp", None, [0.0, 0.0, 0.0], 1000),
        record("lance", "all", [90.0, 60.0, 50.0], 10),
        record("lance", "channel", [20.0, 30.0, 40.0], 100),
    ]
    rows = fidelity_rows(records, last_epochs=2)
    assert list(rows.modes) == ["all", "channel"]
    assert list(rows.angle_first) == [90.0, 20.0] and list(rows.angle_mean) == [55.0, 35.0]
    assert list(rows.measured_memory_ratio) == [0.01, 0.1]
    assert list(rows.memory_ratio) == [0.01, 0.1]
    per_epoch = angle_rows(records)
    assert len(per_epoch) == 6 and set(per_epoch.method) == {"lance"}
    with pytest.raises(ValueError, match="no BP record"):
        fidelity_rows(records[1:])
