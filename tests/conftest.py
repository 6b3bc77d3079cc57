"""Shared fixtures: small deterministic models and loaders for the core tests."""

from __future__ import annotations

import pytest
import torch


def random_orthonormal(n: int, r: int, generator: torch.Generator) -> torch.Tensor:
    """``(n, r)`` float64 matrix with orthonormal columns."""
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=generator))
    return q[:, :r]


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """Small models run as fast on one thread, and far faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
