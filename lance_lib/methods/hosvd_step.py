"""Per-step HOSVD baseline: a fresh decomposition of every activation at every step.

The iterative baseline LANCE compares against (Nguyen et al., 2024, ref. [31] of LANCE;
"HOSVD" in Table 2 and Fig. 5): in every training forward pass each mode-``i``
unfolding ``X_i`` of the layer input is decomposed anew, its rank is the smallest
one whose energy reaches ``eps`` on *this step's* spectrum (Eq. 3 of LANCE), and the
core ``G = X x_1 U_1^T ... x_d U_d^T`` (Eq. 1) is the only activation kept for
backward.  The weight gradient is that of the reconstruction (Eq. 4), computed in the
compressed space by the core's autograd Functions
(:func:`lance_lib.layers.lance_conv2d` / :func:`lance_lib.layers.lance_linear`), so
the only difference to LANCE is where the factors come from.

This module also holds :class:`PerStepLayer`, the plumbing that the other per-step
baselines (ASI, LoRAct) build on: a Conv2d / Linear that shares the original module's
``Parameter`` objects and compresses its input only when a weight gradient will be
needed (grad mode on, weight trainable); in evaluation it is the plain layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..hosvd import check_eps, energy_rank, sorted_eigh, unfold
from ..layers import lance_conv2d, lance_linear
from ..models.surgery import set_submodule
from ..modes import Modes, canonical_modes, check_modes, resolve_modes
from ..validation import check_choice
from .registry import Applied, MethodSettings, register_method

__all__ = [
    "SOLVERS",
    "HosvdSettings",
    "HosvdStepConv2d",
    "HosvdStepLinear",
    "PerLayerSettings",
    "PerStepLayer",
    "init_like",
    "layer_modes",
    "mode_subspace",
    "step_factors",
    "tucker_elements",
]

SOLVERS = ("svd", "eigh")

Factors = list[torch.Tensor | None]


def mode_subspace(
    x: torch.Tensor, mode: int, eps: float, solver: str = "svd"
) -> tuple[torch.Tensor, int]:
    """Leading left singular vectors of the mode-``mode`` unfolding of ``x`` at energy ``eps``.

    Parameters
    ----------
    x
        Activation tensor (any dtype; no gradient is tracked).
    mode
        Mode to unfold.
    eps
        Energy threshold of Eq. (3) in (0, 1].
    solver
        ``"svd"``: thin SVD of the unfolding ``X_i`` (as the published per-step HOSVD
        code does; the energies are the squared singular values); ``"eigh"``:
        eigen-decomposition of the Gram matrix ``X_i X_i^T`` in float64 (cheaper, same
        subspace).

    Returns
    -------
    basis, rank
        ``(n_i, r_i)`` orthonormal columns in ``x``'s dtype and ``r_i``.

    Notes
    -----
    The energies ``sigma_j^2`` of ``X_i`` are the eigenvalues of the mode covariance of
    Eq. (2) up to the factor ``1 / prod_{j != i} n_j``, so the rank rule is Eq. (3)
    applied to a single step.  An all-zero unfolding keeps one direction.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    with torch.no_grad():
        xi = unfold(x.detach(), mode)
        if solver == "svd":
            u, s, _ = torch.linalg.svd(xi, full_matrices=False)
            energies = s.to(torch.float64) ** 2
        else:
            energies, u = sorted_eigh(xi.to(torch.float64) @ xi.to(torch.float64).T)
            u = u.to(x.dtype)
        r = energy_rank(energies, eps) if energies.sum() > 0 else 1
        r = min(r, u.shape[1])
        # a copy, so that the kept factor does not hold the whole decomposition's storage
        return u[:, :r].clone(memory_format=torch.contiguous_format), r


