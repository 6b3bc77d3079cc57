"""Baselines and the method registry: exact gradients at full rank, training, accounting."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lance_lib.data import get_dataset
from lance_lib.methods import (
    METHODS,
    AsiConv2d,
    angle_to_bp,
    apply_method,
    measure_method,
    subspace_iteration_step,
)

LAYERS = ["0", "2", "6"]  # two convs (one strided) and the classifier


def small_cnn(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 12, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(48, 3),
    )


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Real embedded CIFAR-10 images at 12x12, three classes."""
    ds = get_dataset("cifar10_mini", "train", resolution=12, augment=False)
    idx = [i for i, t in enumerate(ds.targets) if t < 3][:24]
    x = torch.stack([ds[i][0] for i in idx])
    y = torch.tensor([ds.targets[i] for i in idx])
    return x, y


def grads(model: nn.Module, fwd: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    for p in model.parameters():
        p.grad = None
    nn.functional.cross_entropy(fwd(x), y).backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("method", ["lance", "hosvd", "asi", "loract", "checkpoint"])
def test_full_rank_gradients_equal_bp(method, batch):
    x, y = batch
    bp_model = small_cnn()
    reference = grads(bp_model, bp_model, x, y)
    model = small_cnn()
    handle = apply_method(
        model, method, LAYERS, calib_loader=[batch], num_batches=1, eps=1.0, rank_ratio=1.0
    )
    for _ in range(2):  # ASI's second step is a warm-started subspace iteration
        got = grads(model, handle.model, x, y)
    for a, b in zip(reference, got, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    handle.restore()
    assert all(type(model.get_submodule(n)) in (nn.Conv2d, nn.Linear) for n in LAYERS)


@pytest.mark.parametrize("method", ["hosvd", "asi", "loract"])
def test_low_rank_methods_approximate_and_store_less(method, batch):
    x, y = batch
    model = small_cnn()
    handle = apply_method(model, method, LAYERS, eps=0.6, rank_ratio=0.25)
    angle = angle_to_bp(handle, batch, [model[0].weight, model[2].weight])
    assert 0.01 < angle < 90.0
    m = measure_method(handle, batch, repeats=1, warmup=0)
    assert m.analytic_mb < m.analytic_bp_mb
    bp = measure_method(apply_method(small_cnn(), "bp", LAYERS), batch, repeats=1, warmup=0)
    assert m.measured_layer_bytes < bp.measured_layer_bytes
    assert m.flops_measured > 0 and len(m.step_s) == 1


@pytest.mark.parametrize("method", METHODS)
def test_each_method_lowers_the_loss(method, batch):
    x, y = batch
    model = small_cnn(1)
    model.requires_grad_(False)
    for n in LAYERS:
        model.get_submodule(n).requires_grad_(True)
    handle = apply_method(model, method, LAYERS, calib_loader=[batch], num_batches=1, eps=0.9)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    with torch.no_grad(), handle.bypassed():
        before = nn.functional.cross_entropy(handle.model(x), y).item()
    for _ in range(15):
        opt.zero_grad()
        nn.functional.cross_entropy(handle.model(x), y).backward()
        opt.step()
    with torch.no_grad(), handle.bypassed():
        after = nn.functional.cross_entropy(handle.model(x), y).item()
    assert after < 0.9 * before


def test_asi_warm_start_keeps_ranks_and_orthonormal_factors(batch):
    x, _ = batch
    conv = small_cnn()[0]
    layer = AsiConv2d(conv, "conv", eps=0.7, first_step="hosvd")
    layer(x).sum().backward()
    ranks = list(layer.ranks)
    first = [u.clone() for u in layer.factors]
    layer(x.flip(-1)).sum().backward()
    assert layer.ranks == ranks
    assert any(not torch.allclose(a, b) for a, b in zip(first, layer.factors, strict=True))
    for u in layer.factors:
        torch.testing.assert_close(u.T @ u, torch.eye(u.shape[1]), atol=1e-5, rtol=0)
    # one step from the exact top subspace stays in it
    u = subspace_iteration_step(x, 1, first[1])
    torch.testing.assert_close(u @ u.T @ first[1], first[1], atol=1e-4, rtol=0)


def test_bad_input_gives_clear_errors():
    with pytest.raises(ValueError, match="unknown method"):
        apply_method(small_cnn(), "sgd", LAYERS)
    with pytest.raises(ValueError, match="calib_loader"):
        apply_method(small_cnn(), "lance", LAYERS)
    with pytest.raises(ValueError, match="rank_ratio"):
        apply_method(small_cnn(), "loract", LAYERS, rank_ratio=0.0)
    with pytest.raises(KeyError):
        apply_method(small_cnn(), "hosvd", ["nope"])


def test_asi_first_step_follows_the_reference_random_range_finder(batch):
    """Default step 1: QR(X_i Omega) with a seeded Gaussian Omega, not the exact subspace."""
    x, _ = batch
    conv = small_cnn()[0]
    random_start = AsiConv2d(conv, "conv", eps=0.7)
    exact_start = AsiConv2d(conv, "conv", eps=0.7, first_step="hosvd")
    for layer in (random_start, exact_start):
        layer(x).sum().backward()
    assert random_start.first_step == "random" and random_start.ranks == exact_start.ranks
    u_random, u_exact = random_start.factors[1], exact_start.factors[1]
    assert not torch.allclose(u_random @ u_random.T, u_exact @ u_exact.T, atol=1e-3)
    again = AsiConv2d(conv, "conv", eps=0.7)
    again(x).sum().backward()
    torch.testing.assert_close(again.factors[1], u_random)  # seeded: reproducible


def tail_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 3),
    )


