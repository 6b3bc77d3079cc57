"""GPM baseline: representation matrices, per-layer samples, basis growth, projection."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lance_lib.continual import BENCHMARKS, backbone_layers
from lance_lib.continual.gpm import (
    GPM,
    layer_samples,
    project_gradients,
    representation_matrices,
    update_bases,
)
from lance_lib.continual.specs import REFERENCE_SAMPLES
from lance_lib.models import MultiHead, build_model


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Small models: one thread is as fast."""


def small_model() -> MultiHead:
    torch.manual_seed(0)
    backbone = nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1, bias=False),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 6, bias=False),
        nn.ReLU(),
    )
    return MultiHead(backbone, 6, 2, 2)


def test_conv_patches_use_the_layers_stride_and_padding():
    model = small_model()
    x = torch.randn(3, 2, 5, 5)
    mats = representation_matrices(model, x, ["backbone.0", "backbone.3"], task=0)
    conv = mats["backbone.0"]
    # 5x5 input, kernel 3, stride 2, padding 1 -> 3x3 output positions per sample
    assert conv.shape == (2 * 3 * 3, 3 * 9)
    padded = F.pad(x.double(), (1, 1, 1, 1))
    col = 0
    for b in range(3):
        for i in range(3):
            for j in range(3):
                patch = padded[b, :, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3].reshape(-1)
                assert torch.allclose(conv[:, col], patch)
                col += 1
    feats = torch.relu(model.backbone[0](x)).flatten(1).double()
    assert torch.allclose(mats["backbone.3"], feats.T, atol=1e-6)


def test_basis_growth_follows_the_energy_criterion():
    # R R^T = diag(4, 3, 2, 1) (total 10)
    r = torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64).sqrt())
    bases, added = update_bases({}, {"l": r}, threshold=0.65)
    assert added == {"l": 2}  # 0.4, 0.7 >= 0.65
    e = torch.eye(4, dtype=torch.float64)
    assert torch.allclose(bases["l"].abs(), e[:, :2])
    # second task: the basis explains 0.7; 0.85 needs one more direction (-> 0.9)
    bases2, added2 = update_bases(bases, {"l": r}, threshold=0.85)
    assert added2 == {"l": 1}
    assert torch.equal(bases2["l"][:, :2], bases["l"])
    assert torch.allclose(bases2["l"].abs(), e[:, :3])
    _, added3 = update_bases(bases2, {"l": r}, threshold=0.9)
    assert added3 == {"l": 0}


def test_projected_steps_leave_stored_directions_untouched():
    model = small_model()
    layers = ["backbone.0", "backbone.3"]
    x0 = torch.randn(16, 2, 5, 5)
    gpm = GPM(layers, threshold=0.9, threshold_step=0.0, samples=16)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x0, torch.zeros(16).long()))
    gpm.after_task(model, 0, loader)
    assert all(0 < u.shape[1] < u.shape[0] for u in gpm.bases.values())
    before = {n: m.weight.detach().clone() for n, m in model.named_modules() if n in layers}
    head0 = model.heads[0].weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x1, y1 = torch.randn(16, 2, 5, 5) + 1.0, torch.arange(16) % 2
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x1, 1), y1)
        loss.backward()
        head_grad = model.heads[1].weight.grad.clone()
        gpm.after_backward(model, 1)
        assert torch.equal(model.heads[1].weight.grad, head_grad)  # heads not projected
        opt.step()
    modules = dict(model.named_modules())
    for name in layers:
        dw = (modules[name].weight.detach() - before[name]).reshape(len(before[name]), -1)
        assert dw.abs().max() > 1e-4
        assert (dw.double() @ gpm.bases[name]).abs().max() < 1e-5
    assert torch.equal(model.heads[0].weight, head0)
    report = gpm.report()
    elements = sum(u.numel() for u in gpm.bases.values())
    assert report["memory"]["mb"] == pytest.approx(elements * 4 / 2**20)
    assert report["memory"]["projection_matrices_mb"] == pytest.approx((18**2 + 36**2) * 4 / 2**20)
    assert "definition" in report["memory"]


def test_threshold_schedule_and_no_projection_on_first_task():
    gpm = GPM(["backbone.0"], threshold=0.97, threshold_step=0.003)
    assert gpm.task_threshold(0) == pytest.approx(0.97)
    assert gpm.task_threshold(3) == pytest.approx(0.979)
    assert gpm.task_threshold(100) == 1.0
    model = small_model()
    gpm.bases = {"backbone.0": torch.eye(18, dtype=torch.float64)}
    F.cross_entropy(model(torch.randn(4, 2, 5, 5), 0), torch.zeros(4).long()).backward()
    g = model.backbone[0].weight.grad.clone()
    gpm.after_backward(model, 0)
    assert torch.equal(model.backbone[0].weight.grad, g)
    project_gradients(model, gpm.bases)
    assert model.backbone[0].weight.grad.abs().max() < 1e-6


