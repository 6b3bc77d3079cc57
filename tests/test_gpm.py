"""GPM baseline: representation matrices, basis growth, gradient projection."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lance_lib.baselines.gpm import GPM, project_gradients, representation_matrices, update_bases
from lance_lib.models import MultiHead

torch.set_num_threads(1)


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
    gpm = GPM(layers, threshold=0.9, threshold_step=0.0, num_samples=16)
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
