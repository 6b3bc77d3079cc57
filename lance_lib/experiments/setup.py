"""Model preparation for fine-tuning, written once: weights, classes, tail, prefix cache.

Every experiment that fine-tunes the last layers of a pretrained CNN (fine-tuning,
latency, region memory, the benchmarks) starts the same way, Appendix A.1 of LANCE:
take the starting weights, put a new classifier for the fine-tuning classes, choose
the last ``N`` convolutions, freeze everything else (BatchNorm in evaluation mode), and,
because the frozen prefix then depends on the image only, split the network into a
frozen prefix and a trainable tail whose inputs can be cached
(:class:`~lance_lib.experiments.prefix_cache.PrefixCache`). :func:`prepare_finetuning` does all of
it and returns a :class:`Prepared`; :func:`class_split`, :func:`starting_model` and
:func:`select_tail` are its steps, for experiments that vary one of them (e.g. the
number of trainable layers on one loaded model).

Starting weights (``weights``):

``"reference"``
    The backbones shipped under ``data/weights/`` (:mod:`lance_lib.weights`), pretrained
    on CIFAR-10 class split A. Split A is the recipe's
    (:attr:`lance_lib.weights.ReferenceRecipe.classes`), whatever the experiment's seed;
    the fine-tuning classes default to split B on the datasets that share CIFAR-10's
    labels (:data:`CIFAR10_LABELS`) and to every class on other (transfer) datasets.
    The default resolution is the weights' own (64 px for ResNet18, 96 px for the MCU
    stand-in).
``"pretrained-split-A"``
    The paper's Table 1 protocol on the fine-tuning dataset itself: pretrain from
    scratch on its class split A (:func:`lance_lib.training.pretrain.pretrain`, cached) and
    fine-tune on split B. The split is fixed (:data:`SPLIT_SEED`, the reference
    recipes' split seed, so CIFAR-10's halves are the same for both kinds of weights);
    the experiment's seed changes the pretraining's initialisation and data order, not
    the classes.
``"IMAGENET1K_V1"``
    torchvision's ImageNet weights (needs a network or a filled torch hub cache);
    every class of the dataset is fine-tuned.
``None``
    A random initialisation; every class of the dataset.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from lance_lib.data import DATASETS, two_class_splits
from lance_lib.experiments.prefix_cache import PrefixCache
from lance_lib.models import (
    MODEL_INFO,
    build_model,
    freeze_for_finetuning,
    last_n_convs,
    replace_classifier,
    split_at,
)
from lance_lib.progress import progress_enabled
from lance_lib.training.pretrain import pretrain, state_dict_sha256
from lance_lib.weights import REFERENCE_RECIPES, load_reference, manifest_entry

__all__ = [
    "CIFAR10_LABELS",
    "SPLIT_SEED",
    "WEIGHTS",
    "ClassSplit",
    "Prepared",
    "StartingWeights",
    "check_classes",
    "check_weights",
    "class_split",
    "dataset_num_classes",
    "default_resolution",
    "prepare_finetuning",
    "pretrain_settings",
    "reference_sha256",
    "resolve_device",
    "select_tail",
    "starting_model",
]

#: Accepted values of ``weights`` (see the module notes).
WEIGHTS: tuple[str | None, ...] = ("reference", "pretrained-split-A", "IMAGENET1K_V1", None)

#: Datasets labelled as CIFAR-10, in which the reference weights' split B exists.
CIFAR10_LABELS: tuple[str, ...] = ("cifar10", "cifar10_mini")

#: Seed of :func:`lance_lib.data.two_class_splits` for ``"pretrained-split-A"``.
SPLIT_SEED = 0


def check_weights(model: str, weights: str | None) -> None:
    """Raise ``ValueError`` naming ``weights`` when ``model`` cannot start from them."""
    if weights not in WEIGHTS:
        raise ValueError(
            f"weights must be one of {list(WEIGHTS)}, got {weights!r}; e.g. "
            f"weights='reference' (the shipped CIFAR-10 split-A backbones)"
        )
    if weights == "reference" and model not in REFERENCE_RECIPES:
        raise ValueError(
            f"weights='reference' exists for models {sorted(REFERENCE_RECIPES)}, not "
            f"{model!r}; use weights='pretrained-split-A' (pretrained here on split A) or "
            f"weights=None (random initialisation)"
        )


def dataset_num_classes(dataset: str) -> int | None:
    """Classes of a registered dataset without loading it (``None`` for ``imagefolder:``)."""
    spec = DATASETS.get(dataset)
    return None if spec is None else spec.num_classes


def check_classes(classes: Sequence[int] | None, num_classes: int | None) -> tuple[int, ...] | None:
    """``classes`` as a tuple of distinct labels in ``0..num_classes-1``, else ``ValueError``.

    ``num_classes=None`` (a dataset of unknown size) checks integrality and distinctness
    only.
    """
    if classes is None:
        return None
    if isinstance(classes, (str, bytes)) or not isinstance(classes, Sequence):
        raise TypeError(f"classes must be a list of labels or None, got {classes!r}")
    out = []
    for c in classes:
        if isinstance(c, bool) or not isinstance(c, numbers.Integral):
            raise TypeError(f"classes must hold integer labels, got {c!r} in {list(classes)}")
        out.append(int(c))
    span = "" if num_classes is None else f" in 0..{num_classes - 1}"
    if not out:
        raise ValueError(f"classes must name at least one label{span}, got []")
    if len(set(out)) != len(out):
        raise ValueError(f"classes must be distinct, got {out}")
    bad = [c for c in out if c < 0 or (num_classes is not None and c >= num_classes)]
    if bad:
        raise ValueError(
            f"classes {bad} are outside the dataset's labels{span or ' (>= 0)'}; got "
            f"classes={out}: pick labels{span}, or classes=None for the default split"
        )
    return tuple(out)


def pretrain_settings(finetune: Mapping[str, Any]) -> dict[str, Any]:
    """The on-the-fly pretraining settings a profile's ``finetune`` section sets, if any.

    ``pretrain_epochs`` and ``pretrain_resolution`` matter only for
    ``weights="pretrained-split-A"``; a profile on the reference weights may leave them
    out, and the callee's defaults then apply.
    """
    return {k: finetune[k] for k in ("pretrain_epochs", "pretrain_resolution") if k in finetune}


def default_resolution(model: str, weights: str | None) -> int:
    """Input side when ``resolution=None``: the reference weights' own, else the model's."""
    if weights == "reference":
        return REFERENCE_RECIPES[model].resolution
    return MODEL_INFO[model].native_resolution


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device``, or CUDA when available and CPU otherwise."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass(frozen=True)
class ClassSplit:
    """Pretraining and fine-tuning classes of one experiment.

    Attributes
    ----------
    pretrain
        Split A: the classes the starting weights were trained on (labels of the
        pretraining dataset: CIFAR-10 for ``"reference"``), ``None`` when unknown or
        irrelevant (ImageNet weights, random init).
    finetune
        The fine-tuning classes, relabelled ``0..k-1`` in this order.
    """

    pretrain: tuple[int, ...] | None
    finetune: tuple[int, ...]


def class_split(
    model: str,
    dataset: str,
    weights: str | None,
    classes: Sequence[int] | None = None,
    *,
    num_classes: int | None = None,
) -> ClassSplit:
    """The classes the starting weights know and the classes to fine-tune (module notes).

    Parameters
    ----------
    model, dataset, weights
        As in :func:`prepare_finetuning`.
    classes
        Explicit fine-tuning classes; ``None`` for the default of ``weights``.
    num_classes
        Classes of ``dataset``; default from its registry entry (needed for
        ``imagefolder:`` datasets).

    Returns
    -------
    ClassSplit
    """
    check_weights(model, weights)
    num_classes = num_classes or dataset_num_classes(dataset)
    if num_classes is None:
        raise ValueError(f"the number of classes of dataset {dataset!r} is unknown; pass it")
    chosen = check_classes(classes, num_classes)
    if weights == "reference":
        split_a = tuple(REFERENCE_RECIPES[model].classes)
        if chosen is None:
            if dataset in CIFAR10_LABELS:
                chosen = tuple(c for c in range(num_classes) if c not in split_a)
            else:
                chosen = tuple(range(num_classes))
        return ClassSplit(split_a, chosen)
    if weights == "pretrained-split-A":
        split_a, split_b = two_class_splits(num_classes, seed=SPLIT_SEED)
        return ClassSplit(tuple(split_a), chosen or tuple(split_b))
    return ClassSplit(None, chosen or tuple(range(num_classes)))


@dataclass(frozen=True)
class StartingWeights:
    """Where the starting weights came from (for records and provenance).

    Attributes
    ----------
    name
        The ``weights`` setting.
    sha256
        Reference weights: the file's SHA-256 from the verified manifest entry;
        otherwise :func:`lance_lib.training.pretrain.state_dict_sha256` of the starting state
        dict (before the classifier is replaced).
    record
        The manifest entry (reference) or the pretraining record
        (``"pretrained-split-A"``); ``None`` otherwise.
    """

    name: str | None
    sha256: str
    record: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view."""
        return {"name": self.name, "sha256": self.sha256, "record": self.record}


