"""Dataset registry, the paper's transforms, class splits and seeded loaders.

Every dataset of the paper is reached through :func:`get_dataset`, which uses
torchvision's own dataset classes wherever torchvision has the dataset and small readers
for the others (notMNIST, CUB-200-2011, miniImageNet, any ImageFolder tree). Every
returned dataset yields ``(image, label)`` with ``image`` a normalised ``float32`` tensor
``(3, R, R)`` and ``label`` an ``int``, and exposes ``.targets`` and ``.classes`` so that
class splits never need to load images.

Where the data lives
--------------------
The data root is :func:`data_root`: the ``root`` argument, else ``$LANCE_DATA``, else
``./data`` relative to the current directory. A dataset is looked for first in
torchvision's layout directly under the root (``ROOT/cifar-10-batches-py``,
``ROOT/MNIST/raw``, ...), then in the same layout under a folder named after the
registry name (``ROOT/cifar10/cifar-10-batches-py``, ``ROOT/mnist/MNIST/raw``, ...).
``download=True`` downloads into ``ROOT/<name>/``; nothing is downloaded otherwise, and a
missing dataset raises :class:`DatasetNotFoundError` naming the paths searched and how to
obtain it. The default dataset ``cifar10_mini`` ships with the repository
(``data/cifar10-mini/{train,test}.zip``, see ``data/README.md``) and needs no download.
"""

from __future__ import annotations

import csv
import functools
import io
import os
import zipfile
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets
from torchvision.transforms.v2 import functional as F

