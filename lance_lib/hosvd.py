"""Mode unfoldings, running mode covariances and energy ranks of LANCE.

This module holds the tensor algebra of the paper's Phase I (Algorithm 1, lines 2-13):
the mode-i unfolding of an activation tensor, the running mode covariance of
Eq. (2), its eigen-decomposition, the energy rank rule of Eq. (3), the
continual-learning rank rule of Eq. (5), and the multilinear projection of
Eq. (1) with its inverse (the reconstruction used in Eq. (4)).

All tensor algebra goes through TensorLy with the PyTorch backend
(``tl.unfold``, ``tl.tenalg.multi_mode_dot``).  Covariances and
eigen-decompositions are kept in float64.

References
----------
Apolinario & Roy, "LANCE: Low Rank Activation Compression for Efficient
On-Device Continual Learning", arXiv:2509.21617, Sec. 2.2-2.3.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import tensorly as tl
import torch
from tensorly import tenalg

from .validation import check_real

tl.set_backend("pytorch")

__all__ = [
    "ModeCovariance",
    "Subspace",
    "check_eps",
    "cl_energy_rank",
    "energy_rank",
    "leading_subspace",
    "project",
    "reconstruct",
    "sorted_eigh",
    "unfold",
]


def check_eps(eps: float, name: str = "eps") -> float:
    """Return ``eps`` as a float after checking that it lies in (0, 1].

    Parameters
    ----------
    eps
        The energy threshold of Eq. (3) (or Eq. (5) for ``eps_cl``).
    name
        The argument's name, used in the error.

    Raises
    ------
    TypeError
        ``eps`` is not a real number (``None``, a string, a bool); the message names
        ``name`` and a value that works.
    ValueError
        ``eps`` is not a finite number in (0, 1].
    """
    return check_real(
        name,
        eps,
        low=0,
        high=1,
        low_open=True,
        hint=f"it is the fraction of activation energy kept, Eq. (3); e.g. {name}=0.7",
    )


def unfold(x: torch.Tensor, mode: int) -> torch.Tensor:
    """Mode-``mode`` unfolding ``X_i`` of shape ``(n_i, prod_{j != i} n_j)``.

    Thin wrapper around :func:`tensorly.unfold` (PyTorch backend).
    """
    return tl.unfold(x, mode)


class ModeCovariance:
    """Running estimate of one mode covariance, Eq. (2) of LANCE.

    ``B_i[t] = ((t - 1) B_i[t-1] + X_i X_i^T / prod_{j != i} n_j) / t``, with
    ``B_i[0] = 0`` and ``X_i`` the mode-i unfolding of the t-th calibration
    activation.  The estimate is accumulated in float64 whatever the input dtype.

    Parameters
    ----------
    size
        ``n_i``, the size of the mode.
    """

    def __init__(self, size: int) -> None:
        self.size = int(size)
        self.count = 0
        self.cov = torch.zeros(self.size, self.size, dtype=torch.float64)

    def update(self, x: torch.Tensor, mode: int) -> None:
        """Fold one more activation tensor ``x`` into the running mean of Eq. (2)."""
        if x.shape[mode] != self.size:
            raise ValueError(
                f"mode {mode} of the activation has size {x.shape[mode]}, but this covariance "
                f"was started with size {self.size}; calibration batches must share their shape "
                "along every calibrated mode (use drop_last=True in the loader when the batch "
                "mode is calibrated)"
            )
        xi = unfold(x.detach().to(torch.float64), mode)
        gram = (xi @ xi.T).cpu() / xi.shape[1]
        self.count += 1
        self.cov.mul_((self.count - 1) / self.count).add_(gram / self.count)


def sorted_eigh(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition of a symmetric PSD matrix, eigenvalues descending.

    For a symmetric PSD matrix the eigen-decomposition is its SVD
    (``B = U Sigma U^T``, Algorithm 1 line 10).  Computed in float64; tiny negative
    eigenvalues from round-off are clipped to zero.  Signs are fixed so that the
    largest-magnitude entry of every eigenvector is positive, which makes factors
    reproducible across runs and platforms.

    Returns
    -------
    eigenvalues, eigenvectors
        ``(n,)`` descending and ``(n, n)`` with eigenvectors as columns.
    """
    cov = cov.to(torch.float64)
    cov = (cov + cov.T) / 2
    vals, vecs = torch.linalg.eigh(cov)
    vals, vecs = vals.flip(0).clamp_min(0.0), vecs.flip(1)
    pivot = vecs.abs().argmax(dim=0)
    signs = torch.sign(vecs[pivot, torch.arange(vecs.shape[1])])
    signs[signs == 0] = 1.0
    return vals, vecs * signs


