"""Tests of lance_lib.data: embedded dataset, transforms, class splits, loaders, errors."""

from __future__ import annotations

import csv
import dataclasses
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from lance_lib.data import (
    DATASETS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DatasetNotFoundError,
    class_subset,
    data_root,
    get_dataset,
    make_loader,
    register_dataset,
    task_splits,
    train_val_split,
    two_class_splits,
)
from lance_lib.paths import repo_root

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CIFAR10_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]


@pytest.fixture(scope="module")
def mini_train():
    return get_dataset("cifar10_mini", "train")


def _write_images(folder: Path, count: int, color: int, size: int = 8, ext: str = "jpg") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", (size, size), (color, i, 0)).save(folder / f"{i:03d}.{ext}")


# ----------------------------------------------------------------------- embedded set


@pytest.mark.parametrize(("split", "per_class"), [("train", 500), ("test", 100)])
def test_embedded_counts_shapes_labels(split, per_class):
    ds = get_dataset("cifar10_mini", split)
    assert len(ds) == 10 * per_class
    assert ds.classes == CIFAR10_CLASSES
    assert Counter(ds.targets) == {c: per_class for c in range(10)}
    assert ds.images.shape == (10 * per_class, 3, 32, 32) and ds.images.dtype == torch.uint8
    image, label = ds[len(ds) - 1]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert isinstance(label, int) and label == 9
    assert DATASETS["cifar10_mini"].num_classes == 10


def test_embedded_decoded_once_per_process(mini_train):
    again = get_dataset("cifar10_mini", "train", augment=False)
    assert again.images is mini_train.images


def test_normalized_with_imagenet_statistics():
    ds = get_dataset("cifar10_mini", "test")
    x = torch.stack([ds[i][0] for i in range(0, len(ds), 10)])
    assert x.mean().abs() < 0.5 and 0.7 < x.std() < 1.5


# ------------------------------------------------------------------------ transforms


def test_flip_is_seeded_and_only_with_augment(mini_train):
    plain = get_dataset("cifar10_mini", "train", augment=False)
    base = plain[7][0]
    assert not torch.equal(base, base.flip(-1))

    def draws():
        torch.manual_seed(0)
        return [mini_train[7][0] for _ in range(16)]

    first, second = draws(), draws()
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    flipped = [torch.equal(x, base.flip(-1)) for x in first]
    assert all(f or torch.equal(x, base) for x, f in zip(first, flipped, strict=True))
    assert any(flipped) and not all(flipped)
    assert all(torch.equal(plain[7][0], base) for _ in range(16))


def test_augment_defaults_to_train_split():
    test = get_dataset("cifar10_mini", "test")
    plain = get_dataset("cifar10_mini", "test", augment=False)
    torch.manual_seed(0)
    assert all(torch.equal(test[3][0], plain[3][0]) for _ in range(16))


@pytest.mark.parametrize("resolution", [16, 64])
def test_resolution_changes_output_size(resolution):
    image, _ = get_dataset("cifar10_mini", "test", resolution=resolution)[0]
    assert image.shape == (3, resolution, resolution)


# ---------------------------------------------------------------------- class splits


def test_two_class_splits_disjoint_cover_deterministic():
    a, b = two_class_splits(1000, seed=0)
    assert len(a) == len(b) == 500
    assert not set(a) & set(b) and sorted(a + b) == list(range(1000))
    assert (a, b) == two_class_splits(1000, seed=0)
    assert a != two_class_splits(1000, seed=1)[0]
    a, b = two_class_splits(7)
    assert len(a) == 3 and sorted(a + b) == list(range(7))


def test_class_subset_remaps_in_given_order(mini_train):
    sub = class_subset(mini_train, [9, 2])
    assert len(sub) == 1000 and set(sub.targets) == {0, 1}
    assert sub.classes == ["truck", "bird"]
    image, label = sub[0]
    assert image.shape == (3, 32, 32) and label == sub.targets[0]
    kept = class_subset(mini_train, [9, 2], remap=False)
    assert set(kept.targets) == {2, 9} and kept.classes == CIFAR10_CLASSES
    assert kept.indices == sub.indices
    with pytest.raises(ValueError):
        class_subset(mini_train, [1, 1])


