"""Model preparation written once: starting weights, classes, tail, prefix cache."""

from __future__ import annotations

import pytest
import torch

from lance_lib.data import class_subset, get_dataset
from lance_lib.experiments.setup import (
    CIFAR10_LABELS,
    check_classes,
    class_split,
    prepare_finetuning,
    select_tail,
)
from lance_lib.models import build_model, classifier_name
from lance_lib.weights import REFERENCE_RECIPES, ReferenceWeightsError
from tests.fake_weights import write_reference


@pytest.fixture
def reference_dir(tmp_path, monkeypatch):
    directory = tmp_path / "weights"
    monkeypatch.setenv("LANCE_WEIGHTS", str(directory))
    return directory


def test_reference_weights_fix_split_a_and_default_to_split_b(reference_dir, one_thread):
    entry = write_reference(reference_dir, "mcunet")
    before = torch.random.get_rng_state()
    prep = prepare_finetuning("mcunet", dataset="cifar10_mini", layers=2, seed=3, progress=False)
    assert torch.equal(torch.random.get_rng_state(), before)  # caller's stream untouched
    split_a = REFERENCE_RECIPES["mcunet"].classes
    assert prep.classes.pretrain == tuple(split_a)
    assert prep.classes.finetune == tuple(c for c in range(10) if c not in split_a)
    assert prep.resolution == 96 == entry["resolution"]
    assert prep.weights.name == "reference" and prep.weights.sha256 == entry["sha256"]
    # the seed changes neither split A nor the weights, only the new classifier
    other = prepare_finetuning("mcunet", dataset="cifar10_mini", layers=2, seed=4, progress=False)
    assert other.classes == prep.classes and other.weights.sha256 == prep.weights.sha256
    head = classifier_name(prep.model)
    same = {k: v for k, v in prep.model.state_dict().items() if not k.startswith(head)}
    for key, value in same.items():
        torch.testing.assert_close(value, other.model.state_dict()[key])
    assert not torch.equal(
        prep.model.get_submodule(head).weight, other.model.get_submodule(head).weight
    )
    assert prep.model.get_submodule(head).out_features == 5


def test_prepared_tail_trains_only_the_last_convs_and_matches_the_model(reference_dir):
    write_reference(reference_dir, "mcunet")
    prep = prepare_finetuning("mcunet", layers=2, progress=False)
    trainable = {n for n, p in prep.model.named_parameters() if p.requires_grad}
    head = classifier_name(prep.model)
    assert trainable == {f"{n}.weight" for n in prep.layers} | {f"{head}.weight", f"{head}.bias"}
    for name, tail_name in zip(prep.layers, prep.tail_layers, strict=True):
        assert prep.model.get_submodule(name) is prep.tail.get_submodule(tail_name)
    data = class_subset(
        get_dataset("cifar10_mini", "test", resolution=32, augment=False), prep.classes.finetune
    )
    x = torch.stack([data[i][0] for i in range(4)])
    cached = prep.tail_data([(x[i], 0) for i in range(4)], flips=False)
    prep.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(prep.tail(cached.features), prep.model(x))
    unsplit = prepare_finetuning("mcunet", layers=2, split=False, progress=False)
    assert unsplit.prefix is None and unsplit.tail is unsplit.model
    assert unsplit.tail_data(data, flips=True) is data


def test_missing_or_altered_reference_file_names_make_weights(reference_dir):
    with pytest.raises(ReferenceWeightsError, match="make weights"):
        prepare_finetuning("mcunet", progress=False)
    entry = write_reference(reference_dir, "mcunet")
    (reference_dir / entry["file"]).write_bytes(b"not the weights")
    with pytest.raises(ReferenceWeightsError, match="make weights"):
        prepare_finetuning("mcunet", progress=False)


def test_weights_the_model_cannot_use_are_rejected():
    with pytest.raises(ValueError, match="weights='reference' exists for models"):
        class_split("resnet34", "cifar10_mini", "reference")
    with pytest.raises(ValueError, match="weights must be one of"):
        class_split("resnet18", "cifar10_mini", "imagenet")


def test_class_splits_per_kind_of_weights():
    split_a = tuple(REFERENCE_RECIPES["resnet18"].classes)
    for dataset in CIFAR10_LABELS:
        assert class_split("resnet18", dataset, "reference").pretrain == split_a
    # a transfer dataset (other labels) fine-tunes every class
    transfer = class_split("resnet18", "fashionmnist", "reference")
    assert transfer.finetune == tuple(range(10))
    # pretrained-split-A: a fixed split of the fine-tuning dataset itself
    own = class_split("resnet18", "cifar100", "pretrained-split-A")
    assert len(own.pretrain) == len(own.finetune) == 50
    assert not set(own.pretrain) & set(own.finetune)
    assert class_split("resnet18", "cifar10", "pretrained-split-A").pretrain == split_a
    assert class_split("resnet18", "cifar10", None).finetune == tuple(range(10))
    assert class_split("resnet18", "cifar10", None, [7, 2]).finetune == (7, 2)


def test_classes_out_of_range_name_the_argument_and_the_range():
    with pytest.raises(ValueError, match=r"classes \[99\] are outside.*0\.\.9"):
        class_split("resnet18", "cifar10_mini", None, [0, 99])
    with pytest.raises(ValueError, match="distinct"):
        check_classes([1, 1], 10)
    with pytest.raises(TypeError, match="integer labels"):
        check_classes([0, 1.5], 10)
    assert check_classes([3, 1], None) == (3, 1)


def test_select_tail_on_a_loaded_model_for_each_layer_count():
    model = build_model("resnet18", 5)
    for n in (1, 2, 4):
        names, prefix, tail, tail_layers = select_tail(model, n)
        assert len(names) == len(tail_layers) == n
        assert sum(p.requires_grad for p in prefix.parameters()) == 0
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trained == {f"{n}.weight" for n in names} | {"fc.weight", "fc.bias"}
    assert select_tail(model, 4)[0] == (
        "layer4.0.conv2",
        "layer4.0.downsample.0",
        "layer4.1.conv1",
        "layer4.1.conv2",
    )
