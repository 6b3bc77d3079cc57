"""LoRAct's sketch: what the reference computes, at the reference's rank, sampled per layer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lance_lib.methods import LoRActLinear, apply_method, loract_rank, qb_sketch, row_sketch

ROWS, COLS, K = 4096, 256, 64


def reference_reconstruction(a: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """LoRAct's randomized QB as its description reads: test matrix "subs", no power step.

    Tall A: sample k columns, Q = orth(A^T A[:, idx]), A ~ A Q Q^T; wide A: transposed.
    """
    m, n = a.shape
    if m > n:
        idx = torch.randperm(n, generator=gen)[:k]
        q, _ = torch.linalg.qr(a.T @ a[:, idx])
        return a @ q @ q.T
    idx = torch.randperm(m, generator=gen)[:k]
    q, _ = torch.linalg.qr(a @ a[idx].T)
    return q @ (q.T @ a)


def old_reconstruction(a: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """The sketch this library used before: Q = orth(k sampled rows of A)."""
    rows = torch.randperm(a.shape[0], generator=gen)[:k]
    q, _ = torch.linalg.qr(a[rows].T)
    return a @ q @ q.T


def one_over_j(gen: torch.Generator) -> torch.Tensor:
    u, _ = torch.linalg.qr(torch.randn(ROWS, COLS, dtype=torch.float64, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(COLS, COLS, dtype=torch.float64, generator=gen))
    return u @ torch.diag(1.0 / torch.arange(1, COLS + 1, dtype=torch.float64)) @ v.T


def relu_low_rank(gen: torch.Generator) -> torch.Tensor:
    low = torch.randn(ROWS, 16, dtype=torch.float64, generator=gen)
    low = low @ torch.randn(16, COLS, dtype=torch.float64, generator=gen)
    return torch.relu(low + 0.5 * torch.randn(ROWS, COLS, dtype=torch.float64, generator=gen))


def relative_error(a: torch.Tensor, approx: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - approx) / torch.linalg.norm(a))


def svd_error(a: torch.Tensor, k: int) -> float:
    s = torch.linalg.svdvals(a)
    return float(s[k:].norm() / s.norm())


@pytest.mark.parametrize("matrix", [one_over_j, relu_low_rank])
def test_sketch_error_matches_the_reference_algorithm(matrix):
    """Within 5% of the reference's error (mean of 8 draws); the old sketch was ~40% worse."""
    a = matrix(torch.Generator().manual_seed(0))
    ours, reference, old = [], [], []
    for seed in range(8):
        left, right = qb_sketch(a, K, torch.Generator().manual_seed(seed))
        ours.append(relative_error(a, left @ right))
        reference.append(
            relative_error(
                a, reference_reconstruction(a, K, torch.Generator().manual_seed(100 + seed))
            )
        )
        old.append(relative_error(a, old_reconstruction(a, K, torch.Generator().manual_seed(seed))))
    mean = {name: sum(v) / len(v) for name, v in (("ours", ours), ("ref", reference), ("old", old))}
    assert mean["ours"] <= 1.05 * mean["ref"]
    assert mean["ours"] >= svd_error(a, K) - 1e-12  # no rank-k sketch beats the truncated SVD
    assert mean["old"] > 1.2 * mean["ref"]  # what the test would have caught


def test_row_sketch_is_the_tall_case_basis():
    gen = torch.Generator().manual_seed(0)
    a = relu_low_rank(gen)[:512, :64]
    q = row_sketch(a, 16, torch.Generator().manual_seed(3))
    assert q.shape == (64, 16)
    torch.testing.assert_close(q.T @ q, torch.eye(16, dtype=q.dtype), atol=1e-10, rtol=0)
    left, right = qb_sketch(a, 16, torch.Generator().manual_seed(3))
    torch.testing.assert_close(left @ right, a @ q @ q.T)
    # wide matrices are sketched on the cheaper side, exactly at full rank
    wide = a[:32]
    left, right = qb_sketch(wide, 64, torch.Generator().manual_seed(0))
    assert left.shape == (32, 32) and right.shape == (32, 64)
    torch.testing.assert_close(left @ right, wide)


@pytest.mark.parametrize(
    ("n", "ratio", "k"), [(100, 0.125, 12), (64, 0.3, 19), (10, 0.05, 1), (8, 1.0, 8)]
)
def test_rank_rounds_down_as_the_reference(n, ratio, k):
    assert loract_rank(n, ratio) == k


def test_layers_of_one_size_sample_independently_and_afresh_each_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32))
    handle = apply_method(model, "loract", ["0", "2"], rank_ratio=0.25, seed=0)
    picked: dict[str, list[torch.Tensor]] = {"0": [], "2": []}
    for name in picked:
        layer = model.get_submodule(name)
        assert isinstance(layer, LoRActLinear)
        state = layer.generator.get_state()
        picked[name].append(torch.randperm(32, generator=layer.generator)[:8])
        layer.generator.set_state(state)
    assert not torch.equal(picked["0"][0], picked["2"][0])  # one seed, two streams
    x = torch.randn(64, 32)
    layer = model.get_submodule("0")
    draws = []
    for _ in range(2):
        state = layer.generator.get_state()
        draws.append(torch.randperm(32, generator=layer.generator)[:8])
        layer.generator.set_state(state)
        F.mse_loss(model(x), torch.zeros(64, 32)).backward()
    assert not torch.equal(draws[0], draws[1])  # the next step samples anew
    handle.restore()


def test_same_seed_reproduces_the_gradients():
    x = torch.randn(64, 32)

    def grad(seed: int) -> torch.Tensor:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(32, 16))
        apply_method(model, "loract", ["0"], rank_ratio=0.25, seed=seed)
        model(x).square().sum().backward()
        return model[0].weight.grad

    torch.testing.assert_close(grad(0), grad(0), rtol=0, atol=0)
    assert not torch.allclose(grad(0), grad(1))