def energy_rank(eigenvalues: torch.Tensor, eps: float) -> int:
    """Smallest rank ``r`` whose cumulative energy reaches ``eps``, Eq. (3).

    ``r = min { r : sum_{j<=r} sigma_j / sum_j sigma_j >= eps }`` with ``sigma`` the
    eigenvalues of the mode covariance in descending order.  ``eps = 1`` keeps every
    direction (``r = n``), including directions of zero energy, so that the projection
    is the identity.

    Raises
    ------
    ValueError
        If ``eps`` is outside (0, 1] or the total energy is zero (an all-zero mode: no
        direction carries energy, so no rank reaches any threshold).
    """
    eps = check_eps(eps)
    n = int(eigenvalues.numel())
    if eps == 1.0:
        return n
    vals = eigenvalues.to(torch.float64)
    total = vals.sum()
    if not total > 0:
        raise ValueError("the mode covariance has zero total energy (all-zero activations)")
    ratio = torch.cumsum(vals, 0) / total
    # tolerance for round-off when eps equals an exact cumulative ratio
    return min(n, int(torch.count_nonzero(ratio < eps - 1e-12)) + 1)


def cl_energy_rank(
    eigenvalues: torch.Tensor, projected_eigenvalues: torch.Tensor, eps: float
) -> int:
    """Number of new directions for the continual-learning memory, Eq. (5).

    Eq. (5) of LANCE selects the smallest ``r`` with

    ``(sum_j sigma_j - sum_{j > r} sigma_hat_j) / sum_j sigma_j >= eps``

    where ``sigma`` are the eigenvalues of the task's mode covariance ``B_d`` and
    ``sigma_hat`` those of its part outside the memory, ``B_hat_d``.  The numerator is
    the energy already explained by the memory plus the ``r`` leading new directions.

    Notes
    -----
    The paper prints the discarded sum from ``j = r_d``; we read it as starting after
    the ``r`` retained directions (``j = r + 1``), the reading under which ``r = 0``
    means "the memory already explains ``eps`` of the energy", as in GPM's criterion
    that Eq. (5) follows.  ``r`` may therefore be 0.
    """
    eps = check_eps(eps, "eps_cl")
    total = eigenvalues.to(torch.float64).sum()
    if not total > 0:
        raise ValueError("the mode covariance has zero total energy (all-zero activations)")
    hat = projected_eigenvalues.to(torch.float64)
    if eps == 1.0:
        # keep every direction that carries energy outside the memory
        return int(torch.count_nonzero(hat > 1e-12 * total))
    # tail[r] = sum_{j > r} sigma_hat_j, the energy discarded when keeping r directions
    tail = torch.cat([hat.flip(0).cumsum(0).flip(0), hat.new_zeros(1)])
    ok = (total - tail) / total >= eps - 1e-12
    return int(torch.nonzero(ok)[0])


@dataclass(frozen=True)
class Subspace:
    """Orthonormal leading subspace of one mode.

    Attributes
    ----------
    basis
        ``(n, r)`` orthonormal columns ``U_i`` (float64).
    rank
        ``r``.
    energy
        Fraction of the covariance's energy (trace) captured by ``basis``.
    eigenvalues
        The full descending spectrum the rank was chosen from.
    """

    basis: torch.Tensor
    rank: int
    energy: float
    eigenvalues: torch.Tensor


