"""ASI baseline: activation subspace iteration, warm-started from the previous step.

Nguyen et al., "Beyond Low-rank Decomposition: A Shortcut Approach for Efficient
On-Device Learning", ICML 2025 (ref. [30] of LANCE, "ASI" in Table 2 and Fig. 5).
Instead of a full HOSVD at every step, each mode's factor is refined by one step of
subspace (block power) iteration warm-started from the previous step's factor:

``U_i <- QR(X_i X_i^T U_i^prev)``

where ``X_i`` is the mode-``i`` unfolding of the current activation.  The core
``G = X x_1 U_1^T ... x_d U_d^T`` (Eq. 1) is the activation kept for backward and the
weight gradient is that of the reconstruction (Eq. 4), computed by the core's
Functions (:mod:`lance_lib.layers`).

Step 1, and how the ranks are chosen
------------------------------------
The reference code (``Le-TrungNguyen/ICML2025``, ``hosvd_subspace_iteration``) starts
each mode at step 1 from a Gaussian test matrix ``Omega`` (``(prod_{j != i} n_j, r_i)``):
``U_i = QR(X_i Omega)``, a one-pass randomized range finder, and warm-starts from then
on.  That is the default here (``first_step="random"``, ``Omega`` drawn from a
per-layer generator seeded by ``seed`` and the layer name); ``first_step="hosvd"``
starts instead from the exact leading subspace of step 1 (a truncated SVD of each
unfolding).

The reference takes its per-layer, per-mode ranks from an offline search: it measures
each layer's HOSVD "perplexity" at a grid of explained-variance thresholds on
calibration data and picks, by dynamic programming, the ranks that minimise it under a
memory budget.  This implementation has no budget search: the ranks are those of
Eq. (3) at ``eps`` on the first training step's spectrum (one SVD per mode at step 1),
then kept for the rest of training.  The ranks can therefore differ from the
reference's at the same memory; the per-step algorithm after step 1 is the same.

When an input mode changes size (e.g. a different batch size on the batch mode) the
layer starts over (new ranks, new step-1 factors), since the old factor cannot project
the new mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..hosvd import check_eps, unfold
from ..modes import Modes, canonical_modes, check_modes
from ..validation import check_choice, check_int
from .hosvd_step import (
    PerLayerSettings,
    PerStepLayer,
    init_like,
    layer_modes,
    step_factors,
    tucker_elements,
)
from .registry import register_method
from .seeding import layer_generator

__all__ = [
    "FIRST_STEPS",
    "AsiConv2d",
    "AsiLinear",
    "AsiSettings",
    "random_range_finder",
    "subspace_iteration_step",
]

#: How the factors of step 1 are found (see the module notes).
FIRST_STEPS = ("random", "hosvd")


def subspace_iteration_step(x: torch.Tensor, mode: int, u_prev: torch.Tensor) -> torch.Tensor:
    """One warm-started subspace-iteration step ``QR(X_i X_i^T U_prev)`` for one mode.

    Computed as ``X_i (X_i^T U_prev)`` (two thin products, never the ``n_i x n_i`` Gram
    matrix), then a reduced QR.  Returns the new ``(n_i, r_i)`` orthonormal factor.
    """
    with torch.no_grad():
        xi = unfold(x.detach(), mode)
        y = xi @ (xi.T @ u_prev)
        q, _ = torch.linalg.qr(y)
        return q.contiguous()


def random_range_finder(
    x: torch.Tensor, mode: int, rank: int, generator: torch.Generator
) -> torch.Tensor:
    """ASI's step-1 factor: ``QR(X_i Omega)`` with a Gaussian ``Omega`` of ``rank`` columns.

    ``Omega`` is drawn on the CPU from ``generator`` and moved to ``x``'s device.
    Returns an ``(n_i, rank)`` orthonormal factor.
    """
    with torch.no_grad():
        xi = unfold(x.detach(), mode)
        omega = torch.randn(xi.shape[1], rank, generator=generator, dtype=xi.dtype)
        q, _ = torch.linalg.qr(xi @ omega.to(xi.device))
        return q.contiguous()


class _Asi(PerStepLayer):
    """ASI: ranks from the first step at ``eps``, then one subspace iteration per step."""

    def __init__(
        self,
        original: nn.Module,
        name: str = "",
        *,
        eps: float = 0.7,
        modes: Modes = "all",
        first_step: str = "random",
        seed: int = 0,
    ) -> None:
        init_like(self, original, name)
        self.eps = check_eps(eps)
        check_modes(modes, [name])
        self.modes = modes
        self.first_step = check_choice("first_step", first_step, FIRST_STEPS)
        self.generator = layer_generator(seed, name)
        self.ranks: list[int] | None = None
        self._where: list[bool] = []
        self._shape: tuple[int, ...] | None = None

    @property
    def factors(self) -> list[torch.Tensor | None]:
        """The current factors ``U_i`` in mode order (``None`` for uncompressed modes)."""
        return [getattr(self, f"factor_{i}") if w else None for i, w in enumerate(self._where)]

    def _start(self, x: torch.Tensor) -> None:
        """Step 1: ranks at ``eps`` on this step's spectrum, factors per ``first_step``."""
        chosen = layer_modes(self.modes, self, x.ndim, self.layer_name)
        factors, self.ranks = step_factors(x, self.eps, chosen, "svd")
        if self.first_step == "random":
            factors = [
                None if u is None else random_range_finder(x, i, u.shape[1], self.generator)
                for i, u in enumerate(factors)
            ]
        self._shape = tuple(x.shape)
        self._where = [u is not None for u in factors]
        for i, u in enumerate(factors):
            if u is not None:
                self.register_buffer(f"factor_{i}", u, persistent=False)

    def compressed_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._shape != tuple(x.shape):
            self._start(x)
        else:
            # in place: the buffers keep their storage from step to step (an earlier
            # graph still waiting for its backward would raise autograd's in-place error)
            with torch.no_grad():
                for i, u in enumerate(self.factors):
                    if u is not None:
                        u.copy_(subspace_iteration_step(x, i, u))
        return self.lance_call(x, self.factors)

    def stored_elements(self) -> int:
        if self.ranks is None or self._shape is None:
            raise RuntimeError(f"{self.layer_name}: no compressed forward has run yet")
        return tucker_elements(self._shape, self.ranks, self._where)


