"""Region-memory experiment: BP / LANCE / lean LANCE on one batch, cached, declared by a sweep."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lance_lib.experiments.region_memory import RegionMemoryConfig, region_memory
from lance_lib.experiments.sweeps import sweep

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(
    model="resnet18",
    weights=None,
    resolution=32,
    batch_size=4,
    layers=4,
    num_batches=1,
    device="cpu",
)


@pytest.fixture(scope="module")
def tiny_record(tmp_path_factory):
    return region_memory(RegionMemoryConfig(**TINY), results_dir=tmp_path_factory.mktemp("mem"))


def test_lean_keeps_less_than_lance_which_keeps_less_than_bp(tiny_record):
    region = tiny_record["region_bytes"]
    assert region["lean"] < region["lance"] < region["bp"]
    assert tiny_record["factor_bytes"]["lance"] > tiny_record["factor_bytes"]["bp"]  # the U_i
    conv = [r for r in tiny_record["rows"] if r["kind"] == "conv"]
    assert conv and all(r["lance_bytes"] < r["bp_bytes"] for r in conv)
    assert tiny_record["lean_gradient_max_rel_diff"] < 1e-5  # lean LANCE is exact
    assert tiny_record["cuda_peak_bytes"] is None  # CPU
    assert tiny_record["layers"] == [
        "layer4.0.conv2",
        "layer4.0.downsample.0",
        "layer4.1.conv1",
        "layer4.1.conv2",
    ]
    assert tiny_record["tail_input"] == [4, 256, 2, 2]
    batch, channels = 4, 512
    for name, ranks in tiny_record["ranks"].items():
        assert ranks[0] == batch  # channel mode only: the batch mode is kept whole
        assert 1 <= ranks[1] <= channels, name


def test_a_stored_record_is_reused(tiny_record):
    again = region_memory(RegionMemoryConfig(**TINY), results_dir=Path(tiny_record["path"]).parent)
    assert again["provenance"] == tiny_record["provenance"]  # not measured again


def test_settings_and_validation():
    with pytest.raises(ValueError, match="layers"):
        RegionMemoryConfig(**{**TINY, "layers": 0})
    with pytest.raises(ValueError, match="modes|mode"):
        RegionMemoryConfig(**{**TINY, "modes": "spatial"})
    with pytest.raises(ValueError, match="num_batches"):
        RegionMemoryConfig(**{**TINY, "num_batches": -1})
    cfg = RegionMemoryConfig(**{**TINY, "modes": None})
    assert cfg.modes == "all"  # one spelling per selection: equal settings, equal keys
    assert cfg.settings()["device"] == "cpu"


def test_too_few_images_for_the_batches_is_a_clear_error(tmp_path):
    cfg = RegionMemoryConfig(**{**TINY, "batch_size": 2000, "num_batches": 2})
    with pytest.raises(ValueError, match="batch_size=2000.*num_batches=2"):
        region_memory(cfg, results_dir=tmp_path)


def test_the_notebook_sweep_declares_one_config_per_model():
    params = dict(
        models=["resnet18", "mcunet"],
        dataset="cifar10_mini",
        batch_size=16,
        resolution=64,
        layers=4,
        eps=0.7,
        num_batches=2,
        seed=0,
        finetune={"weights": "pretrained-split-A", "pretrain_epochs": 1},
        weights_by_model={"mcunet": None},
    )
    configs = sweep("memory_breakdown", params)
    assert [(c.model, c.weights) for c in configs] == [
        ("resnet18", "pretrained-split-A"),
        ("mcunet", None),
    ]
    assert all(c.resolution == 64 and c.pretrain_epochs == 1 for c in configs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_peaks_are_recorded_next_to_the_saved_tensors(tmp_path):
    record = region_memory(RegionMemoryConfig(**{**TINY, "device": "cuda"}), results_dir=tmp_path)
    peaks = record["cuda_peak_bytes"]
    assert set(peaks) == {"bp", "lance", "lean"}
    assert peaks["lean"] <= peaks["lance"] <= peaks["bp"]