def test_checkpoint_memory_is_measured_per_segment(batch):
    """Stored = segment inputs; peak = stored + the largest segment's recomputation."""
    layers = ["0", "2", "4", "8"]
    bp = measure_method(apply_method(tail_net(), "bp", layers), batch, repeats=1, warmup=0)
    out = {}
    for segments in (1, 3):
        model = tail_net()
        handle = apply_method(model, "checkpoint", layers, region="whole", segments=segments)
        assert len(handle.model.pieces) == segments
        out[segments] = measure_method(handle, batch, repeats=1, warmup=0)
        handle.restore()
    one, three = out[1], out[3]
    # one segment: the recomputation saves what BP saves inside the region; the loss's
    # tensors and the region's input are kept between the passes
    inputs = batch[0].untyped_storage().nbytes()
    loss = one.stored_between_passes_bytes - inputs
    assert one.recompute_bytes + loss == bp.measured_region_bytes
    assert one.measured_region_bytes == one.recompute_bytes + inputs
    # three segments: three inputs kept, a third of the region rebuilt at a time
    assert three.stored_between_passes_bytes > one.stored_between_passes_bytes
    assert three.recompute_bytes < one.recompute_bytes
    assert three.measured_region_bytes < one.measured_region_bytes
    with pytest.raises(ValueError, match="segments=20 exceeds"):
        apply_method(tail_net(), "checkpoint", layers, region="whole", segments=20)


@pytest.mark.parametrize("method", ["lance", "hosvd", "asi", "loract", "checkpoint"])
def test_methods_train_a_resnet18_step_under_cpu_bf16_autocast(method):
    """Under ``torch.autocast("cpu", bfloat16)`` a step runs and its weight gradient is
    that of float32 within what bf16 costs BP itself on the same step (LANCE: < 5 deg)."""
    from lance_lib.accounting import gradient_angle
    from lance_lib.methods import apply_method
    from lance_lib.models import build_model, last_n_convs

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
    model = build_model("resnet18", 10).eval()
    names = [n for n, _ in last_n_convs(model, 4)] + ["fc"]

    def grads(module: nn.Module, autocast: bool) -> list[torch.Tensor]:
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = nn.functional.cross_entropy(module(x), y)
        loss.backward()
        return [model.get_submodule(n).weight.grad.clone() for n in names]

    bp_angle = gradient_angle(grads(model, False), grads(model, True))
    handle = apply_method(
        model, method, names, calib_loader=[x, x], forward=lambda m, b: m(b), num_batches=2
    )
    reference = grads(handle.model, False)
    low = grads(handle.model, True)
    # ASI warm-starts its subspaces from the last step: float32 drifts between steps too
    drift = gradient_angle(reference, grads(handle.model, False))
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in low)
    angle = gradient_angle(reference, low)
    assert angle <= max(2 * bp_angle, 2 * drift, 5.0)
    if method == "lance":
        assert angle < 5.0
