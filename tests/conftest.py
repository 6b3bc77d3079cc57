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
