"""Class splits: subsets that keep labels, Table 1's two halves, task splits, validation.

Every function works from ``.targets`` alone, so no image is loaded to split a dataset.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

__all__ = ["LabeledSubset", "class_subset", "task_splits", "train_val_split", "two_class_splits"]


def _targets(dataset: Dataset) -> list[int]:
    """Labels of a dataset from its ``.targets`` (list, array or tensor)."""
    targets = dataset.targets
    return [int(t) for t in (targets.tolist() if hasattr(targets, "tolist") else targets)]


class LabeledSubset(Dataset):
    """A subset of a labelled dataset that keeps ``.targets`` and ``.classes``.

    Parameters
    ----------
    dataset : Dataset
        Source dataset with ``.targets`` and ``.classes``.
    indices : Sequence[int]
        Positions in ``dataset``.
    label_map : Mapping[int, int], optional
        Old label -> new label; identity if None.
    classes : Sequence[str], optional
        Class names of the new labels; ``dataset.classes`` if None.
    """

    def __init__(
        self,
        dataset: Dataset,
        indices: Sequence[int],
        label_map: Mapping[int, int] | None = None,
        classes: Sequence[str] | None = None,
    ) -> None:
        self.dataset = dataset
        self.indices = list(indices)
        self.label_map = dict(label_map) if label_map is not None else None
        source = _targets(dataset)
        self.targets = [
            source[i] if self.label_map is None else self.label_map[source[i]] for i in self.indices
        ]
        self.classes = list(dataset.classes if classes is None else classes)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, _ = self.dataset[self.indices[index]]
        return image, self.targets[index]


def class_subset(dataset: Dataset, classes: Sequence[int], remap: bool = True) -> LabeledSubset:
    """Keep only the samples of ``classes``.

    Parameters
    ----------
    dataset : Dataset
        Dataset with ``.targets`` and ``.classes``.
    classes : Sequence[int]
        Labels to keep (distinct).
    remap : bool
        Relabel ``classes[j]`` as ``j`` (and ``.classes`` lists only the kept names, in
        that order); otherwise labels and ``.classes`` are unchanged.

    Returns
    -------
    LabeledSubset
        The samples of those classes, in their original order.
    """
    keep = [int(c) for c in classes]
    if len(set(keep)) != len(keep):
        raise ValueError(f"classes must be distinct, got {keep}")
    wanted = set(keep)
    indices = [i for i, t in enumerate(_targets(dataset)) if t in wanted]
    if not remap:
        return LabeledSubset(dataset, indices)
    names = [dataset.classes[c] for c in keep]
    return LabeledSubset(dataset, indices, {c: j for j, c in enumerate(keep)}, names)


def two_class_splits(num_classes: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """Split the classes into two disjoint halves (Table 1 protocol).

    Parameters
    ----------
    num_classes : int
        Number of classes (e.g. 1000 for ImageNet).
    seed : int
        Seed of the random permutation.

    Returns
    -------
    tuple of list of int
        Split A (pretraining; ``num_classes // 2`` classes) and split B (fine-tuning; the
        rest), each sorted.

    Notes
    -----
    Table 1 of LANCE pretrains on split A and fine-tunes on split B of ImageNet-1k.
    """
    perm = torch.randperm(num_classes, generator=torch.Generator().manual_seed(seed)).tolist()
    half = num_classes // 2
    return sorted(perm[:half]), sorted(perm[half:])


def task_splits(
    dataset: Dataset,
    classes_per_task: int,
    num_tasks: int | None = None,
    order: Sequence[int] | None = None,
) -> list[LabeledSubset]:
    """Cut a dataset into disjoint tasks of ``classes_per_task`` classes.

    Parameters
    ----------
    dataset : Dataset
        Dataset with ``.targets`` and ``.classes``.
    classes_per_task : int
        Classes in each task.
    num_tasks : int, optional
        Number of tasks; default as many as ``order`` fills.
    order : Sequence[int], optional
        Class order; default label order ``0..C-1``.

    Returns
    -------
    list of LabeledSubset
        Task ``t`` holds classes ``order[k t : k (t + 1)]``, relabelled ``0..k-1``.

    Notes
    -----
    Split CIFAR-100 (10 tasks of 10 classes) and Split miniImageNet (20 tasks of 5) of
    LANCE Table 3, in the GPM convention: task ``t`` = classes ``10t..10t+9``, one head
    per task.
    """
    order = list(range(len(dataset.classes))) if order is None else [int(c) for c in order]
    if num_tasks is None:
        num_tasks = len(order) // classes_per_task
    if num_tasks * classes_per_task > len(order):
        raise ValueError(
            f"{num_tasks} tasks x {classes_per_task} classes exceed the {len(order)} classes"
        )
    k = classes_per_task
    return [class_subset(dataset, order[t * k : (t + 1) * k]) for t in range(num_tasks)]


def train_val_split(
    dataset: Dataset, val_fraction: float, seed: int = 0
) -> tuple[LabeledSubset, LabeledSubset]:
    """Hold out a per-class stratified validation set.

    Parameters
    ----------
    dataset : Dataset
        Dataset with ``.targets`` and ``.classes``.
    val_fraction : float
        Fraction of every class moved to validation (rounded per class), in ``[0, 1)``.
    seed : int
        Seed of the per-class shuffles.

    Returns
    -------
    tuple of LabeledSubset
        ``(train, val)``, disjoint, each in the original sample order, labels unchanged.

    Notes
    -----
    LANCE Tables 5 and 6 hold out 5% of each training set for validation in the
    continual-learning benchmarks (e.g. 250 of 5,000 images per Split CIFAR-100 task).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    generator = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, t in enumerate(_targets(dataset)):
        by_class[t].append(i)
    val: list[int] = []
    for label in sorted(by_class):
        members = by_class[label]
        perm = torch.randperm(len(members), generator=generator).tolist()
        val += [members[j] for j in perm[: round(val_fraction * len(members))]]
    val_set = set(val)
    train = [i for i in range(len(dataset)) if i not in val_set]
    return LabeledSubset(dataset, train), LabeledSubset(dataset, sorted(val))