def test_each_layer_uses_its_own_number_of_the_drawn_samples():
    model = small_model()
    x = torch.randn(5, 2, 5, 5)
    layers = ["backbone.0", "backbone.3"]
    mats = representation_matrices(model, x, layers, 0, {"backbone.0": 2, "backbone.3": 4})
    full = representation_matrices(model, x, layers, 0)
    assert mats["backbone.0"].shape == (18, 2 * 9)  # the first 2 samples' 3x3 patches
    assert torch.equal(mats["backbone.0"], full["backbone.0"][:, : 2 * 9])
    assert torch.equal(mats["backbone.3"], full["backbone.3"][:, :4])
    # a GPM with per-layer counts draws the largest count and records what each used
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randn(30, 2, 5, 5), torch.zeros(30).long())
    )
    gpm = GPM(layers, threshold=0.9, threshold_step=0.0, samples=[3, 7])
    gpm.after_task(model, 0, loader)
    assert gpm.tasks[0]["samples"] == {"backbone.0": 3, "backbone.3": 7}
    assert gpm.bases["backbone.3"].shape[1] <= 7  # at most one direction per sample
    with pytest.raises(ValueError, match="one count per layer"):
        GPM(layers, samples=[3, 7, 9])
    with pytest.raises(ValueError, match="gpm_samples"):
        layer_samples([3, 0], layers)


def test_reference_sample_counts_per_benchmark_and_layer():
    # GPM's code: Split CIFAR-100 AlexNet batch_list = [2*12, 100, 100, 125, 125];
    # 5-Datasets ResNet18 batch_list = [10]*8 + [50]*3 + [100]*6 for the 3x3 convs, each
    # 1x1 shortcut with its block's first conv's count.
    alexnet = backbone_layers(build_model("alexnet_cl", 2, num_tasks=2))
    counts = dict(zip(alexnet, REFERENCE_SAMPLES["alexnet_cl"], strict=True))
    assert counts == {
        "backbone.conv1": 24,
        "backbone.conv2": 100,
        "backbone.conv3": 100,
        "backbone.fc1": 125,
        "backbone.fc2": 125,
    }
    resnet = backbone_layers(build_model("reduced_resnet18_cl", 10, num_tasks=2))
    counts = dict(zip(resnet, REFERENCE_SAMPLES["reduced_resnet18_cl"], strict=True))
    three_by_three = [n for n in resnet if "shortcut" not in n]
    assert [counts[n] for n in three_by_three] == [10] * 8 + [50] * 3 + [100] * 6
    for block, first in [("layer2", 10), ("layer3", 50), ("layer4", 100)]:
        assert counts[f"backbone.{block}.0.shortcut.0"] == counts[f"backbone.{block}.0.conv1"]
        assert counts[f"backbone.{block}.0.shortcut.0"] == first
    for name, model in [
        ("split_cifar100", "alexnet_cl"),
        ("cifar10_mini", "alexnet_cl"),
        ("split_miniimagenet", "reduced_resnet18_cl"),
        ("five_datasets", "reduced_resnet18_cl"),
        ("five_datasets_nosvhn", "reduced_resnet18_cl"),
    ]:
        assert BENCHMARKS[name].gpm_samples == REFERENCE_SAMPLES[model], name
        gpm = GPM.from_spec(BENCHMARKS[name], build_model(model, 2, num_tasks=2), seed=0)
        assert list(gpm.samples.values()) == list(REFERENCE_SAMPLES[model])


def test_projection_matrices_are_the_papers_gpm_memory_convention():
    # Table 3's GPM memory on Split CIFAR-100 (22.27 MB) is the n x n projection
    # matrices U U^T of AlexNet's five layers in float32.
    model = build_model("alexnet_cl", 10, num_tasks=10)
    modules = dict(model.named_modules())
    n = [modules[name].weight[0].numel() for name in backbone_layers(model)]
    assert n == [48, 576, 512, 1024, 2048]
    gpm = GPM(backbone_layers(model))
    gpm.bases = {
        name: torch.zeros(k, 1, dtype=torch.float64) for name, k in zip(gpm.layers, n, strict=True)
    }
    assert gpm.report()["memory"]["projection_matrices_mb"] == pytest.approx(22.27, abs=0.005)
