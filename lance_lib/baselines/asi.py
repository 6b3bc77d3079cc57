"""ASI baseline: activation subspace iteration, warm-started from the previous step.

Nguyen et al., "Beyond Low-rank Decomposition: A Shortcut Approach for Efficient
On-Device Learning", ICML 2025 (ref. [30] of LANCE, "ASI" in Table 2 and Fig. 5).
Instead of a full HOSVD at every step, each mode's factor is refined by one step of
subspace (block power) iteration warm-started from the previous step's factor:

``U_i <- QR(X_i X_i^T U_i^prev)``

where ``X_i`` is the mode-``i`` unfolding of the current activation.  The ranks are
fixed at the first step by a per-step HOSVD at energy ``eps`` (Eq. 3 of LANCE on that
step's spectrum) and kept for the rest of training; the factors are stored per layer
as buffers.  The core ``G = X x_1 U_1^T ... x_d U_d^T`` (Eq. 1) is the activation kept
for backward and the weight gradient is that of the reconstruction (Eq. 4), computed
by the core's Functions (:mod:`lance_lib.layers`).

Notes
-----
Rank choice: the issue allows ranks "fixed from the first step at eps (or from a
memory budget)"; this implementation fixes them from the first step at ``eps``, the
rule ASI itself uses with its explained-variance threshold.  When an input mode
changes size (e.g. a different batch size on the batch mode) the layer starts over
with a fresh HOSVD, since the old factor cannot project the new mode.
"""

from __future__ import annotations

import torch
from torch import nn

from ..hosvd import check_eps, unfold
from .hosvd_step import Modes, PerStepLayer, init_like, step_factors, tucker_elements

__all__ = ["AsiConv2d", "AsiLinear", "subspace_iteration_step"]


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


class _Asi(PerStepLayer):
    """ASI: ranks from the first step's HOSVD, then one subspace iteration per step."""

    def __init__(
        self,
        original: nn.Module,
        name: str = "",
        *,
        eps: float = 0.7,
        modes: Modes = None,
    ) -> None:
        init_like(self, original, name)
        self.eps = check_eps(eps)
        self.modes = modes if modes is None or isinstance(modes, str) else list(modes)
        self.ranks: list[int] | None = None
        self._where: list[bool] = []
        self._shape: tuple[int, ...] | None = None

    @property
    def factors(self) -> list[torch.Tensor | None]:
        """The current factors ``U_i`` in mode order (``None`` for uncompressed modes)."""
        return [getattr(self, f"factor_{i}") if w else None for i, w in enumerate(self._where)]

    def compressed_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._shape != tuple(x.shape):
            factors, self.ranks = step_factors(x, self.eps, self.modes, "svd")
            self._shape = tuple(x.shape)
            self._where = [u is not None for u in factors]
            for i, u in enumerate(factors):
                if u is not None:
                    self.register_buffer(f"factor_{i}", u, persistent=False)
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