def layer_modes(modes: Modes, layer: nn.Module, ndim: int, name: str = "layer") -> set[int]:
    """Mode indices a per-step layer compresses (:func:`lance_lib.modes.resolve_modes`).

    ``"channel"`` is the mode the weights act on: 1 for a Conv2d, the last for a Linear.
    """
    feature = 1 if isinstance(layer, nn.Conv2d) else ndim - 1
    return set(resolve_modes(modes, ndim, name, feature))


def step_factors(
    x: torch.Tensor, eps: float, chosen: Iterable[int], solver: str = "svd"
) -> tuple[Factors, list[int]]:
    """HOSVD of one activation: factors and ranks of the modes ``chosen`` (Eq. 1, 3).

    ``chosen``: mode indices (see :func:`layer_modes`).  Uncompressed modes get
    ``None`` and their full size as rank.
    """
    eps = check_eps(eps)
    chosen = set(chosen)
    factors: Factors = []
    ranks: list[int] = []
    for i in range(x.ndim):
        if i in chosen:
            u, r = mode_subspace(x, i, eps, solver)
            factors.append(u)
            ranks.append(r)
        else:
            factors.append(None)
            ranks.append(x.shape[i])
    return factors, ranks


def tucker_elements(shape: Sequence[int], ranks: Sequence[int], compressed: Sequence[bool]) -> int:
    """Core plus the factors of the compressed modes, Appendix C's ``S_Mem``."""
    stored = [n * r for n, r, c in zip(shape, ranks, compressed, strict=True) if c]
    return math.prod(ranks) + sum(stored)


class PerStepLayer:
    """Mixin for Conv2d / Linear layers that compress their input at every training step.

    Subclasses implement :meth:`compressed_forward` and :meth:`stored_elements`.  The
    layer shares ``weight`` and ``bias`` with the module it replaces (kept, outside the
    module tree, as ``_original``), so optimisers and ``state_dict`` keys are unchanged.
    """

    layer_name: str
    last_input_shape: tuple[int, ...] | None

    def _adopt(self, original: nn.Module, name: str) -> None:
        self.weight = original.weight
        self.bias = original.bias
        self.train(original.training)
        self.layer_name = name
        self.last_input_shape = None
        object.__setattr__(self, "_original", original)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Compressed forward when a weight gradient will be needed, else the plain layer."""
        if not (torch.is_grad_enabled() and self.weight.requires_grad):
            if isinstance(self, nn.Conv2d):
                return self._conv_forward(x, self.weight, self.bias)
            return F.linear(x, self.weight, self.bias)
        self.last_input_shape = tuple(x.shape)
        return self.compressed_forward(x)

    def compressed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Forward pass whose autograd keeps a compressed input."""
        raise NotImplementedError

    def stored_elements(self) -> int:
        """Activation elements the last compressed forward kept for backward."""
        raise NotImplementedError

    def lance_call(self, x: torch.Tensor, factors: Factors) -> torch.Tensor:
        """Run the core's Function (:mod:`lance_lib.layers`) with the given factors."""
        if isinstance(self, nn.Conv2d):
            return lance_conv2d(
                x,
                self.weight,
                self.bias,
                factors,
                self.stride,
                self.padding,
                self.dilation,
                self.groups,
            )
        return lance_linear(x, self.weight, self.bias, factors)


def init_like(layer: nn.Module, original: nn.Module, name: str) -> None:
    """Initialise ``layer`` (a fresh per-step Conv2d / Linear) as a twin of ``original``.

    Raises
    ------
    TypeError
        ``original`` is not of ``layer``'s kind (Conv2d / Linear).
    ValueError
        A Conv2d with non-zero or string padding.
    """
    kind = nn.Conv2d if isinstance(layer, nn.Conv2d) else nn.Linear
    if not isinstance(original, kind):
        raise TypeError(f"{name}: expected a {kind.__name__}, got {type(original).__name__}")
    if kind is nn.Conv2d and (
        original.padding_mode != "zeros" or isinstance(original.padding, str)
    ):
        raise ValueError(f"{name}: only explicit zero padding is supported")
    if kind is nn.Conv2d:
        nn.Conv2d.__init__(
            layer,
            original.in_channels,
            original.out_channels,
            original.kernel_size,
            original.stride,
            original.padding,
            original.dilation,
            original.groups,
            original.bias is not None,
            device="meta",
        )
    else:
        nn.Linear.__init__(
            layer,
            original.in_features,
            original.out_features,
            original.bias is not None,
            device="meta",
        )
    layer._adopt(original, name)