def leading_subspace(
    cov: torch.Tensor, eps: float, memory: torch.Tensor | None = None, rule: str = "eq5"
) -> Subspace:
    """Truncated eigenbasis of a mode covariance, optionally in the null space of a memory.

    Without ``memory`` this is Algorithm 1 lines 10-11: eigen-decompose ``B_i`` and
    keep the ``r_i`` leading eigenvectors of Eq. (3).

    With ``memory`` ``M`` (orthonormal columns) this is the null-space constrained
    calibration of Sec. 2.3 (Algorithm 1 lines 6-8): the eigenvectors are those of the
    part of ``B`` outside ``span(M)``.  The paper writes ``B_hat = B - B M M^T``; we use
    the symmetric ``B_hat = (I - M M^T) B (I - M M^T)``, which has the same range
    restricted to the complement of ``M`` and whose eigenvectors are orthogonal to
    ``M`` by construction (a non-symmetric ``B_hat`` has no orthonormal eigenbasis).

    Parameters
    ----------
    cov
        Mode covariance ``B_i`` (``(n, n)``, PSD).
    eps
        Energy threshold in (0, 1].
    memory
        Optional ``(n, m)`` orthonormal memory ``M``.
    rule
        Rank rule when ``memory`` is given: ``"eq5"`` (default) counts the energy the
        memory already explains, as Eq. (5) does ("an energy threshold similar to
        Equation (5)", Sec. 2.3), so the rank may be 0 when the memory explains
        ``eps`` of the energy; ``"eq3"`` applies Eq. (3) to ``B_hat``'s spectrum alone
        (always at least one direction while ``B_hat`` is non-zero).
    """
    cov = cov.to(torch.float64)
    vals, vecs = sorted_eigh(cov)
    total = vals.sum()
    if memory is None or memory.shape[1] == 0:
        r = energy_rank(vals, eps)
        basis = vecs[:, :r]
        captured = float(vals[:r].sum() / total) if total > 0 else 1.0
        return Subspace(basis, r, captured, vals)
    if rule not in ("eq5", "eq3"):
        raise ValueError(f"rule must be 'eq5' or 'eq3', got {rule!r}")
    m = memory.to(torch.float64)
    proj = torch.eye(cov.shape[0], dtype=torch.float64) - m @ m.T
    hat_vals, hat_vecs = sorted_eigh(proj @ cov @ proj)
    # Directions of B_hat with (numerically) zero energy are not guaranteed to be
    # orthogonal to M; never keep more than the complement's dimension.
    free = cov.shape[0] - m.shape[1]
    if rule == "eq5":
        r = cl_energy_rank(vals, hat_vals, eps)
    elif hat_vals.sum() > 0:
        r = energy_rank(hat_vals, eps)
    else:
        r = 0
    r = min(r, free)
    basis = hat_vecs[:, :r]
    if r:
        # re-orthogonalise against M to remove round-off leakage
        basis = basis - m @ (m.T @ basis)
        basis, _ = torch.linalg.qr(basis)
    captured = float((basis.T @ cov @ basis).trace() / total) if total > 0 else 0.0
    return Subspace(basis, r, captured, hat_vals)


def project(x: torch.Tensor, factors: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """Core tensor ``G = X x_1 U_1^T ... x_d U_d^T``, Eq. (1).

    ``factors[i]`` is ``U_i`` (``(n_i, r_i)``) or ``None`` for a mode left as it is.
    Uses :func:`tensorly.tenalg.multi_mode_dot` with ``transpose=True``.
    """
    mats, modes = _present(factors, x.ndim)
    if not mats:
        return x
    return tenalg.multi_mode_dot(x, mats, modes=modes, transpose=True)


def reconstruct(core: torch.Tensor, factors: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """Approximation ``X_tilde = G x_1 U_1 ... x_d U_d`` used by Eq. (4)."""
    mats, modes = _present(factors, core.ndim)
    if not mats:
        return core
    return tenalg.multi_mode_dot(core, mats, modes=modes)


def _present(
    factors: Sequence[torch.Tensor | None], ndim: int
) -> tuple[list[torch.Tensor], list[int]]:
    if len(factors) != ndim:
        raise ValueError(
            f"expected {ndim} factors (one per mode, None to skip), got {len(factors)}"
        )
    pairs = [(u, i) for i, u in enumerate(factors) if u is not None]
    return [u for u, _ in pairs], [i for _, i in pairs]
