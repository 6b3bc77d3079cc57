"""Model builders, layer selection, freezing and prefix/tail splitting."""

import dataclasses

import pytest
import torch
import torchvision
from torch import nn

from lance_lib.models import (
    MCUNET_STAND_IN,
    MODEL_INFO,
    ModelInfo,
    MultiHead,
    alexnet_cl,
    build_model,
    classifier_name,
    freeze_for_finetuning,
    last_n_convs,
    last_n_layers,
    reduced_resnet18_cl,
    register_model,
    replace_classifier,
    set_submodule,
    split_at,
    vit_tiny,
)

SINGLE_TASK = ["resnet18", "resnet34", "mobilenet_v2", "mcunet"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("name", SINGLE_TASK)
def test_single_task_models_run_at_small_input(name):
    model = build_model(name, 7).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_mcunet_stand_in_runs_at_native_resolution_and_says_so():
    model = build_model("mcunet", 5).eval()
    side = MODEL_INFO["mcunet"].native_resolution
    with torch.no_grad():
        assert model(torch.randn(1, 3, side, side)).shape == (1, 5)
    assert model.stand_in == MCUNET_STAND_IN == MODEL_INFO["mcunet"].stand_in
    assert "stand-in" in MODEL_INFO["mcunet"].label
    assert isinstance(model, torchvision.models.MobileNetV2)
    assert model.features[1].conv[0][0].out_channels == 16  # 32 * 0.35 rounded to 8
    with pytest.raises(ValueError):
        build_model("mcunet", 5, weights="IMAGENET1K_V1")


def test_model_info_resolutions():
    for name in ("resnet18", "resnet34", "mobilenet_v2"):
        assert MODEL_INFO[name].native_resolution == 224
        assert MODEL_INFO[name].stand_in is None


def test_every_model_is_registered_where_it_is_defined():
    assert sorted(MODEL_INFO) == sorted(
        SINGLE_TASK + ["alexnet_cl", "reduced_resnet18_cl", "vit_tiny"]
    )
    assert MODEL_INFO["vit_tiny"].builder is vit_tiny
    assert MODEL_INFO["alexnet_cl"].builder is alexnet_cl
    for name, info in MODEL_INFO.items():
        assert isinstance(info, ModelInfo) and info.name == name
        assert info.kind == ("multi_head" if name.endswith("_cl") else "single_task")


def test_model_info_is_frozen_and_the_table_read_only():
    with pytest.raises(dataclasses.FrozenInstanceError):
        MODEL_INFO["resnet18"].native_resolution = 32
    with pytest.raises(TypeError):
        MODEL_INFO["resnet18"] = MODEL_INFO["resnet34"]


def test_register_model_rejects_a_second_builder_of_the_same_name():
    def resnet18(num_classes, *, weights=None):
        return nn.Linear(1, num_classes)

    with pytest.raises(ValueError, match="registered twice"):
        register_model(label="x", native_resolution=32)(resnet18)
    with pytest.raises(ValueError, match="model kind"):
        register_model(label="x", native_resolution=32, kind="tabular")
    assert MODEL_INFO["resnet18"].label == "ResNet18"


def test_multi_head_models_have_no_weights():
    with pytest.raises(ValueError, match="weights=None"):
        build_model("alexnet_cl", 5, num_tasks=2, weights="IMAGENET1K_V1")


def test_weights_are_passed_through_and_classifier_replaced(monkeypatch):
    calls = []
    real_resnet18 = torchvision.models.resnet18

    def fake_resnet18(*, weights, **kwargs):
        calls.append(weights)
        return real_resnet18(weights=None, **kwargs)

    monkeypatch.setattr(torchvision.models, "resnet18", fake_resnet18)
    model = build_model("resnet18", 7, weights="IMAGENET1K_V1")
    assert calls == ["IMAGENET1K_V1"]
    assert model.fc.out_features == 7


def test_unknown_model_name():
    with pytest.raises(KeyError, match="registered models"):
        build_model("vgg16", 10)


def test_alexnet_cl_matches_gpm_layout():
    model = alexnet_cl(num_tasks=3, classes_per_task=10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size[0], c.padding[0]) for c in convs] == [
        (64, 4, 0),
        (128, 3, 0),
        (256, 2, 0),
    ]
    assert all(c.bias is None for c in convs)
    assert model.backbone.fc1.in_features == 256 * 2 * 2
    assert all(
        not bn.track_running_stats for bn in model.modules() if isinstance(bn, nn.BatchNorm1d)
    )
    assert model(torch.randn(4, 3, 32, 32), task=2).shape == (4, 10)


@pytest.mark.parametrize(
    ("first_stride", "side", "feature_dim"), [(1, 32, 20 * 8 * 4), (2, 84, 20 * 8 * 9)]
)
def test_reduced_resnet18_cl_feature_dims(first_stride, side, feature_dim):
    model = reduced_resnet18_cl(num_tasks=2, classes_per_task=5, first_stride=first_stride)
    assert model.feature_dim == feature_dim
    assert model.backbone.conv1.stride == (first_stride, first_stride)
    assert len([m for m in model.modules() if isinstance(m, nn.Conv2d)]) == 20  # 17 + 3 shortcuts
    assert model(torch.randn(2, 3, side, side), task=1).shape == (2, 5)