def reference_sha256(model: str) -> str:
    """SHA-256 of the verified reference file of ``model`` (raises ``ReferenceWeightsError``)."""
    return manifest_entry(model)["sha256"]


def starting_model(
    model: str,
    weights: str | None,
    *,
    dataset: str = "cifar10_mini",
    pretrain_classes: Sequence[int] | None = None,
    pretrain_epochs: int = 10,
    pretrain_resolution: int = 32,
    pretrain_lr: float = 0.05,
    seed: int = 0,
    root: str | os.PathLike | None = None,
    progress: bool | None = None,
    device: str | torch.device | None = None,
) -> tuple[nn.Module, StartingWeights]:
    """The network with its starting weights, on CPU, and where they came from.

    Parameters
    ----------
    model, weights
        A model of :data:`lance_lib.models.MODEL_INFO` and one of :data:`WEIGHTS`.
    dataset, pretrain_classes, pretrain_epochs, pretrain_resolution, pretrain_lr, seed
        ``"pretrained-split-A"`` only: pretraining on these classes of ``dataset``
        (:func:`lance_lib.training.pretrain.pretrain`, cached under the data root).
    root, progress, device
        Data root, progress bars (``None``: :func:`lance_lib.progress.progress_enabled`),
        and where pretraining runs.

    Returns
    -------
    (nn.Module, StartingWeights)
        The model keeps its pretraining classifier; see :func:`prepare_finetuning`.
        The caller's random state is left as it was (``seed`` fixes the draws).

    Raises
    ------
    lance_lib.weights.ReferenceWeightsError
        ``"reference"`` with a missing or altered weight file (names ``make weights``).
    """
    check_weights(model, weights)
    # building any model draws its initialisation from the global stream: fork it
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if weights == "reference":
            net = load_reference(model)
            record = net.reference_record
            return net, StartingWeights(weights, record["sha256"], record)
        if weights == "pretrained-split-A":
            net = pretrain(
                model,
                dataset,
                pretrain_classes,
                resolution=pretrain_resolution,
                epochs=pretrain_epochs,
                lr=pretrain_lr,
                seed=seed,
                root=root,
                progress=progress_enabled(progress),
                device=device,
            )
            sha = state_dict_sha256(net.state_dict())
            # the checkpoint by file name: a record must not depend on this machine's paths
            record = {
                **net.pretrain_record,
                "checkpoint": Path(net.pretrain_record["checkpoint"]).name,
            }
            return net, StartingWeights(weights, sha, record)
        net = build_model(model, 1000 if weights else 10, weights=weights)
    return net, StartingWeights(weights, state_dict_sha256(net.state_dict()))


