"""The paper's datasets, each registered with the reader that finds and loads it.

Single-task fine-tuning (Appendix A.1 of LANCE): CIFAR-10, CIFAR-100, Oxford-IIIT Pet,
Flowers-102, CUB-200-2011; continual learning (Appendix A.2): Split CIFAR-100, Split
miniImageNet and 5-Datasets (CIFAR-10, MNIST, SVHN, Fashion-MNIST, notMNIST); and the
embedded ``cifar10_mini`` that ships with the repository.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset
from torchvision import datasets

from lance_lib.data.datasets import (
    Flowers102TrainVal,
    ImageFileDataset,
    LabeledOxfordIIITPet,
    LabeledSVHN,
    NotMNIST,
    TensorImageDataset,
    decode_folder,
    decode_zip,
)
from lance_lib.data.locate import find_base, search_paths
from lance_lib.data.registry import DatasetSpec, Loader, not_found, register_dataset
from lance_lib.data.transforms import Transform
from lance_lib.paths import repo_root

__all__ = ["PAPER_DATASETS"]


def _torchvision_loader(
    cls: type[Dataset], layout: str, split_kwargs: Callable[[str], dict[str, Any]]
) -> Loader:
    """Loader for a torchvision class whose files sit at ``layout`` (``{split}`` allowed)."""

    def load(
        spec: DatasetSpec, root: Path, split: str, download: bool, transform: Transform
    ) -> Dataset:
        where = layout.format(split=split)
        base = find_base(root, spec.name, where)
        if base is None and not download:
            raise not_found(spec, root, split, search_paths(root, spec.name, where))
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
            [
                root / "cifar10-mini" / f"{split}.zip",
                repo_root() / "data" / "cifar10-mini" / f"{split}.zip",
            ]
        )
    )
    for path in searched:
        if path.is_file():
            return TensorImageDataset(*decode_zip(str(path.resolve())), transform=transform)
    raise not_found(spec, root, split, searched)


def _load_cifar10(
    spec: DatasetSpec, root: Path, split: str, download: bool, transform: Transform
) -> Dataset:
    base = find_base(root, spec.name, "cifar-10-batches-py")
    if base is not None:
        return datasets.CIFAR10(
            base, train=split == "train", transform=transform, download=download
        )
    folder = find_base(root, spec.name, f"cifar10/{split}")
    if folder is not None:
        images, targets, classes = decode_folder(str((folder / "cifar10" / split).resolve()))
        return TensorImageDataset(images, targets, classes, transform=transform)
    if download:
        return datasets.CIFAR10(
            root / spec.name, train=split == "train", transform=transform, download=True
        )
    searched = search_paths(root, spec.name, "cifar-10-batches-py")
    raise not_found(spec, root, split, searched + search_paths(root, spec.name, f"cifar10/{split}"))


def _load_notmnist(
    spec: DatasetSpec, root: Path, split: str, download: bool, transform: Transform
) -> Dataset:
    where = f"NotMNIST/raw/{'train' if split == 'train' else 't10k'}-images-idx3-ubyte"
    base = find_base(root, spec.name, where)
    if base is None:
        raise not_found(spec, root, split, search_paths(root, spec.name, where))
    return NotMNIST(base, train=split == "train", transform=transform)


def _load_cub200(
    spec: DatasetSpec, root: Path, split: str, download: bool, transform: Transform
) -> Dataset:
    where = "CUB_200_2011/images.txt"
    base = find_base(root, spec.name, where)
    if base is None:
        raise not_found(spec, root, split, search_paths(root, spec.name, where))
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
    base = find_base(root, spec.name, folder_layout)
    if base is not None:
        return datasets.ImageFolder(base / folder_layout, transform=transform)
    base = find_base(root, spec.name, csv_layout)
    if base is None:
        searched = search_paths(root, spec.name, folder_layout) + search_paths(
            root, spec.name, csv_layout
        )
        raise not_found(spec, root, split, searched)
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


_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"

#: Every dataset this module registers, in the order of the paper's appendices.
PAPER_DATASETS: tuple[DatasetSpec, ...] = (
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
        load=_torchvision_loader(LabeledSVHN, "{split}_32x32.mat", _split_name),
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
        load=_torchvision_loader(LabeledOxfordIIITPet, "oxford-iiit-pet", _pets_split),
    ),
    DatasetSpec(
        name="flowers102",
        num_classes=102,
        resolution=224,
        downloadable=True,
        layout="flowers-102/{jpg/,imagelabels.mat,setid.mat}",
        source="https://www.robots.ox.ac.uk/~vgg/data/flowers/102/",
        load=_torchvision_loader(Flowers102TrainVal, "flowers-102", _split_name),
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
)

for _spec in PAPER_DATASETS:
    register_dataset(_spec)
