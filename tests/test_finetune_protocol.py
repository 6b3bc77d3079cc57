"""The converged fine-tuning protocol's options and LANCE's subspace diagnostics."""

from __future__ import annotations

import math

import pytest

from lance_lib.experiments.finetune import FinetuneConfig, FinetuneRecord, finetune
from tests.test_finetune import TINY

#: Keys of records made before lr_schedule / energy_batches / recalibrate existed; a new
#: field at its default must not change them. The BP key was computed with commit a8f647f;
#: LANCE keys moved once, on purpose, when LanceSettings gained ``keep_unprofitable`` and
#: ``core_dtype`` (depthwise layers are no longer compressed by default), so the LANCE key
#: is the one computed right after that change (merge of i23).
KEYS_BEFORE = {
    "36c68159f2df": TINY,
    "eef87be18cf7": dict(
        model="resnet18",
        dataset="cifar10",
        weights=None,
        method="bp",
        epochs=3,
        max_samples=5000,
        num_batches=20,
    ),
}


@pytest.mark.parametrize("key", sorted(KEYS_BEFORE))
def test_new_fields_at_their_defaults_keep_existing_keys(key):
    config = FinetuneConfig(**KEYS_BEFORE[key])
    assert config.key() == key
    for name in ("lr_schedule", "energy_batches", "recalibrate"):
        assert name not in config.settings()


def test_new_fields_set_change_the_key():
    base = FinetuneConfig(**TINY)
    keys = {
        base.key(),
        base.replace(lr_schedule="cosine").key(),
        base.replace(energy_batches=2).key(),
        base.replace(recalibrate=True).key(),
        base.replace(momentum=0.9).key(),
    }
    assert len(keys) == 5


def test_bad_protocol_settings_name_the_fix():
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        FinetuneConfig(**TINY, lr_schedule="step")
    with pytest.raises(ValueError, match="energy_batches"):
        FinetuneConfig(**TINY, energy_batches=-1)
    with pytest.raises(TypeError, match="recalibrate must be True or False"):
        FinetuneConfig(**TINY, recalibrate="yes")
    with pytest.raises(ValueError, match="diagnostics of LANCE"):
        FinetuneConfig(**{**TINY, "method": "bp"}, energy_batches=2)


def test_later_record_fields_are_optional():
    assert "lr" not in FinetuneRecord.fields() and "diagnostics" not in FinetuneRecord.fields()
    assert "accuracy" in FinetuneRecord.fields()


def test_cosine_schedule_anneals_per_step_and_constant_stays(tmp_path, one_thread):
    common = {**TINY, "method": "bp", "measure": False, "epochs": 3, "lr": 0.1}
    constant = finetune(common, results_dir=tmp_path, progress=False)
    cosine = finetune({**common, "lr_schedule": "cosine"}, results_dir=tmp_path, progress=False)
    assert constant["lr"] == [0.1, 0.1, 0.1]
    steps = cosine["steps_per_epoch"]
    expected = [0.05 * (1 + math.cos(math.pi * e * steps / (3 * steps))) for e in range(3)]
    assert cosine["lr"] == pytest.approx(expected)
    assert cosine["train_loss"] != constant["train_loss"]
    assert constant["diagnostics"] is None


#: A tiny run whose trained layers see non-degenerate inputs (random MCU weights give
#: activations of ~1e-11 in the last layers, which training does not move).
MOVING = {**TINY, "model": "resnet18", "method": "lance", "measure": False, "eps": 0.6}


def test_energy_diagnostic_leaves_training_unchanged(tmp_path, one_thread):
    common = {**MOVING, "epochs": 2}
    plain = finetune(common, results_dir=tmp_path, progress=False)
    watched = finetune({**common, "energy_batches": 2}, results_dir=tmp_path, progress=False)
    assert watched["accuracy"] == plain["accuracy"]
    assert watched["train_loss"] == plain["train_loss"]
    diag = watched["diagnostics"]
    assert diag["energy_batches"] == 2 and diag["recalibrated"] is False
    energy = diag["subspace_energy"]
    assert len(energy) == len(watched["layers"]) == 2
    for shares in energy.values():
        assert len(shares) == 3  # after calibration, then after each of the 2 epochs
        assert all(0.0 < s <= 1.0 + 1e-9 for s in shares)
    assert len(diag["ranks_per_epoch"]) == 1


