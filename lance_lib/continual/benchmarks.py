"""The continual-learning benchmarks of Table 3 (settings of Table 7) and the embedded one.

Each benchmark is a frozen, validated
:class:`~lance_lib.continual.specs.BenchmarkSpec`, registered with
:func:`register_benchmark` in :data:`BENCHMARKS`; :func:`load_benchmark` builds its
tasks from the dataset registry (:mod:`lance_lib.data`), and
:func:`build_benchmark_model` its network through the model registry
(:func:`lance_lib.models.build_model`).

References
----------
Apolinario & Roy, "LANCE: Low Rank Activation Compression for Efficient On-Device
Continual Learning", arXiv:2509.21617, Sec. 3, Appendix A.2 (Tables 5-7).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from types import MappingProxyType

from torch.utils.data import Dataset

from lance_lib.continual.specs import BenchmarkSpec, ContinualTask
from lance_lib.data import DatasetNotFoundError, get_dataset, task_splits, train_val_split
from lance_lib.models import MultiHead, build_model

__all__ = [
    "BENCHMARKS",
    "build_benchmark_model",
    "load_benchmark",
    "register_benchmark",
]

_BENCHMARKS: dict[str, BenchmarkSpec] = {}

#: ``{name: BenchmarkSpec}`` of every registered benchmark (read-only).
BENCHMARKS: Mapping[str, BenchmarkSpec] = MappingProxyType(_BENCHMARKS)


def register_benchmark(spec: BenchmarkSpec) -> BenchmarkSpec:
    """Add ``spec`` to :data:`BENCHMARKS` under its name (each name once)."""
    if spec.name in _BENCHMARKS:
        raise ValueError(f"benchmark {spec.name!r} is registered twice; rename one")
    _BENCHMARKS[spec.name] = spec
    return spec


_FIVE_DATASETS = dict(
    classes_per_task=10,
    model="reduced_resnet18_cl",
    lr=0.1,
    min_lr=1e-3,
    lr_factor=3.0,
    patience=5,
    epochs=100,
    eps_cl=0.97,
    gpm_threshold=0.965,
    gpm_threshold_step=0.0,
)

register_benchmark(
    BenchmarkSpec(
        name="split_cifar100",
        label="Split CIFAR-100 (10 x 10, AlexNet)",
        datasets=("cifar100",),
        num_tasks=10,
        classes_per_task=10,
        model="alexnet_cl",
    )
)
register_benchmark(
    BenchmarkSpec(
        name="split_miniimagenet",
        label="Split miniImageNet (20 x 5, reduced ResNet18)",
        datasets=("miniimagenet",),
        num_tasks=20,
        classes_per_task=5,
        model="reduced_resnet18_cl",
        model_options={"first_stride": 2},
        resolution=84,
        lr=0.1,
        epochs=100,
        eps_cl=0.985,
        gpm_threshold=0.985,
        gpm_threshold_step=0.0003,
    )
)
register_benchmark(
    BenchmarkSpec(
        name="five_datasets",
        label="5-Datasets (reduced ResNet18)",
        datasets=("cifar10", "mnist", "svhn", "fashionmnist", "notmnist"),
        num_tasks=5,
        **_FIVE_DATASETS,
    )
)
register_benchmark(
    BenchmarkSpec(
        name="five_datasets_nosvhn",
        label="5-Datasets without SVHN (4 tasks, reduced ResNet18; SVHN is not available offline)",
        datasets=("cifar10", "mnist", "fashionmnist", "notmnist"),
        num_tasks=4,
        **{**_FIVE_DATASETS, "epochs": 5},
        deviations=(
            "SVHN left out (not available offline): 4 tasks, CIFAR-10, MNIST, Fashion-MNIST "
            "and notMNIST, each at 32 px with gray repeated to 3 channels",
            "at most 5 epochs per task (Table 7: 100) with Table 7's plateau schedule",
        ),
    )
)
register_benchmark(
    BenchmarkSpec(
        name="cifar10_mini",
        label="Embedded CIFAR-10 subset (5 x 2, AlexNet)",
        datasets=("cifar10_mini",),
        num_tasks=5,
        classes_per_task=2,
        model="alexnet_cl",
        epochs=10,
        lr=0.05,
        num_batches_cl=2,
        deviations=(
            "the embedded CIFAR-10 subset (5 tasks of 2 classes, 950 training images each) "
            "instead of Split CIFAR-100, with Split CIFAR-100's network and Table 7 settings "
            "except three:",
            "at most 10 epochs per task (Table 7: 200): Table 7's 0.01 with a plateau "
            "schedule leaves these tasks barely learned in 5-10 epochs, so",
            "lr 0.05 (Table 7: 0.01)",
            "N_CL = 2 batches (Table 7: 10): 128 samples, about GPM's 125 per task; 10 "
            "batches would be two thirds of a task's training set",
        ),
    )
)


def build_benchmark_model(spec: BenchmarkSpec, num_tasks: int | None = None) -> MultiHead:
    """The benchmark's network with one head per task (the model registry builds it)."""
    return build_model(
        spec.model,
        spec.classes_per_task,
        num_tasks=spec.num_tasks if num_tasks is None else num_tasks,
        input_size=spec.resolution,
        **spec.model_options,
    )