def test_build_model_builds_continual_models():
    model = build_model("reduced_resnet18_cl", 5, num_tasks=4)
    assert isinstance(model, MultiHead)
    assert (model.num_tasks, model.classes_per_task) == (4, 5)


def test_multihead_routes_to_the_task_head():
    model = MultiHead(nn.Flatten(), feature_dim=4, num_tasks=3, classes_per_task=2)
    with torch.no_grad():
        for task, head in enumerate(model.heads):
            head.weight.fill_(float(task))
    x = torch.ones(5, 1, 2, 2)
    assert torch.equal(model.features(x), torch.ones(5, 4))
    for task in range(3):
        assert torch.equal(model(x, task), torch.full((5, 2), 4.0 * task))
    assert classifier_name(model) == "heads"


def test_last_n_convs_on_resnet18():
    model = torchvision.models.resnet18()
    assert [n for n, _ in last_n_convs(model, 2)] == ["layer4.1.conv1", "layer4.1.conv2"]
    assert [n for n, _ in last_n_convs(model, 4)] == [
        "layer4.0.conv2",
        "layer4.0.downsample.0",
        "layer4.1.conv1",
        "layer4.1.conv2",
    ]
    assert all(isinstance(m, nn.Conv2d) for _, m in last_n_convs(model, 4))
    with pytest.raises(ValueError):
        last_n_convs(model, 100)


def test_last_n_layers_counts_linear_layers():
    model = torchvision.models.resnet18()
    assert [n for n, _ in last_n_layers(model, 2)] == ["layer4.1.conv2", "fc"]


def test_last_n_convs_on_mobilenet_counts_depthwise():
    model = build_model("mobilenet_v2", 10)
    assert [n for n, _ in last_n_convs(model, 4)] == [
        "features.17.conv.0.0",
        "features.17.conv.1.0",
        "features.17.conv.2",
        "features.18.0",
    ]


@pytest.mark.parametrize("train_classifier", [True, False])
def test_freeze_last_two_convs(train_classifier):
    model = torchvision.models.resnet18(num_classes=10)
    names = freeze_for_finetuning(model, 2, train_classifier=train_classifier)
    expected = ["layer4.1.conv1.weight", "layer4.1.conv2.weight"]
    if train_classifier:
        expected += ["fc.weight", "fc.bias"]
    assert names == expected
    assert [n for n, p in model.named_parameters() if p.requires_grad] == expected


def test_freeze_named_modules_and_mobilenet_classifier():
    model = build_model("mcunet", 10)
    names = freeze_for_finetuning(model, ["features.18"])
    assert names == [
        "features.18.0.weight",
        "features.18.1.weight",
        "features.18.1.bias",
        "classifier.1.weight",
        "classifier.1.bias",
    ]
    with pytest.raises(KeyError):
        freeze_for_finetuning(model, ["features.99"])


def test_batchnorm_stays_in_eval_mode():
    model = torchvision.models.resnet18(num_classes=10)
    freeze_for_finetuning(model, 4)
    before = {n: b.clone() for n, b in model.named_buffers()}
    batchnorms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]

    model.train()
    assert model.training and model.layer4.training
    assert not any(bn.training for bn in batchnorms)
    model(torch.randn(4, 3, 32, 32)).sum().backward()

    model.layer4.train()  # bypasses the model-level override; the pre-hook still holds
    model(torch.randn(4, 3, 32, 32))
    assert not any(bn.training for bn in batchnorms)
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, before[name]), name
    assert model.layer1[0].conv1.weight.grad is None
    assert model.layer4[1].conv2.weight.grad is not None


@pytest.mark.parametrize("name", SINGLE_TASK)
def test_replace_classifier(name):
    model = build_model(name, 10)
    replace_classifier(model, 3)
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    if name == "mcunet":
        assert model.stand_in == MCUNET_STAND_IN


@pytest.mark.parametrize(
    ("name", "first_trainable", "prefix_len"),
    [
        ("resnet18", "layer4.0.conv2", 10),
        ("resnet18", "fc", 14),
        ("resnet34", "layer3", 4 + 3 + 4),
        ("mobilenet_v2", "features.17.conv.2", 17),
        ("mcunet", "features.16", 16),
    ],
)
def test_split_at_reproduces_the_model(name, first_trainable, prefix_len):
    model = build_model(name, 10).eval()
    prefix, tail = split_at(model, first_trainable)
    assert len(prefix) == prefix_len
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(tail(prefix(x)), model(x))


def test_split_at_shares_modules_and_rejects_unknown_names():
    model = torchvision.models.resnet18()
    _, tail = split_at(model, "layer4.1.conv1")
    assert tail.layer4_1 is model.layer4[1]
    with pytest.raises(KeyError):
        split_at(model, "layer9")
    with pytest.raises(TypeError):
        split_at(alexnet_cl(1, 2), "backbone.conv1")


def test_set_submodule_replaces_nested_and_top_level_modules():
    model = nn.Sequential(nn.Sequential(nn.Linear(2, 2)), nn.ReLU())
    new = nn.Identity()
    set_submodule(model, "0.0", new)
    assert model[0][0] is new
    set_submodule(model, "1", nn.Tanh())
    assert isinstance(model[1], nn.Tanh)
    with pytest.raises(AttributeError):
        set_submodule(model, "nope.child", new)
