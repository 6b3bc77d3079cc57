"""Channel spectra of the fine-tuned layers and the ranks the paper's memory implies."""

from __future__ import annotations

import pytest

from lance_lib.experiments.spectrum import channel_spectrum, implied_channel_ranks


def test_paper_memory_implies_a_small_uniform_channel_rank():
    # Table 2: LANCE keeps 1.11 MB for ResNet18's last 4 convs (BP 61.25 MB), 0.75 MB for 2
    four = implied_channel_ranks(1.11, layers=4)
    two = implied_channel_ranks(0.75, layers=2)
    assert four["bp_mb"] == pytest.approx(61.25) and two["bp_mb"] == pytest.approx(24.5)
    # 4 convs: 3 inputs (128, 512, 7, 7) and the downsample's (128, 256, 14, 14)
    assert sorted(s[1] for s in four["shapes"].values()) == [256, 512, 512, 512]
    per_rank = 3 * (128 * 49 + 512) + (128 * 196 + 256)
    assert four["rank"] == pytest.approx(1.11 * 2**20 / 4 / per_rank)
    assert 6 < four["rank"] < 7 and 14 < two["rank"] < 15


def test_channel_spectrum_ranks_grow_with_eps(one_thread):
    out = channel_spectrum(
        "resnet18",
        weights=None,
        dataset="cifar10_mini",
        classes=[0, 1, 2],
        layers=2,
        resolution=16,
        num_batches=2,
        batch_size=8,
        eps_values=(0.5, 0.9, 1.0),
    )
    assert len(out["layers"]) == 2
    for layer in out["layers"].values():
        assert layer["channels"] == 512 and len(layer["energy"]) == 512
        assert sum(layer["energy"]) == pytest.approx(1.0)
        assert layer["energy"] == sorted(layer["energy"], reverse=True)
        ranks = layer["ranks"]
        assert 1 <= ranks["0.5"] <= ranks["0.9"] < ranks["1.0"] == 512