__all__ = [
    "DATASETS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DatasetNotFoundError",
    "DatasetSpec",
    "ImageFileDataset",
    "ImageTransform",
    "LabeledSubset",
    "NotMNIST",
    "TensorImageDataset",
    "class_subset",
    "data_root",
    "get_dataset",
    "make_loader",
    "task_splits",
    "train_val_split",
    "two_class_splits",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_SPLITS = ("train", "test")
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_EMBEDDED = Path(__file__).resolve().parents[1] / "data"
_ROOT_RULE = "the data root is the `root` argument, else $LANCE_DATA, else ./data"

Transform = Callable[[Any], torch.Tensor]


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are not under the data root (and ``download`` was not asked)."""


def data_root(root: str | os.PathLike | None = None) -> Path:
    """Return the folder that holds the datasets.

    Parameters
    ----------
    root : str or os.PathLike, optional
        Explicit data root; wins over everything else.

    Returns
    -------
    pathlib.Path
        ``root`` if given, else ``$LANCE_DATA`` if set and non-empty, else ``./data``
        relative to the current working directory.
    """
    if root is None:
        root = os.environ.get("LANCE_DATA") or "data"
    return Path(root).expanduser()


# --------------------------------------------------------------------------- datasets


class ImageTransform:
    """The paper's image transform: resize, random horizontal flip, gray -> RGB, normalise.

    Parameters
    ----------
    resolution : int, optional
        Side of the square output (bilinear, antialiased); None keeps the input size.
    augment : bool
        Flip horizontally with probability 1/2 (drawn from torch's global generator, as
        ``torchvision.transforms.v2.RandomHorizontalFlip`` does).
    gray_to_rgb : bool
        Repeat a 1-channel image to 3 channels.
    crop_padding : int
        With ``augment``, also pad the stored image by this many zero pixels on every
        side and crop a random window of its original size (the usual CIFAR
        pretraining augmentation), before resizing. 0 (the paper's fine-tuning
        pipeline) crops nothing.

    Notes
    -----
    Accepts a PIL image or a ``uint8`` tensor ``(C, H, W)`` and returns ``float32``
    ``(C, R, R)`` normalised with ``IMAGENET_MEAN`` / ``IMAGENET_STD`` (their channel
    mean for an image left 1-channel). It is the per-sample equivalent of the torchvision
    v2 pipeline ``Resize, RandomHorizontalFlip, RGB, ToDtype(scale=True), Normalize``,
    written out because it is about five times faster per sample on CPU.
    """

    def __init__(
        self,
        resolution: int | None,
        augment: bool,
        gray_to_rgb: bool = True,
        crop_padding: int = 0,
    ) -> None:
        if crop_padding < 0:
            raise ValueError(f"crop_padding must be >= 0, got {crop_padding}")
        self.resolution = resolution
        self.augment = augment
        self.gray_to_rgb = gray_to_rgb
        self.crop_padding = crop_padding
        self._stats = {
            3: (
                torch.tensor(IMAGENET_MEAN).view(3, 1, 1),
                torch.tensor(IMAGENET_STD).view(3, 1, 1),
            ),
            1: (
                torch.tensor([sum(IMAGENET_MEAN) / 3]).view(1, 1, 1),
                torch.tensor([sum(IMAGENET_STD) / 3]).view(1, 1, 1),
            ),
        }

    def __call__(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        x = F.to_image(image).as_subclass(torch.Tensor)
        if self.augment and self.crop_padding:
            pad = self.crop_padding
            height, width = x.shape[-2:]
            top, left = torch.randint(0, 2 * pad + 1, (2,)).tolist()
            x = torch.nn.functional.pad(x, (pad, pad, pad, pad))[
                ..., top : top + height, left : left + width
            ]
        size = self.resolution
        if size is not None and tuple(x.shape[-2:]) != (size, size):
            x = F.resize(x, [size, size], antialias=True)
        if self.augment and torch.rand(1) < 0.5:
            x = x.flip(-1)
        if self.gray_to_rgb and x.shape[0] == 1:
            x = x.repeat(3, 1, 1)
        mean, std = self._stats[x.shape[0]]
        return (x.float().div_(255) - mean).div_(std)

    def __repr__(self) -> str:
        return (
            f"ImageTransform(resolution={self.resolution}, augment={self.augment}, "
            f"gray_to_rgb={self.gray_to_rgb}, crop_padding={self.crop_padding})"
        )


class TensorImageDataset(Dataset):
    """Images held in memory as one ``uint8`` tensor ``(N, C, H, W)``.

    Parameters
    ----------
    images : torch.Tensor
        ``uint8`` images ``(N, C, H, W)``; shared, never modified.
    targets : Sequence[int]
        Label of each image.
    classes : Sequence[str]
        Class names, indexed by label.
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
        self.images = images
        self.targets = list(targets)
        self.classes = list(classes)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = self.images[index]
        return (self.transform(image) if self.transform else image), self.targets[index]


class ImageFileDataset(Dataset):
    """Images read lazily from files (as RGB with PIL), for datasets too large to cache.

    Parameters
    ----------
    paths : Sequence[pathlib.Path]
        One image file per sample.
    targets : Sequence[int]
        Label of each image.
    classes : Sequence[str]
        Class names, indexed by label.
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
        self.paths = list(paths)
        self.targets = list(targets)
        self.classes = list(classes)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        with Image.open(self.paths[index]) as img:
            image = img.convert("RGB")
        return (self.transform(image) if self.transform else image), self.targets[index]


class NotMNIST(datasets.MNIST):
    """notMNIST letters A..J in MNIST's idx layout, read from ``ROOT/NotMNIST/raw/``.

    There is no download (``mirrors`` is empty): the files
    ``{train,t10k}-{images-idx3,labels-idx1}-ubyte`` must be built from notMNIST_small.
    """

    mirrors: list[str] = []
    classes = list("ABCDEFGHIJ")


class _SVHN(datasets.SVHN):
    """torchvision's SVHN with ``.targets`` and ``.classes`` (digit 0 has label 0)."""

    classes = [str(d) for d in range(10)]

    @property
    def targets(self) -> list[int]:
        return self.labels.tolist()


class _OxfordIIITPet(datasets.OxfordIIITPet):
    """torchvision's Oxford-IIIT Pet (37 breeds) with ``.targets``."""

    @property
    def targets(self) -> list[int]:
        return self._labels


class _Flowers102(datasets.Flowers102):
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


# ------------------------------------------------------------------ decoding and layout


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
def _decode_zip(path: str) -> tuple[torch.Tensor, list[int], list[str]]:
    """Decode every ``<class>/<file>`` image of a zip once per process."""
    with zipfile.ZipFile(path) as zf:
        names = sorted(n for n in zf.namelist() if n.lower().endswith(_IMAGE_SUFFIXES))
        return _decode(names, [zf.read(n) for n in names])


@functools.cache
def _decode_folder(path: str) -> tuple[torch.Tensor, list[int], list[str]]:
    """Decode every image of an ImageFolder tree ``path/<class>/<file>`` once per process."""
    files = sorted(p for p in Path(path).glob("*/*") if p.suffix.lower() in _IMAGE_SUFFIXES)
    return _decode([p.relative_to(path).as_posix() for p in files], [p.read_bytes() for p in files])


def _candidates(root: Path, name: str, layout: str) -> list[Path]:
    """Where ``layout`` is searched: ``ROOT/<layout>``, then ``ROOT/<name>/<layout>``."""
    return [root / layout, root / name / layout]


def _find(root: Path, name: str, layout: str) -> Path | None:
    """Return the torchvision root (``ROOT`` or ``ROOT/<name>``) holding ``layout``."""
    for base in (root, root / name):
        if (base / layout).exists():
            return base
    return None


def _missing(
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
    lines += [f"Expected files: {spec.layout}", f"Source: {spec.source}", f"Note: {_ROOT_RULE}."]
    return DatasetNotFoundError("\n".join(lines))


# ------------------------------------------------------------------------------ loaders

Loader = Callable[["DatasetSpec", Path, str, bool, Transform], Dataset]


def _torchvision_loader(
    cls: type[Dataset], layout: str, split_kwargs: Callable[[str], dict[str, Any]]
) -> Loader:
    """Loader for a torchvision class whose files sit at ``layout`` (``{split}`` allowed)."""

    def load(
        spec: DatasetSpec, root: Path, split: str, download: bool, transform: Transform
    ) -> Dataset:
        where = layout.format(split=split)
        base = _find(root, spec.name, where)
        if base is None and not download:
            raise _missing(spec, root, split, _candidates(root, spec.name, where))
        return cls(
            base or root / spec.name, transform=transform, download=download, **split_kwargs(split)
        )

    return load


def _train_flag(split: str) -> dict[str, Any]:
    return {"train": split == "train"}


def _split_name(split: str) -> dict[str, Any]:
    return {"split": split}


def _pets_split(split: str) -> dict[str, Any]:
    return {"split": "trainval" if split == "train" else "test"}


def _load_cifar10_mini(
    spec: DatasetSpec, root: Path, split: str, download: bool, transform: Transform
) -> Dataset:
    searched = list(
        dict.fromkeys(
            [root / "cifar10-mini" / f"{split}.zip", _EMBEDDED / "cifar10-mini" / f"{split}.zip"]
        )
    )
    for path in searched:
        if path.is_file():
            return TensorImageDataset(*_decode_zip(str(path.resolve())), transform=transform)
    raise _missing(spec, root, split, searched)


def _load_cifar10(
    spec: DatasetSpec, root: Path, split: str, download: bool, transform: Transform
) -> Dataset:
    base = _find(root, spec.name, "cifar-10-batches-py")
    if base is not None:
        return datasets.CIFAR10(
            base, train=split == "train", transform=transform, download=download
        )
    folder = _find(root, spec.name, f"cifar10/{split}")
    if folder is not None:
        images, targets, classes = _decode_folder(str((folder / "cifar10" / split).resolve()))
        return TensorImageDataset(images, targets, classes, transform=transform)
    if download:
        return datasets.CIFAR10(
            root / spec.name, train=split == "train", transform=transform, download=True
        )
    searched = _candidates(root, spec.name, "cifar-10-batches-py")
    raise _missing(spec, root, split, searched + _candidates(root, spec.name, f"cifar10/{split}"))


def _load_notmnist(
    spec: DatasetSpec, root: Path, split: str, download: bool, transform: Transform
) -> Dataset:
    where = f"NotMNIST/raw/{'train' if split == 'train' else 't10k'}-images-idx3-ubyte"
    base = _find(root, spec.name, where)
    if base is None:
        raise _missing(spec, root, split, _candidates(root, spec.name, where))
    return NotMNIST(base, train=split == "train", transform=transform)


def _load_cub200(
    spec: DatasetSpec, root: Path, split: str, download: bool, transform: Transform
) -> Dataset:
    where = "CUB_200_2011/images.txt"
    base = _find(root, spec.name, where)
    if base is None:
        raise _missing(spec, root, split, _candidates(root, spec.name, where))
    folder = base / "CUB_200_2011"

    def table(name: str) -> dict[str, str]:
        rows = (
            line.split(maxsplit=1)
            for line in (folder / name).read_text().splitlines()
            if line.strip()
        )
        return {key: value.strip() for key, value in rows}

    paths = table("images.txt")
    labels = table("image_class_labels.txt")
    is_train = table("train_test_split.txt")
    classes = [name for _, name in sorted(table("classes.txt").items(), key=lambda kv: int(kv[0]))]
    keep = [i for i in sorted(paths, key=int) if (is_train[i] == "1") == (split == "train")]
    return ImageFileDataset(
        [folder / "images" / paths[i] for i in keep],
        [int(labels[i]) - 1 for i in keep],
        classes,
        transform,
    )


def _load_miniimagenet(
    spec: DatasetSpec, root: Path, split: str, download: bool, transform: Transform
) -> Dataset:
    folder_layout, csv_layout = f"miniimagenet/{split}", "miniimagenet/train.csv"
    base = _find(root, spec.name, folder_layout)
    if base is not None:
        return datasets.ImageFolder(base / folder_layout, transform=transform)
    base = _find(root, spec.name, csv_layout)
    if base is None:
        searched = _candidates(root, spec.name, folder_layout) + _candidates(
            root, spec.name, csv_layout
        )
        raise _missing(spec, root, split, searched)
    folder = base / "miniimagenet"
    per_class: dict[str, list[str]] = defaultdict(list)
    for part in ("train", "val", "test"):
        with open(folder / f"{part}.csv", newline="") as f:
            for row in csv.DictReader(f):
                per_class[row["label"]].append(row["filename"])
    classes = sorted(per_class)
    paths, targets = [], []
    for label, wnid in enumerate(classes):
        files = per_class[wnid][:500] if split == "train" else per_class[wnid][500:]
        paths += [folder / "images" / name for name in files]
        targets += [label] * len(files)
    return ImageFileDataset(paths, targets, classes, transform)


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


_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"

DATASETS: Mapping[str, DatasetSpec] = {
    spec.name: spec
    for spec in [
        DatasetSpec(
            name="cifar10_mini",
            num_classes=10,
            resolution=32,
            downloadable=False,
            layout="cifar10-mini/{train,test}.zip (shipped with the repository under data/; "
            "rebuild with `python data/make_cifar10_mini.py cifar10-jpeg.tar.gz`, see "
            "data/README.md)",
            source=_CIFAR_URL,
            load=_load_cifar10_mini,
        ),
        DatasetSpec(
            name="cifar10",
            num_classes=10,
            resolution=32,
            downloadable=True,
            layout="cifar-10-batches-py/ (the extracted 'CIFAR-10 python version'), or an "
            "ImageFolder tree cifar10/{train,test}/<class>/*.jpg",
            source=_CIFAR_URL,
            load=_load_cifar10,
        ),
        DatasetSpec(
            name="cifar100",
            num_classes=100,
            resolution=32,
            downloadable=True,
            layout="cifar-100-python/ (the extracted 'CIFAR-100 python version')",
            source=_CIFAR_URL,
            load=_torchvision_loader(datasets.CIFAR100, "cifar-100-python", _train_flag),
        ),
        DatasetSpec(
            name="mnist",
            num_classes=10,
            resolution=32,
            downloadable=True,
            layout="MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte",
            source="http://yann.lecun.com/exdb/mnist/ (torchvision mirror "
            "https://ossci-datasets.s3.amazonaws.com/mnist/)",
            load=_torchvision_loader(datasets.MNIST, "MNIST/raw", _train_flag),
        ),
        DatasetSpec(
            name="fashionmnist",
            num_classes=10,
            resolution=32,
            downloadable=True,
            layout="FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte",
            source="https://github.com/zalandoresearch/fashion-mnist",
            load=_torchvision_loader(datasets.FashionMNIST, "FashionMNIST/raw", _train_flag),
        ),
        DatasetSpec(
            name="svhn",
            num_classes=10,
            resolution=32,
            downloadable=True,
            layout="train_32x32.mat and test_32x32.mat (cropped digits, 'Format 2')",
            source="http://ufldl.stanford.edu/housenumbers/",
            load=_torchvision_loader(_SVHN, "{split}_32x32.mat", _split_name),
        ),
        DatasetSpec(
            name="notmnist",
            num_classes=10,
            resolution=32,
            downloadable=False,
            layout="NotMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte: the letters A..J "
            "of notMNIST_small.tar.gz "
            "(http://yaroslavvb.com/upload/notMNIST/notMNIST_small.tar.gz) converted to MNIST "
            "idx files (28x28 uint8 images, labels 0..9 = A..J), read by "
            "lance_lib.data.NotMNIST",
            source="http://yaroslavvb.blogspot.com/2011/09/notmnist-dataset.html",
            load=_load_notmnist,
        ),
        DatasetSpec(
            name="oxford_pets",
            num_classes=37,
            resolution=224,
            downloadable=True,
            layout="oxford-iiit-pet/{images,annotations}/ (images.tar.gz and "
            "annotations.tar.gz extracted)",
            source="https://www.robots.ox.ac.uk/~vgg/data/pets/",
            load=_torchvision_loader(_OxfordIIITPet, "oxford-iiit-pet", _pets_split),
        ),
        DatasetSpec(
            name="flowers102",
            num_classes=102,
            resolution=224,
            downloadable=True,
            layout="flowers-102/{jpg/,imagelabels.mat,setid.mat}",
            source="https://www.robots.ox.ac.uk/~vgg/data/flowers/102/",
            load=_torchvision_loader(_Flowers102, "flowers-102", _split_name),
        ),
        DatasetSpec(
            name="cub200",
            num_classes=200,
            resolution=224,
            downloadable=False,
            layout="CUB_200_2011/{images.txt,image_class_labels.txt,train_test_split.txt,"
            "classes.txt,images/}: download "
            "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz and extract "
            "it into the data root",
            source="https://www.vision.caltech.edu/datasets/cub_200_2011/",
            load=_load_cub200,
        ),
        DatasetSpec(
            name="miniimagenet",
            num_classes=100,
            resolution=84,
            downloadable=False,
            layout="either an ImageFolder tree miniimagenet/{train,test}/<wnid>/*.jpg (100 "
            "classes, 500 train + 100 test images each), or the Ravi & Larochelle release "
            "miniimagenet/{train,val,test}.csv + miniimagenet/images/ (all 100 classes are "
            "used; per class the first 500 CSV rows are train, the other 100 test); the "
            "images come from ImageNet ILSVRC-2012 (https://image-net.org, registration "
            "required)",
            source="Vinyals et al. 2016; split CSVs at "
            "https://github.com/twitter/meta-learning-lstm/tree/master/data/miniImagenet",
            load=_load_miniimagenet,
        ),
    ]
}


# ---------------------------------------------------------------------------- get_dataset


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
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    root_path = data_root(root)
    augment = split == "train" if augment is None else augment
    if name.startswith("imagefolder:"):
        folder = root_path / Path(name.removeprefix("imagefolder:")).expanduser() / split
        if not folder.is_dir():
            raise DatasetNotFoundError(
                f"dataset {name!r} (split {split!r}) not found; searched:\n  {folder}\n"
                f"Expected an ImageFolder tree {folder}/<class>/<image>. Note: {_ROOT_RULE}."
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


# ------------------------------------------------------------------------- class splits


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


# ------------------------------------------------------------------------------ loaders


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    train: bool,
    seed: int = 0,
    drop_last: bool | None = None,
    num_workers: int = 0,
) -> DataLoader:
    """Return a DataLoader whose order is fixed by ``seed``.

    Parameters
    ----------
    dataset : Dataset
        The dataset.
    batch_size : int
        Samples per batch.
    train : bool
        Shuffle (with a ``torch.Generator`` seeded by ``seed``) when True; keep the
        order otherwise.
    seed : int
        Seed of the shuffle (and of the workers' seeds when ``num_workers > 0``).
    drop_last : bool, optional
        Drop the last incomplete batch; default ``train`` (unless the dataset is smaller
        than one batch, which would leave no batch at all).
    num_workers : int
        Worker processes.

    Returns
    -------
    torch.utils.data.DataLoader
        The loader; iterating it twice gives a different order each epoch, the same
        sequence of orders for the same ``seed``.

    Notes
    -----
    With ``num_workers=0`` the random flips draw from torch's global generator, so set
    ``torch.manual_seed`` as well to fix the augmentation.
    """
    if drop_last is None:
        drop_last = train and len(dataset) >= batch_size
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train,
        drop_last=drop_last,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
    )
