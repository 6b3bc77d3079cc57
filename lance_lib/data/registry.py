"""The dataset registry: :class:`DatasetSpec` entries and :func:`get_dataset`.

Every dataset of the paper is reached through :func:`get_dataset`, which uses
torchvision's own dataset classes wherever torchvision has the dataset and small readers
for the others (:mod:`lance_lib.data.catalog` registers them all with
:func:`register_dataset`). Every returned dataset yields ``(image, label)`` with
``image`` a normalised ``float32`` tensor ``(3, R, R)`` and ``label`` an ``int``, and
exposes ``.targets`` and ``.classes``.

``download=True`` downloads into ``ROOT/<name>/``; nothing is downloaded otherwise, and
a missing dataset raises :class:`~lance_lib.data.locate.DatasetNotFoundError` naming the
paths searched and how to obtain it. The default dataset ``cifar10_mini`` ships with the
repository (``data/cifar10-mini/{train,test}.zip``, see ``data/README.md``) and needs no
download.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from torch.utils.data import Dataset
from torchvision import datasets

from lance_lib.data.locate import ROOT_RULE, DatasetNotFoundError, data_root
from lance_lib.data.transforms import ImageTransform, Transform

__all__ = [
    "DATASETS",
    "SPLITS",
    "DatasetSpec",
    "Loader",
    "get_dataset",
    "not_found",
    "register_dataset",
]

SPLITS = ("train", "test")

#: ``load(spec, root, split, download, transform) -> Dataset``.
Loader = Callable[["DatasetSpec", Path, str, bool, Transform], Dataset]


@dataclass(frozen=True)
class DatasetSpec:
    """One entry of :data:`DATASETS`.

    Attributes
    ----------
    name : str
        Registry name (also the sub-folder of the data root that downloads go to).
    num_classes : int
        Number of classes.
    resolution : int
        Default side of the square model input (the paper's native size).
    downloadable : bool
        Whether ``download=True`` fetches it (through torchvision).
    layout : str
        Files expected under the data root (shown in :class:`DatasetNotFoundError`).
    source : str
        Official source.
    load : callable
        ``load(spec, root, split, download, transform) -> Dataset``.
    """

    name: str
    num_classes: int
    resolution: int
    downloadable: bool
    layout: str
    source: str
    load: Loader = field(repr=False, compare=False)


def not_found(
    spec: DatasetSpec, root: Path, split: str, searched: Sequence[Path]
) -> DatasetNotFoundError:
    """Build the error that says where a dataset was looked for and how to get it."""
    lines = [f"dataset {spec.name!r} (split {split!r}) not found; searched:"]
    lines += [f"  {path}" for path in searched]
    if spec.downloadable:
        lines.append(
            f"Fix: call get_dataset({spec.name!r}, download=True) on a machine with internet "
            f"(torchvision downloads it into {root / spec.name}), "
            "or place the files at one of the paths above."
        )
    else:
        lines.append("There is no automatic download (download=True does not help).")
    lines += [f"Expected files: {spec.layout}", f"Source: {spec.source}", f"Note: {ROOT_RULE}."]
    return DatasetNotFoundError("\n".join(lines))


_DATASETS: dict[str, DatasetSpec] = {}

#: ``{name: DatasetSpec}`` of every registered dataset (read-only; filled by
#: :func:`register_dataset`, see :mod:`lance_lib.data.catalog`).
DATASETS: Mapping[str, DatasetSpec] = MappingProxyType(_DATASETS)


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    """Add ``spec`` to :data:`DATASETS` under ``spec.name``.

    Raises
    ------
    ValueError
        The name is registered already, or is reserved (``imagefolder:``).
    """
    if spec.name in _DATASETS or spec.name.startswith("imagefolder:"):
        raise ValueError(f"dataset name {spec.name!r} is taken; register it under another name")
    _DATASETS[spec.name] = spec
    return spec


def get_dataset(
    name: str,
    split: str = "train",
    *,
    root: str | os.PathLike | None = None,
    resolution: int | None = None,
    augment: bool | None = None,
    download: bool = False,
    gray_to_rgb: bool = True,
    crop_padding: int = 0,
) -> Dataset:
    """Return a dataset of the registry with the paper's transforms.

    Parameters
    ----------
    name : str
        A key of :data:`DATASETS`, or ``"imagefolder:<path>"`` for any ImageFolder tree
        ``<path>/<split>/<class>/<image>`` (a relative ``<path>`` is taken under the
        data root).
    split : {"train", "test"}
        The official split (Flowers-102: train + val for ``"train"``; Oxford-IIIT Pet:
        trainval).
    root : str or os.PathLike, optional
        Data root, see :func:`data_root`.
    resolution : int, optional
        Side of the square output; default the dataset's native size
        (:attr:`DatasetSpec.resolution`: 32 for CIFAR and 5-Datasets, 84 for miniImageNet,
        224 for Pets, Flowers-102 and CUB-200). For ``imagefolder:`` the default keeps the
        stored size.
    augment : bool, optional
        Random horizontal flip; default ``split == "train"``.
    download : bool
        Let torchvision download a missing dataset into ``ROOT/<name>/``.
    gray_to_rgb : bool
        Repeat gray images (MNIST, Fashion-MNIST, notMNIST) to 3 channels, as 5-Datasets
        does. If False they stay 1-channel, normalised with the channel mean of the
        ImageNet statistics.
    crop_padding : int
        Random pad-and-crop augmentation on training images (see
        :class:`ImageTransform`); 0, the paper's pipeline, by default.

    Returns
    -------
    torch.utils.data.Dataset
        Items ``(image, label)``: ``float32`` ``(3, R, R)`` and ``int``; the dataset has
        ``.targets`` and ``.classes``.

    Raises
    ------
    DatasetNotFoundError
        The files are not under the data root and ``download`` is False (or the dataset
        cannot be downloaded automatically).

    Notes
    -----
    Appendix A of LANCE: images are resized to the model's native input and the only
    augmentation is a random horizontal flip; 5-Datasets repeats gray channels and
    resizes to 32x32. All datasets are normalised with the ImageNet mean and standard
    deviation (``IMAGENET_MEAN``, ``IMAGENET_STD``), which the ImageNet-pretrained
    fine-tuning models expect; the paper does not state the continual-learning
    normalisation, and the same statistics are used there. The flip draws from torch's
    global generator (in the main process) or the DataLoader worker's generator.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root_path = data_root(root)
    augment = split == "train" if augment is None else augment
    if name.startswith("imagefolder:"):
        folder = root_path / Path(name.removeprefix("imagefolder:")).expanduser() / split
        if not folder.is_dir():
            raise DatasetNotFoundError(
                f"dataset {name!r} (split {split!r}) not found; searched:\n  {folder}\n"
                f"Expected an ImageFolder tree {folder}/<class>/<image>. Note: {ROOT_RULE}."
            )
        transform = ImageTransform(resolution, augment, crop_padding=crop_padding)
        return datasets.ImageFolder(folder, transform=transform)
    if name not in DATASETS:
        raise ValueError(
            f"unknown dataset {name!r}; known: {sorted(DATASETS)} or 'imagefolder:<path>'"
        )
    spec = DATASETS[name]
    resolution = spec.resolution if resolution is None else resolution
    transform = ImageTransform(resolution, augment, gray_to_rgb, crop_padding)
    return spec.load(spec, root_path, split, download, transform)
