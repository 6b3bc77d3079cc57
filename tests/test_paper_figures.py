"""The paper's figures drawn from reference-sized rows: no text overlaps, no legend over data.

The rows have the shape of the reference profile's (two models, two datasets, three
choices of modes, three epochs; four methods' accuracy matrices), with values spread
over the ranges the reference run produced, so each figure is checked at the size the
gallery shows, not only at the smoke profile's.
"""

from __future__ import annotations

import itertools

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from lance_lib.reporting import (
    layout_problems,
    plot_acc_memory,
    plot_accuracy_matrices,
    plot_angle_epochs,
    plot_eps_fidelity,
    plot_lance_ablations,
    use_style,
)

MODELS, DATASETS = ("resnet18", "mcunet"), ("cifar10", "notmnist")
MODES = ("all", "no_batch", "channel")
RNG = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def style():
    use_style()
    yield
    plt.close("all")


def _clean(fig) -> None:
    problems = layout_problems(fig)
    assert problems == [], "\n".join(problems)


def test_fig1c_acc_memory():
    rows = pd.DataFrame(
        [
            dict(model=m, dataset=d, method=method, layers=layers, batch_size=32,
                 analytic_mb=mb * layers, accuracy=acc + layers, flops=layers * 1e9)
            for m, d in itertools.product(MODELS, DATASETS)
            for (method, mb, acc) in (("bp", 20.0, 55.0), ("lance", 0.3, 50.0))
            for layers in (2, 4)
        ]
    )  # fmt: skip
    _clean(plot_acc_memory(rows, [2, 4]))


def test_fig2_angle_small_multiples():
    rows = pd.DataFrame(
        [
            dict(method="lance", model=m, dataset=d, layers=4, modes=mode, epoch=e,
                 angle_deg=float(RNG.uniform(20, 78)))
            for m, d, mode, e in itertools.product(MODELS, DATASETS, MODES, (1, 2, 3))
        ]
    )  # fmt: skip
    ablation = pd.DataFrame(
        [
            dict(method="lance", model=m, dataset=d, modes=mode,
                 measured_memory_ratio=float(RNG.uniform(0.002, 0.05)),
                 angle_first=float(RNG.uniform(20, 75)))
            for m, d, mode in itertools.product(MODELS, DATASETS, MODES)
        ]
    )  # fmt: skip
    fig = plot_angle_epochs(rows, ablation, ["lance"])
    _clean(fig)
    # one panel per model and dataset, three lines each (one per modes), plus the memory panel
    drawn = [ax for ax in fig.axes if ax.get_visible()]
    assert len(drawn) == 5 and all(len(ax.lines) == 3 + 1 for ax in drawn[:4])


def test_fig3_ablations_log_axes():
    rows = pd.DataFrame(
        [dict(model=m, sweep="eps", value=v, accuracy=50 + 10 * v, memory_mb=0.1 * 10 ** (3 * v),
              bp_accuracy=60.0) for m in MODELS for v in (0.5, 0.7, 0.8, 0.9, 0.95)]
        + [dict(model=m, sweep="num_batches", value=n, accuracy=55.0, memory_mb=3 + n / 10,
                bp_accuracy=60.0) for m in MODELS for n in (1, 5, 10, 20, 50)]
    )  # fmt: skip
    titles = {"eps": ("eps on cifar10", "energy threshold eps"),
              "num_batches": ("N on cifar10 (eps=0.7)", "calibration batches N")}  # fmt: skip
    _clean(plot_lance_ablations(rows, titles, [1, 5, 10, 20, 50]))


def test_fig4_eps_fidelity_legend_outside():
    rows = pd.DataFrame(
        [
            dict(model=m, dataset=d, modes=mode, eps=e, angle_mean=40 - 30 * e, angle_std=5.0,
                 measured_memory_ratio=0.01 * 10 ** e, memory_ratio=0.008 * 10 ** e,
                 accuracy=50 + 5 * e, bp_accuracy=56.0)
            for m, d, mode, e in itertools.product(MODELS[:1], DATASETS, MODES, (0.5, 0.7, 0.9))
        ]
    )  # fmt: skip
    _clean(plot_eps_fidelity(rows))


@pytest.mark.parametrize("count", [2, 5])
def test_table3_matrices_share_one_colour_bar(count):
    matrices = [
        (f"lance ({rule}) on five_datasets_nosvhn\nACC 70.1, BWT -3.2",
         np.tril(RNG.uniform(30, 99, (4, 4))).tolist())
        for rule in ("residual", "eq5", "gpm", "finetune", "multitask")[:count]
    ]  # fmt: skip
    fig = plot_accuracy_matrices(matrices)
    _clean(fig)
    assert sum(ax.get_label() == "<colorbar>" for ax in fig.axes) == 1
