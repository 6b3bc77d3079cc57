"""Dataset classes with ``.targets`` and ``.classes``, and the image decoders behind them.

Every dataset the registry returns yields ``(image, label)`` and exposes ``.targets`` and
``.classes``, so that class splits never need to load images: in-memory ``uint8``
images (:class:`TensorImageDataset`, decoded once per process from a zip or an
ImageFolder tree), lazily read files (:class:`ImageFileDataset`), and thin subclasses
of torchvision's classes that add what they lack.
"""

from __future__ import annotations

import abc
import functools
import io
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets

from lance_lib.data.transforms import Transform

__all__ = [
    "IMAGE_SUFFIXES",
    "Flowers102TrainVal",
    "ImageFileDataset",
    "LabeledOxfordIIITPet",
    "LabeledImages",
    "LabeledSVHN",
    "NotMNIST",
    "TensorImageDataset",
    "decode_folder",
    "decode_zip",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class LabeledImages(Dataset, abc.ABC):
    """Base of the image lists below: labels, class names, a transform, one loader per item.

    Parameters
    ----------
    targets : Sequence[int]
        Label of each image.
    classes : Sequence[str]
        Class names, indexed by label.
    transform : callable, optional
        Applied to each image as :meth:`image` returns it.
    """

    def __init__(
        self, targets: Sequence[int], classes: Sequence[str], transform: Transform | None
    ) -> None:
        self.targets = list(targets)
        self.classes = list(classes)
        self.transform = transform

    @abc.abstractmethod
    def image(self, index: int) -> Any:
        """The untransformed image ``index``."""

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = self.image(index)
        return (self.transform(image) if self.transform else image), self.targets[index]


class TensorImageDataset(LabeledImages):
    """Images held in memory as one ``uint8`` tensor ``(N, C, H, W)``.

    Parameters
    ----------
    images : torch.Tensor
        ``uint8`` images ``(N, C, H, W)``; shared, never modified.
    targets, classes
        As in :class:`LabeledImages`.
    transform : callable, optional
        Applied to each ``(C, H, W)`` image tensor.
    """

    def __init__(
        self,
        images: torch.Tensor,
        targets: Sequence[int],
        classes: Sequence[str],
        transform: Transform | None = None,
    ) -> None:
        super().__init__(targets, classes, transform)
        self.images = images

    def image(self, index: int) -> torch.Tensor:
        """The ``uint8`` image tensor ``(C, H, W)``."""
        return self.images[index]


class ImageFileDataset(LabeledImages):
    """Images read lazily from files (as RGB with PIL), for datasets too large to cache.

    Parameters
    ----------
    paths : Sequence[pathlib.Path]
        One image file per sample.
    targets, classes
        As in :class:`LabeledImages`.
    transform : callable, optional
        Applied to each PIL image.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        targets: Sequence[int],
        classes: Sequence[str],
        transform: Transform | None = None,
    ) -> None:
        super().__init__(targets, classes, transform)
        self.paths = list(paths)

    def image(self, index: int) -> Image.Image:
        """The file's image, converted to RGB."""
        with Image.open(self.paths[index]) as img:
            return img.convert("RGB")


class NotMNIST(datasets.MNIST):
    """notMNIST letters A..J in MNIST's idx layout, read from ``ROOT/NotMNIST/raw/``.

    There is no download (``mirrors`` is empty): the files
    ``{train,t10k}-{images-idx3,labels-idx1}-ubyte`` must be built from notMNIST_small.
    """

    mirrors: list[str] = []
    classes = list("ABCDEFGHIJ")


class LabeledSVHN(datasets.SVHN):
    """torchvision's SVHN with ``.targets`` and ``.classes`` (digit 0 has label 0)."""

    classes = [str(d) for d in range(10)]

    @property
    def targets(self) -> list[int]:
        return self.labels.tolist()


class LabeledOxfordIIITPet(datasets.OxfordIIITPet):
    """torchvision's Oxford-IIIT Pet (37 breeds) with ``.targets``."""

    @property
    def targets(self) -> list[int]:
        return self._labels


class Flowers102TrainVal(datasets.Flowers102):
    """torchvision's Flowers-102 with ``.targets``; ``split="train"`` is train + val.

    The official split has 10 train + 10 val images per class and a 6,149-image test set;
    like the fine-tuning literature, training uses train + val (2,040 images).
    """

    def __init__(self, root: Path, split: str, **kwargs: Any) -> None:
        super().__init__(root, split="train" if split == "train" else "test", **kwargs)
        if split == "train":
            val = datasets.Flowers102(root, split="val")
            self._image_files += val._image_files
            self._labels += val._labels

    @property
    def targets(self) -> list[int]:
        return self._labels


def _decode(
    names: Sequence[str], blobs: Sequence[bytes]
) -> tuple[torch.Tensor, list[int], list[str]]:
    """Decode ``<class>/<file>`` images to one uint8 tensor; classes in sorted name order."""
    classes = sorted({name.split("/")[0] for name in names})
    index = {cls: i for i, cls in enumerate(classes)}
    decoded = []
    for blob in blobs:
        with Image.open(io.BytesIO(blob)) as img:
            decoded.append(np.asarray(img.convert("RGB")))
    images = torch.from_numpy(np.stack(decoded)).permute(0, 3, 1, 2).contiguous()
    return images, [index[name.split("/")[0]] for name in names], classes


@functools.cache
def decode_zip(path: str) -> tuple[torch.Tensor, list[int], list[str]]:
    """Decode every ``<class>/<file>`` image of a zip once per process."""
    with zipfile.ZipFile(path) as zf:
        names = sorted(n for n in zf.namelist() if n.lower().endswith(IMAGE_SUFFIXES))
        return _decode(names, [zf.read(n) for n in names])


@functools.cache
def decode_folder(path: str) -> tuple[torch.Tensor, list[int], list[str]]:
    """Decode every image of an ImageFolder tree ``path/<class>/<file>`` once per process."""
    files = sorted(p for p in Path(path).glob("*/*") if p.suffix.lower() in IMAGE_SUFFIXES)
    return _decode([p.relative_to(path).as_posix() for p in files], [p.read_bytes() for p in files])