def select_tail(
    model: nn.Module, layers: int | Sequence[str], *, split: bool = True
) -> tuple[tuple[str, ...], nn.Module | None, nn.Module, tuple[str, ...]]:
    """Make the chosen convolutions (and the classifier) trainable; split off the prefix.

    Parameters
    ----------
    model
        A network with its fine-tuning classifier (modified in place: parameters
        frozen except the layers and the classifier, BatchNorm in evaluation mode for
        good, :func:`lance_lib.models.freeze_for_finetuning`).
    layers
        ``N`` for the last ``N`` convolutions (:func:`lance_lib.models.last_n_convs`),
        or module names.
    split
        Split at the first trained layer's block (:func:`lance_lib.models.split_at`);
        ``False`` trains the whole model as the tail.

    Returns
    -------
    (layers, prefix, tail, tail_layers)
        Names in ``model``; the frozen prefix (``None`` without ``split``); the module
        to train (sharing its modules with ``model``); the layers' names in ``tail``.
    """
    if isinstance(layers, int):
        names = tuple(name for name, _ in last_n_convs(model, layers))
    else:
        names = tuple(layers)
    freeze_for_finetuning(model, list(names))
    if not split:
        return names, None, model, names
    prefix, tail = split_at(model, names[0])
    where = {id(m): n for n, m in tail.named_modules()}
    return names, prefix, tail, tuple(where[id(model.get_submodule(n))] for n in names)