def test_task_splits_disjoint_and_relabelled(mini_train):
    tasks = task_splits(mini_train, classes_per_task=2)
    assert len(tasks) == 5
    seen: set[int] = set()
    for t, task in enumerate(tasks):
        assert set(task.targets) == {0, 1}
        assert task.classes == CIFAR10_CLASSES[2 * t : 2 * t + 2]
        assert {mini_train.targets[i] for i in task.indices} == {2 * t, 2 * t + 1}
        assert not seen & set(task.indices)
        seen |= set(task.indices)
    assert len(seen) == len(mini_train)
    ordered = task_splits(mini_train, 3, num_tasks=2, order=[9, 8, 7, 6, 5, 4, 3, 2, 1, 0])
    assert [task.classes[0] for task in ordered] == ["truck", "frog"]
    with pytest.raises(ValueError):
        task_splits(mini_train, 3, num_tasks=4)


def test_train_val_split_deterministic_disjoint_stratified(mini_train):
    train, val = train_val_split(mini_train, 0.05, seed=0)
    assert not set(train.indices) & set(val.indices)
    assert len(train) + len(val) == len(mini_train)
    assert Counter(val.targets) == {c: 25 for c in range(10)}
    assert val.classes == mini_train.classes
    again_train, again_val = train_val_split(mini_train, 0.05, seed=0)
    assert again_val.indices == val.indices and again_train.indices == train.indices
    assert train_val_split(mini_train, 0.05, seed=1)[1].indices != val.indices
    task = task_splits(train, classes_per_task=5)[1]
    assert set(task.targets) == set(range(5)) and len(task) == 5 * 475


# --------------------------------------------------------------------------- loaders


def test_make_loader_order_fixed_by_seed(mini_train):
    def first_labels(seed):
        return next(iter(make_loader(mini_train, 64, train=True, seed=seed)))[1]

    assert torch.equal(first_labels(0), first_labels(0))
    assert not torch.equal(first_labels(0), first_labels(1))
    images, labels = next(iter(make_loader(mini_train, 64, train=False)))
    assert images.shape == (64, 3, 32, 32) and labels.tolist() == [0] * 64
    assert len(make_loader(mini_train, 3000, train=True)) == 1
    assert len(make_loader(mini_train, 3000, train=False)) == 2


# ------------------------------------------------------------ data root and errors


@pytest.mark.parametrize("name", ["cifar100", "cub200", "miniimagenet"])
def test_missing_dataset_error_names_dataset_path_and_fix(tmp_path, name):
    with pytest.raises(DatasetNotFoundError) as info:
        get_dataset(name, "train", root=tmp_path)
    assert isinstance(info.value, FileNotFoundError)
    message = str(info.value)
    assert repr(name) in message and str(tmp_path) in message
    assert "download=True" in message and "https://" in message


def test_lance_data_env_is_honoured(tmp_path, monkeypatch):
    monkeypatch.setenv("LANCE_DATA", str(tmp_path))
    assert data_root() == tmp_path
    assert data_root(tmp_path / "explicit") == tmp_path / "explicit"
    with pytest.raises(DatasetNotFoundError, match=str(tmp_path)):
        get_dataset("cifar100")
    monkeypatch.delenv("LANCE_DATA")
    assert data_root() == repo_root() / "data"


def test_default_data_root_is_the_repository_data_folder_whatever_the_cwd(tmp_path, monkeypatch):
    monkeypatch.delenv("LANCE_DATA", raising=False)
    monkeypatch.chdir(tmp_path)  # as a notebook run from notebooks/ would
    assert data_root() == repo_root() / "data"
    assert (data_root() / "cifar10-mini" / "train.zip").is_file()


def test_the_registry_is_read_only_and_names_are_unique():
    with pytest.raises(TypeError):
        DATASETS["mine"] = DATASETS["cifar10"]
    with pytest.raises(ValueError, match="taken"):
        register_dataset(DATASETS["cifar10"])
    with pytest.raises(ValueError, match="taken"):
        register_dataset(dataclasses.replace(DATASETS["cifar10"], name="imagefolder:x"))


def test_bad_name_and_split():
    with pytest.raises(ValueError, match="unknown dataset"):
        get_dataset("cifar11")
    with pytest.raises(ValueError, match="split"):
        get_dataset("cifar10_mini", "val")


# ----------------------------------------------------------- small on-disk layouts


