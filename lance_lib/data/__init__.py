"""Data for LANCE experiments: the dataset registry, the paper's transform, class splits.

==============  ==============================================================
``registry``    :class:`DatasetSpec`, :data:`DATASETS`, :func:`get_dataset`
``catalog``     the paper's datasets, each registered with its reader
``locate``      :func:`data_root`, :class:`DatasetNotFoundError`
``datasets``    dataset classes with ``.targets``/``.classes``, image decoders
``transforms``  :class:`ImageTransform` (resize, flip, gray -> RGB, normalise)
``splits``      :func:`class_subset`, :func:`two_class_splits`, :func:`task_splits`, ...
``loaders``     :func:`make_loader` (seeded order)
==============  ==============================================================

Importing the package registers every dataset.
"""

from lance_lib.data import catalog  # noqa: F401  (registers the datasets)
from lance_lib.data.datasets import ImageFileDataset, NotMNIST, TensorImageDataset
from lance_lib.data.loaders import make_loader
from lance_lib.data.locate import DatasetNotFoundError, data_root
from lance_lib.data.registry import DATASETS, DatasetSpec, get_dataset, register_dataset
from lance_lib.data.splits import (
    LabeledSubset,
    class_subset,
    task_splits,
    train_val_split,
    two_class_splits,
)
from lance_lib.data.transforms import IMAGENET_MEAN, IMAGENET_STD, ImageTransform

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
    "register_dataset",
    "task_splits",
    "train_val_split",
    "two_class_splits",
]