def load_benchmark(
    spec: BenchmarkSpec, *, root: str | os.PathLike | None = None, seed: int = 0
) -> list[ContinualTask]:
    """Build the ``spec.num_tasks`` tasks of a benchmark from the dataset registry.

    Parameters
    ----------
    spec
        The benchmark.
    root
        Data root (:func:`lance_lib.data.data_root`).
    seed
        Seeds task ``t``'s validation split with ``seed + t``.

    Returns
    -------
    list of ContinualTask

    Raises
    ------
    DatasetNotFoundError
        A dataset is missing; the message names every missing dataset, where it was
        searched and, for 5-Datasets, the offline variant without SVHN.

    Notes
    -----
    No augmentation (as GPM); validation is a stratified ``val_fraction`` of each
    training set (:func:`lance_lib.data.train_val_split`).
    """
    kw = {"root": root, "resolution": spec.resolution, "augment": False}
    if len(spec.datasets) == 1:
        name = spec.datasets[0]
        train, test = get_dataset(name, "train", **kw), get_dataset(name, "test", **kw)
        if spec.num_tasks * spec.classes_per_task > len(train.classes):
            raise ValueError(
                f"{spec.name}: num_tasks={spec.num_tasks} x classes_per_task="
                f"{spec.classes_per_task} exceeds the {len(train.classes)} classes of {name}; "
                f"use num_tasks <= {len(train.classes) // spec.classes_per_task}"
            )
        pairs = zip(
            task_splits(train, spec.classes_per_task, spec.num_tasks),
            task_splits(test, spec.classes_per_task, spec.num_tasks),
            strict=True,
        )
        return [
            ContinualTask(f"{name}[{', '.join(tr.classes)}]", *_train_val(tr, spec, seed + t), te)
            for t, (tr, te) in enumerate(pairs)
        ]
    tasks: list[ContinualTask] = []
    missing: dict[str, str] = {}
    for t, name in enumerate(spec.datasets[: spec.num_tasks]):
        try:
            train, test = get_dataset(name, "train", **kw), get_dataset(name, "test", **kw)
        except DatasetNotFoundError as err:
            missing[name] = str(err).splitlines()[0]
            continue
        if len(train.classes) > spec.classes_per_task:
            raise ValueError(
                f"{spec.name}: {name} has {len(train.classes)} classes but each head has "
                f"classes_per_task={spec.classes_per_task}"
            )
        tasks.append(ContinualTask(name, *_train_val(train, spec, seed + t), test))
    if missing:
        offline = [b for b, s in BENCHMARKS.items() if set(s.datasets) < set(spec.datasets)]
        hint = f"; the benchmarks {offline} leave some of them out" if offline else ""
        raise DatasetNotFoundError(
            f"{spec.label} needs every one of {list(spec.datasets)}; missing: "
            + "; ".join(f"{k}: {v}" for k, v in missing.items())
            + hint
        )
    return tasks


def _train_val(dataset: Dataset, spec: BenchmarkSpec, seed: int) -> tuple[Dataset, Dataset]:
    """The training and validation parts of one task's training set."""
    return train_val_split(dataset, spec.val_fraction, seed=seed)