class AsiConv2d(_Asi, nn.Conv2d):
    """Conv2d with ASI activation compression (warm-started subspace iteration)."""


class AsiLinear(_Asi, nn.Linear):
    """Linear layer with ASI activation compression (warm-started subspace iteration)."""


@register_method("asi")
@dataclass(frozen=True)
class AsiSettings(PerLayerSettings):
    """ASI (ref. [30] of LANCE); see the module notes for step 1 and the ranks.

    Attributes
    ----------
    eps
        Energy threshold of Eq. (3) on the first step's spectrum: fixes the ranks.
    modes
        Compressed modes; default ``"all"``, as the reference decomposes every mode.
    first_step
        ``"random"`` (default, the reference's Gaussian range finder) or ``"hosvd"``
        (the exact leading subspace of step 1).
    seed
        Seed of the step-1 test matrices (combined with each layer's name).
    """

    eps: float = 0.7
    modes: Any = "all"
    first_step: str = "random"
    seed: int = 0

    def validate(self) -> None:
        self._normalise("eps", check_eps(self.eps))
        self._normalise("modes", canonical_modes(self.modes))
        check_choice("first_step", self.first_step, FIRST_STEPS)
        self._normalise("seed", check_int("seed", self.seed, minimum=0))

    def make_layer(self, original: nn.Module, name: str) -> nn.Module:
        cls = AsiConv2d if isinstance(original, nn.Conv2d) else AsiLinear
        return cls(
            original,
            name,
            eps=self.eps,
            modes=self.modes,
            first_step=self.first_step,
            seed=self.seed,
        )
