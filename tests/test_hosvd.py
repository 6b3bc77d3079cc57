"""Eq. (2), (3), (5) and the projection of Eq. (1) on hand-made inputs."""

from __future__ import annotations

import pytest
import tensorly as tl
import torch

from lance_lib.hosvd import (
    ModeCovariance,
    cl_energy_rank,
    energy_rank,
    leading_subspace,
    project,
    reconstruct,
    sorted_eigh,
    unfold,
)

from .conftest import random_orthonormal


def test_unfold_matches_tensorly_definition():
    x = torch.arange(24.0).reshape(2, 3, 4)
    u = unfold(x, 1)
    assert u.shape == (3, 8)
    assert torch.equal(u, tl.unfold(x, 1))
    assert torch.equal(u[1], x[:, 1, :].reshape(-1))


def test_running_covariance_is_mean_of_normalised_grams(gen):
    xs = [torch.randn(4, 5, 6, generator=gen) for _ in range(3)]
    cov = ModeCovariance(5)
    for x in xs:
        cov.update(x, 1)
    expected = sum(unfold(x, 1).double() @ unfold(x, 1).double().T / 24 for x in xs) / 3
    assert cov.count == 3
    assert cov.cov.dtype == torch.float64
    torch.testing.assert_close(cov.cov, expected, rtol=1e-12, atol=1e-12)


def test_running_covariance_rejects_shape_change(gen):
    cov = ModeCovariance(4)
    with pytest.raises(ValueError, match="drop_last"):
        cov.update(torch.randn(3, 5, generator=gen), 0)


@pytest.mark.parametrize(
    ("eps", "rank"), [(0.5, 1), (0.6, 2), (0.7, 2), (0.8, 3), (0.9, 3), (0.95, 4), (1.0, 5)]
)
def test_energy_rank_on_hand_made_spectrum(eps, rank):
    # cumulative energy: 0.5, 0.7, 0.9, 1.0, 1.0
    vals = torch.tensor([5.0, 2.0, 2.0, 1.0, 0.0])
    assert energy_rank(vals, eps) == rank


@pytest.mark.parametrize("eps", [0.0, -0.1, 1.01, float("nan")])
def test_energy_rank_rejects_eps_outside_unit_interval(eps):
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        energy_rank(torch.ones(3), eps)


def test_energy_rank_rejects_all_zero_mode():
    with pytest.raises(ValueError, match="zero total energy"):
        energy_rank(torch.zeros(4), 0.7)


def test_cl_energy_rank_eq5_on_hand_made_spectrum():
    sigma = torch.tensor([6.0, 3.0, 1.0])  # total 10
    # part outside the memory: 2 + 1 + 0.5 = 3.5, so the memory explains 6.5
    hat = torch.tensor([2.0, 1.0, 0.5])
    assert cl_energy_rank(sigma, hat, 0.6) == 0  # 6.5/10 >= 0.6 already
    assert cl_energy_rank(sigma, hat, 0.8) == 1  # (10 - 1.5)/10 = 0.85
    assert cl_energy_rank(sigma, hat, 0.9) == 2  # (10 - 0.5)/10 = 0.95
    assert cl_energy_rank(sigma, hat, 0.99) == 3
    assert cl_energy_rank(sigma, hat, 1.0) == 3


def test_sorted_eigh_is_descending_and_sign_fixed(gen):
    a = torch.randn(6, 6, dtype=torch.float64, generator=gen)
    vals, vecs = sorted_eigh(a @ a.T)
    assert torch.all(vals[:-1] >= vals[1:])
    torch.testing.assert_close(vecs @ torch.diag(vals) @ vecs.T, a @ a.T)
    pivots = vecs.abs().argmax(0)
    assert torch.all(vecs[pivots, torch.arange(6)] > 0)


def test_leading_subspace_with_memory_is_orthogonal_to_memory(gen):
    a = torch.randn(8, 20, dtype=torch.float64, generator=gen)
    cov = a @ a.T / 20
    memory = random_orthonormal(8, 3, gen)
    sub = leading_subspace(cov, 0.99, memory, rule="eq3")
    assert sub.rank > 0
    assert (memory.T @ sub.basis).abs().max() < 1e-10
    torch.testing.assert_close(sub.basis.T @ sub.basis, torch.eye(sub.rank, dtype=torch.float64))


def test_leading_subspace_saturated_memory_gives_rank_zero(gen):
    a = torch.randn(5, 20, dtype=torch.float64, generator=gen)
    memory = random_orthonormal(5, 5, gen)  # spans everything
    for rule in ("eq5", "eq3"):
        sub = leading_subspace(a @ a.T, 0.9, memory, rule=rule)
        assert sub.rank == 0 and sub.basis.shape == (5, 0)


def test_project_then_reconstruct_is_orthogonal_projection(gen):
    x = torch.randn(4, 5, 6, dtype=torch.float64, generator=gen)
    factors = [random_orthonormal(4, 2, gen), None, random_orthonormal(6, 3, gen)]
    core = project(x, factors)
    assert core.shape == (2, 5, 3)
    px = reconstruct(core, factors)
    # idempotent and self-adjoint
    torch.testing.assert_close(reconstruct(project(px, factors), factors), px)
    y = torch.randn(4, 5, 6, dtype=torch.float64, generator=gen)
    py = reconstruct(project(y, factors), factors)
    torch.testing.assert_close((px * y).sum(), (x * py).sum())


def test_full_rank_factors_reconstruct_exactly(gen):
    x = torch.randn(3, 4, 5, dtype=torch.float64, generator=gen)
    factors = [random_orthonormal(n, n, gen) for n in x.shape]
    torch.testing.assert_close(reconstruct(project(x, factors), factors), x)