def test_cifar10_imagefolder_fallback(tmp_path):
    for split in ("train", "test"):
        for label, cls in enumerate(CIFAR10_CLASSES[:3]):
            _write_images(tmp_path / "cifar10" / "cifar10" / split / cls, 2, 40 * label, size=32)
    ds = get_dataset("cifar10", "test", root=tmp_path)
    assert len(ds) == 6 and ds.classes == CIFAR10_CLASSES[:3] and ds.targets == [0, 0, 1, 1, 2, 2]
    assert ds[0][0].shape == (3, 32, 32)


def test_cub200_official_layout(tmp_path):
    base = tmp_path / "CUB_200_2011"
    rows = [(1, "001.A/a1.jpg", 1, 1), (2, "001.A/a2.jpg", 1, 0), (3, "002.B/b1.jpg", 2, 1)]
    for _, rel, _, _ in rows:
        (base / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (10, 6), 50).save(base / "images" / rel)
    (base / "images.txt").write_text("".join(f"{i} {rel}\n" for i, rel, _, _ in rows))
    (base / "image_class_labels.txt").write_text("".join(f"{i} {c}\n" for i, _, c, _ in rows))
    (base / "train_test_split.txt").write_text("".join(f"{i} {t}\n" for i, _, _, t in rows))
    (base / "classes.txt").write_text("1 001.A\n2 002.B\n")
    train = get_dataset("cub200", "train", root=tmp_path)
    assert train.targets == [0, 1] and train.classes == ["001.A", "002.B"]
    assert train[0][0].shape == (3, 224, 224)
    test = get_dataset("cub200", "test", root=tmp_path, resolution=32)
    assert test.targets == [0] and test[0][0].shape == (3, 32, 32)


def test_miniimagenet_csv_layout(tmp_path):
    folder = tmp_path / "miniimagenet"
    for part, wnid in [("train", "n01"), ("val", "n02"), ("test", "n03")]:
        names = [f"{wnid}{i:08d}.jpg" for i in range(502)]
        (folder / "images").mkdir(parents=True, exist_ok=True)
        for name in names[:2] + names[500:]:
            Image.new("RGB", (8, 8)).save(folder / "images" / name)
        with open(folder / f"{part}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["filename", "label"])
            writer.writerows([name, wnid] for name in names)
    test = get_dataset("miniimagenet", "test", root=tmp_path)
    assert test.classes == ["n01", "n02", "n03"] and test.targets == [0, 0, 1, 1, 2, 2]
    assert test[5][0].shape == (3, 84, 84)
    train = get_dataset("miniimagenet", "train", root=tmp_path)
    assert len(train) == 1500 and train[0][0].shape == (3, 84, 84)


def test_imagefolder_prefix(tmp_path):
    for split in ("train", "test"):
        _write_images(tmp_path / "tree" / split / "cat", 2, 10, ext="png")
        _write_images(tmp_path / "tree" / split / "dog", 3, 200, ext="png")
    ds = get_dataset("imagefolder:tree", "train", root=tmp_path)
    assert ds.classes == ["cat", "dog"] and ds.targets == [0, 0, 1, 1, 1]
    assert ds[0][0].shape == (3, 8, 8)
    absolute = get_dataset(f"imagefolder:{tmp_path / 'tree'}", "test", resolution=16)
    assert absolute[4][0].shape == (3, 16, 16)
    with pytest.raises(DatasetNotFoundError, match="missing"):
        get_dataset("imagefolder:missing", root=tmp_path)


# ------------------------------------------------------ local copies of real datasets


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="no shared data folder beside the clone")
def test_real_mnist_and_notmnist_from_shared_folder(monkeypatch):
    monkeypatch.setenv("LANCE_DATA", str(SHARED_DATA))
    mnist = get_dataset("mnist", "test")
    assert len(mnist) == 10_000 and len(mnist.classes) == 10
    image, label = mnist[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and 0 <= label < 10
    std, mean = torch.tensor(IMAGENET_STD).view(3, 1, 1), torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    pixels = image * std + mean
    assert torch.allclose(pixels[0], pixels[2], atol=1e-6)
    notmnist = get_dataset("notmnist", "train", gray_to_rgb=False)
    assert notmnist.classes == list("ABCDEFGHIJ")
    assert notmnist[0][0].shape == (1, 32, 32)
    assert set(notmnist.targets.tolist()) == set(range(10))