@dataclass(frozen=True)
class Prepared:
    """A network ready for fine-tuning its last layers (see :func:`prepare_finetuning`).

    Attributes
    ----------
    model
        The whole network: new classifier, only ``layers`` and the classifier
        trainable, BatchNorm frozen in evaluation mode, on ``device``.
    layers
        Names (in ``model``) of the trained convolutions, earliest first.
    prefix
        The frozen part before the block of the first trained layer (``None`` when
        not split).
    tail
        The module to train: ``tail(prefix(x)) == model(x)``; ``model`` when not split.
    tail_layers
        The trained convolutions' names in ``tail``.
    classes
        Pretraining and fine-tuning classes.
    weights
        Where the starting weights came from.
    resolution
        Input side in pixels.
    device
        Where the model lives.
    stand_in
        The model's stand-in note (the MCU-class model), or ``None``.
    """

    model: nn.Module
    layers: tuple[str, ...]
    prefix: nn.Module | None
    tail: nn.Module
    tail_layers: tuple[str, ...]
    classes: ClassSplit
    weights: StartingWeights
    resolution: int
    device: torch.device
    stand_in: str | None = None

    def tail_data(self, dataset: Dataset, *, flips: bool, progress: bool | None = None) -> Dataset:
        """What ``tail`` trains or is evaluated on: cached prefix outputs, or ``dataset``.

        ``dataset`` must be unaugmented when a prefix exists (:class:`PrefixCache`
        draws the flips itself when ``flips``).
        """
        if self.prefix is None:
            return dataset
        return PrefixCache(self.prefix, dataset, flips=flips, progress=progress_enabled(progress))


def prepare_finetuning(
    model: str,
    *,
    weights: str | None = "reference",
    dataset: str = "cifar10_mini",
    classes: Sequence[int] | None = None,
    num_classes: int | None = None,
    layers: int | Sequence[str] = 4,
    split: bool = True,
    resolution: int | None = None,
    pretrain_epochs: int = 10,
    pretrain_resolution: int = 32,
    pretrain_lr: float = 0.05,
    seed: int = 0,
    root: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    progress: bool | None = None,
) -> Prepared:
    """Starting weights, new classifier, last ``N`` convs, freezing and prefix/tail split.

    Parameters
    ----------
    model
        A single-task model of :data:`lance_lib.models.MODEL_INFO`.
    weights
        One of :data:`WEIGHTS` (module notes); default the shipped reference backbones.
    dataset, classes, num_classes
        The fine-tuning dataset and classes (:func:`class_split`).
    layers
        ``N`` (the last ``N`` convolutions) or module names.
    split
        Split off the frozen prefix (:func:`select_tail`).
    resolution
        Input side; ``None``: :func:`default_resolution`.
    pretrain_epochs, pretrain_resolution, pretrain_lr
        ``"pretrained-split-A"`` only.
    seed
        Fixes the pretraining (``"pretrained-split-A"``), the random initialisation
        (``None``) and the new classifier; the caller's random state is left as it was.
    root, device, progress
        Data root, where the model goes (default CUDA when available), progress bars
        (``None``: :func:`lance_lib.progress.progress_enabled`).

    Returns
    -------
    Prepared

    Raises
    ------
    lance_lib.weights.ReferenceWeightsError
        Missing or altered reference weights, before anything else is done.
    ValueError
        Unknown weights for the model, or classes outside the dataset's labels.
    """
    split_classes = class_split(model, dataset, weights, classes, num_classes=num_classes)
    device = resolve_device(device)
    net, start = starting_model(
        model,
        weights,
        dataset=dataset,
        pretrain_classes=split_classes.pretrain,
        pretrain_epochs=pretrain_epochs,
        pretrain_resolution=pretrain_resolution,
        pretrain_lr=pretrain_lr,
        seed=seed,
        root=root,
        progress=progress,
        device=device,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        replace_classifier(net, len(split_classes.finetune))
    net.to(device)
    names, prefix, tail, tail_layers = select_tail(net, layers, split=split)
    net.train()
    return Prepared(
        model=net,
        layers=names,
        prefix=prefix,
        tail=tail,
        tail_layers=tail_layers,
        classes=split_classes,
        weights=start,
        resolution=resolution or default_resolution(model, weights),
        device=device,
        stand_in=getattr(net, "stand_in", None),
    )