class _HosvdStep(PerStepLayer):
    """Per-step HOSVD: fresh factors and ranks from each step's activation."""

    def __init__(
        self,
        original: nn.Module,
        name: str = "",
        *,
        eps: float = 0.7,
        modes: Modes = "all",
        solver: str = "svd",
    ) -> None:
        init_like(self, original, name)
        self.eps = check_eps(eps)
        check_modes(modes, [name])
        self.modes = modes
        self.solver = check_choice("solver", solver, SOLVERS)
        self.ranks: list[int] | None = None
        self._compressed: list[bool] = []

    def compressed_forward(self, x: torch.Tensor) -> torch.Tensor:
        chosen = layer_modes(self.modes, self, x.ndim, self.layer_name)
        factors, self.ranks = step_factors(x, self.eps, chosen, self.solver)
        self._compressed = [u is not None for u in factors]
        return self.lance_call(x, factors)

    def stored_elements(self) -> int:
        if self.ranks is None or self.last_input_shape is None:
            raise RuntimeError(f"{self.layer_name}: no compressed forward has run yet")
        return tucker_elements(self.last_input_shape, self.ranks, self._compressed)


class HosvdStepConv2d(_HosvdStep, nn.Conv2d):
    """Conv2d with per-step HOSVD activation compression (baseline "HOSVD")."""


class HosvdStepLinear(_HosvdStep, nn.Linear):
    """Linear layer with per-step HOSVD activation compression (baseline "HOSVD")."""


class PerLayerSettings(MethodSettings):
    """Settings of a method that swaps each treated layer for a per-step layer.

    Subclasses implement :meth:`make_layer`; :meth:`apply` swaps every target.
    """

    def make_layer(self, original: nn.Module, name: str) -> nn.Module:
        """The per-step replacement of the Conv2d / Linear ``original`` named ``name``."""
        raise NotImplementedError

    def apply(
        self,
        model: nn.Module,
        targets: Mapping[str, nn.Module],
        *,
        calib_loader: Iterable[Any] | None = None,
        forward: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    ) -> Applied:
        """Swap every target for :meth:`make_layer`'s module (sharing its parameters)."""
        applied = Applied(model)
        for name, module in targets.items():
            new = self.make_layer(module, name)
            set_submodule(model, name, new)
            applied.replacements[name] = new
        return applied


@register_method("hosvd")
@dataclass(frozen=True)
class HosvdSettings(PerLayerSettings):
    """Per-step HOSVD (Nguyen et al., 2024; ref. [31] of LANCE).

    Attributes
    ----------
    eps
        Energy threshold of Eq. (3) applied to each step's spectrum (Table 4: 0.7).
    modes
        Compressed modes; default ``"all"``, as the published per-step HOSVD code
        decomposes every mode of ``(B, C, H, W)``.
    solver
        ``"svd"`` of the unfolding (as the published code) or ``"eigh"`` of its Gram
        matrix (same subspace, cheaper).
    """

    eps: float = 0.7
    modes: Any = "all"
    solver: str = "svd"

    def validate(self) -> None:
        self._normalise("eps", check_eps(self.eps))
        self._normalise("modes", canonical_modes(self.modes))
        check_choice("solver", self.solver, SOLVERS)

    def make_layer(self, original: nn.Module, name: str) -> nn.Module:
        cls = HosvdStepConv2d if isinstance(original, nn.Conv2d) else HosvdStepLinear
        return cls(original, name, eps=self.eps, modes=self.modes, solver=self.solver)