def test_subspace_goes_stale_and_recalibration_restores_it(tmp_path, one_thread):
    common = {**MOVING, "epochs": 3, "lr": 0.5, "energy_batches": 2}
    stale = finetune(common, results_dir=tmp_path, progress=False)
    fresh = finetune({**common, "recalibrate": True}, results_dir=tmp_path, progress=False)
    stale_energy = stale["diagnostics"]["subspace_energy"]
    fresh_energy = fresh["diagnostics"]["subspace_energy"]
    # the first trained layer's input comes from the frozen prefix: it never drifts ...
    assert len(set(stale_energy[list(stale_energy)[0]])) == 1
    # ... the second one's does, as the first layer trains
    second_energy = stale_energy[list(stale_energy)[1]]
    assert second_energy[-1] < second_energy[0] - 0.1
    assert fresh["diagnostics"]["recalibrated"] is True
    assert len(fresh["diagnostics"]["ranks_per_epoch"]) == 3
    # the first epoch is the same run; afterwards the recalibrated subspaces train
    assert fresh["train_loss"][0] == stale["train_loss"][0]
    assert fresh["train_loss"][1:] != stale["train_loss"][1:]
    assert fresh_energy[list(fresh_energy)[1]][-1] > second_energy[-1] + 0.1


def test_claim_runs_sweep_lists_seeds_readings_eps_n_and_the_recalibrated_diagnostic():
    from lance_lib.experiments.sweeps import sweep

    params = {
        "finetune": {**TINY, "model": "resnet18", "epochs": 4, "lr_schedule": "cosine"},
        "model": "resnet18",
        "dataset": "cifar10_mini",
        "seeds": [0, 1, 2],
        "layer_counts": [2, 4],
        "methods": ["bp", "lance"],
        "lance_modes": ["channel", "all"],
        "eps_values": [0.9, 0.95],
        "n_eps": 0.7,
        "n_values": [5],
        "energy_batches": 4,
        "recalibrate": {"eps": [0.7], "seeds": [0], "layer_counts": [4]},
    }
    configs = sweep("claim_runs", params)
    # per seed: (bp + lance x 2 readings) x 2 layer counts, 2 eps, 1 N; + 1 recalibrated
    assert len(configs) == 3 * (3 * 2 + 2 + 1) + 1
    assert all(c.epochs == 4 and c.lr_schedule == "cosine" for c in configs)
    lance = [c for c in configs if c.method == "lance"]
    assert all(c.energy_batches == 4 for c in lance)
    assert all(c.energy_batches == 0 for c in configs if c.method == "bp")
    readings = {(c.seed, c.layers, c.method_options.get("modes", "channel")) for c in lance}
    assert {(s, n, m) for s in (0, 1, 2) for n in (2, 4) for m in ("channel", "all")} <= readings
    recalibrated = [c for c in configs if c.recalibrate]
    assert [(c.seed, c.layers, c.eps) for c in recalibrated] == [(0, 4, 0.7)]
    assert {c.num_batches for c in lance if c.eps == 0.7 and not c.recalibrate} == {2, 5}


def test_reference_profile_lists_the_converged_claim_runs():
    from lance_lib.experiments.sweeps import profile_experiments

    runs = profile_experiments("reference")["claim_runs"]
    assert all(c.max_samples is None and c.model == "resnet18" for c in runs)
    assert all(c.dataset == "cifar10" and c.weights == "reference" for c in runs)
    seeds = {c.seed for c in runs if c.method == "bp"}
    assert seeds == {0, 1, 2}
    modes = {c.method_options.get("modes", "channel") for c in runs if c.method == "lance"}
    assert modes == {"channel", "all"}
    assert {c.eps for c in runs if c.method == "lance"} >= {0.7, 0.9, 0.95}
    assert any(c.recalibrate for c in runs)
    # the same schedule for every method (a deviation named in the profile)
    assert len({(c.epochs, c.lr, c.momentum, c.lr_schedule) for c in runs}) == 1
