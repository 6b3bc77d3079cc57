"""Phase I of LANCE: one-shot calibration of per-mode activation subspaces.

:func:`calibrate` runs ``N`` calibration mini-batches through a model, collects the
input activation of every chosen Conv2d / Linear layer with forward hooks, folds it
into the running mode covariances of Eq. (2), and truncates each covariance's
eigenbasis by the energy rule of Eq. (3) (Algorithm 1, lines 2-13).  The result is a
:class:`Subspaces` mapping from layer name to :class:`LayerSubspace`.

Mode order
----------
Factors are listed in the order of the layer input's modes: ``(B, C, H, W)`` for
Conv2d and ``(B, ..., features)`` for Linear.  A mode left uncompressed is given as
``None`` in ``factors`` (the list always has one entry per mode) and its rank is the
mode's full size.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .hosvd import ModeCovariance, check_eps, leading_subspace

__all__ = [
    "MODE_NAMES",
    "LayerSubspace",
    "Modes",
    "Subspaces",
    "calibrate",
    "canonical_modes",
    "check_modes",
    "collect_covariances",
    "feature_mode",
    "modes_jsonable",
    "resolve_layers",
    "resolve_modes",
]

COMPRESSIBLE = (nn.Conv2d, nn.Linear)


@dataclass
class LayerSubspace:
    """Calibrated subspaces of one layer's input.

    Attributes
    ----------
    factors
        One entry per input mode: an ``(n_i, r_i)`` orthonormal factor ``U_i``
        (float64; cast to the layer's dtype by :func:`compress`) or ``None`` for an
        uncompressed mode.
    ranks
        ``r_i`` per mode (``n_i`` for uncompressed modes).
    energy
        Fraction of the mode covariance's energy captured per mode (1.0 when
        uncompressed).
    input_shape
        The input shape ``(n_1, ..., n_d)`` seen during calibration.
    kind
        ``"conv2d"`` or ``"linear"``.
    """

    factors: list[torch.Tensor | None]
    ranks: list[int]
    energy: list[float]
    input_shape: tuple[int, ...]
    kind: str

    @property
    def modes(self) -> list[int]:
        """Indices of the compressed modes."""
        return [i for i, u in enumerate(self.factors) if u is not None]

    def core_shape(self) -> tuple[int, ...]:
        """Shape of the core tensor ``G`` kept for backward, Eq. (1)."""
        return tuple(self.ranks)


@dataclass
class Subspaces(Mapping[str, LayerSubspace]):
    """Calibrated subspaces of several layers, keyed by module name.

    Save with :meth:`save`, load with :meth:`load`.  ``settings`` records how the
    subspaces were calibrated (eps, number of batches, modes).
    """

    layers: dict[str, LayerSubspace]
    settings: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> LayerSubspace:
        return self.layers[name]

    def __iter__(self):
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def save(self, path: str | os.PathLike) -> None:
        """Write all subspaces to one file, atomically (temporary file + rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "format": "lance-subspaces/1",
            "settings": self.settings,
            "layers": {
                name: {
                    "factors": s.factors,
                    "ranks": s.ranks,
                    "energy": s.energy,
                    "input_shape": list(s.input_shape),
                    "kind": s.kind,
                }
                for name, s in self.layers.items()
            },
        }
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        os.close(fd)
        try:
            torch.save(payload, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Subspaces:
        """Read subspaces written by :meth:`save`."""
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if payload.get("format") != "lance-subspaces/1":
            raise ValueError(f"{path} is not a LANCE subspaces file")
        layers = {
            name: LayerSubspace(
                factors=list(d["factors"]),
                ranks=[int(r) for r in d["ranks"]],
                energy=[float(e) for e in d["energy"]],
                input_shape=tuple(d["input_shape"]),
                kind=d["kind"],
            )
            for name, d in payload["layers"].items()
        }
        return cls(layers, payload["settings"])


def feature_mode(module: nn.Module, ndim: int) -> int:
    """Index of the input mode the layer's weights act on (mode ``d`` of Sec. 2.3).

    The input channels (mode 1) for Conv2d, the last mode for Linear.
    """
    return 1 if isinstance(module, nn.Conv2d) else ndim - 1


def resolve_layers(model: nn.Module, layers: Iterable[str] | str) -> dict[str, nn.Module]:
    """Map layer names to Conv2d / Linear modules of ``model``, with a clear error.

    Raises
    ------
    KeyError
        If a name is not a module of ``model`` or is not a Conv2d / Linear.
    """
    names = [layers] if isinstance(layers, str) else list(layers)
    if not names:
        raise ValueError("no layers given to calibrate/compress")
    modules = dict(model.named_modules())
    out: dict[str, nn.Module] = {}
    for name in names:
        module = modules.get(name)
        if module is None or not isinstance(module, COMPRESSIBLE):
            candidates = [n for n, m in modules.items() if isinstance(m, COMPRESSIBLE)]
            why = (
                "is not a module of the model"
                if module is None
                else (f"is a {type(module).__name__}, not a Conv2d or Linear")
            )
            raise KeyError(
                f"layer {name!r} {why}; Conv2d/Linear layers are: "
                + ", ".join(candidates[-12:])
                + (" ..." if len(candidates) > 12 else "")
            )
        out[name] = module
    return out


def _default_forward(model: nn.Module, batch: Any) -> Any:
    x = batch[0] if isinstance(batch, (list, tuple)) else batch
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return model(x.to(device))


Modes = Sequence[int] | Mapping[str, Any] | str | None

#: The named mode selections: ``"all"`` (Eq. 1 as written, every mode), ``"no_batch"``
#: (every mode but the batch mode) and ``"channel"`` (only the mode the weights act on:
#: the channels of a Conv2d input, the last mode of a Linear input; Theorem 1's scope).
MODE_NAMES = ("all", "no_batch", "channel")


def check_modes(modes: Modes, layers: Sequence[str]) -> None:
    """Validate ``modes`` once, before any batch runs, for the layers ``layers``.

    Raises
    ------
    ValueError
        A string that is not one of :data:`MODE_NAMES`, or a per-layer mapping that
        leaves out one of ``layers`` (it would otherwise compress that layer's every
        mode, the batch mode included, without saying so).
    TypeError
        ``modes`` is neither ``None``, a string, a sequence of indices nor a mapping.
    """
    if isinstance(modes, Mapping):
        missing = [name for name in layers if name not in modes]
        if missing:
            raise ValueError(
                f"the modes mapping has no entry for layers {missing}; give every "
                f"calibrated layer its modes, e.g. {{{missing[0]!r}: 'channel'}}, or pass "
                "one setting for all layers (modes='channel', 'no_batch' or 'all')"
            )
        for value in modes.values():
            check_modes(value, ())
        return
    if modes is None:
        return
    if isinstance(modes, str):
        if modes not in MODE_NAMES:
            raise ValueError(
                f"modes={modes!r} is not a mode selection; use one of {MODE_NAMES}, "
                "mode indices or a per-layer mapping"
            )
        return
    if not isinstance(modes, Sequence) or not all(
        isinstance(m, int) and not isinstance(m, bool) for m in modes
    ):
        raise TypeError(
            f"modes must be None, one of {MODE_NAMES}, a sequence of mode indices or a "
            f"per-layer mapping; got {modes!r}"
        )


def canonical_modes(modes: Modes) -> Any:
    """``modes`` checked and in one spelling: ``None`` -> ``"all"``, indices -> a tuple.

    Settings dataclasses store this form, so equal selections give equal results keys.
    """
    check_modes(modes, ())
    if modes is None:
        return "all"
    if isinstance(modes, str):
        return modes
    if isinstance(modes, Mapping):
        return {str(k): canonical_modes(v) for k, v in modes.items()}
    return tuple(int(m) for m in modes)


def modes_jsonable(modes: Modes) -> Any:
    """``modes`` as JSON-ready values (strings and ``None`` as they are, indices as lists)."""
    if modes is None or isinstance(modes, str):
        return modes
    if isinstance(modes, Mapping):
        return {str(k): modes_jsonable(v) for k, v in modes.items()}
    return [int(m) for m in modes]


def resolve_modes(modes: Modes, ndim: int, name: str, feature: int) -> list[int]:
    """Sorted indices of the modes to compress in one layer's ``ndim``-mode input.

    Parameters
    ----------
    modes
        ``None`` / ``"all"`` (every mode), ``"no_batch"`` (every mode but 0),
        ``"channel"`` (``[feature]`` only), indices (negative allowed) or a mapping
        from layer name to any of these.
    ndim
        Number of modes of the layer's input.
    name
        The layer's name (for the mapping and for messages).
    feature
        The mode the layer's weights act on (:func:`feature_mode`).
    """
    if isinstance(modes, Mapping):
        if name not in modes:
            check_modes(modes, [name])
        modes = modes[name]
    check_modes(modes, ())
    if modes is None or modes == "all":
        return list(range(ndim))
    if modes == "no_batch":
        return list(range(1, ndim))
    if modes == "channel":
        return [feature % ndim]
    out = []
    for m in modes:
        if not -ndim <= m < ndim:
            raise ValueError(f"mode {m} does not exist for the {ndim}-mode input of layer {name!r}")
        out.append(m % ndim)
    return sorted(set(out))


def collect_covariances(
    model: nn.Module,
    loader: Iterable[Any],
    layers: Iterable[str] | str,
    num_batches: int = 100,
    modes: Modes = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
) -> tuple[dict[str, list[ModeCovariance | None]], dict[str, tuple[int, ...]]]:
    """Running mode covariances (Eq. 2) of the chosen layers' inputs over ``num_batches``.

    The model runs in eval mode under ``torch.no_grad()``; its parameters, buffers and
    per-module training flags are left as they were.

    Parameters
    ----------
    model, loader, layers, num_batches, modes, forward
        As in :func:`calibrate`.

    Returns
    -------
    covariances, shapes
        Per layer, one :class:`ModeCovariance` per mode (``None`` for modes not in
        ``modes``), and the input shape seen.

    Raises
    ------
    ValueError
        ``num_batches < 1``; a loader that yields no batch; NaN or Inf activations;
        batches whose shape differs along a calibrated mode (e.g. a short last batch
        while the batch mode is calibrated).
    """
    if int(num_batches) < 1:
        raise ValueError(f"num_batches must be at least 1, got {num_batches}")
    targets = resolve_layers(model, layers)
    check_modes(modes, list(targets))
    forward = forward or _default_forward
    covs: dict[str, list[ModeCovariance | None]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    batch_index = 0

    def make_hook(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0]
            if not torch.isfinite(x).all():
                raise ValueError(
                    f"layer {name!r} received NaN or Inf activations in calibration batch "
                    f"{batch_index}; check the input data and the model's weights"
                )
            if name not in covs:
                chosen = resolve_modes(modes, x.ndim, name, feature_mode(module, x.ndim))
                covs[name] = [
                    ModeCovariance(x.shape[i]) if i in chosen else None for i in range(x.ndim)
                ]
                shapes[name] = tuple(x.shape)
            elif x.ndim != len(shapes[name]):
                raise ValueError(f"layer {name!r} saw inputs of different ranks during calibration")
            for i, cov in enumerate(covs[name]):
                if cov is not None:
                    try:
                        cov.update(x, i)
                    except ValueError as err:
                        raise ValueError(
                            f"layer {name!r}, calibration batch {batch_index}: input shape "
                            f"{tuple(x.shape)} differs from the first batch's {shapes[name]} "
                            f"along mode {i}. "
                            + (
                                "The batch mode is calibrated, so every batch must have the "
                                "same size: use drop_last=True in the loader, or calibrate with "
                                "modes that exclude the batch mode (0)."
                                if i == 0
                                else str(err)
                            )
                        ) from None

        return hook

    flags = {m: m.training for m in model.modules()}
    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in targets.items()]
    try:
        model.eval()
        with torch.no_grad():
            for batch in loader:
                if batch_index >= num_batches:
                    break
                forward(model, batch)
                batch_index += 1
    finally:
        for h in handles:
            h.remove()
        for m, flag in flags.items():
            m.training = flag
    if batch_index == 0:
        raise ValueError("the calibration loader yielded no batches")
    missing = [n for n in targets if n not in covs]
    if missing:
        raise ValueError(f"layers {missing} were never called during calibration forward passes")
    if batch_index < num_batches:
        warnings.warn(
            f"calibration loader ran out after {batch_index} of {num_batches} batches",
            stacklevel=2,
        )
    return covs, shapes


def calibrate(
    model: nn.Module,
    loader: Iterable[Any],
    layers: Iterable[str] | str,
    eps: float = 0.7,
    num_batches: int = 100,
    modes: Modes = None,
    *,
    memory: Mapping[str, torch.Tensor] | None = None,
    memory_rule: str = "eq5",
    forward: Callable[[nn.Module, Any], Any] | None = None,
) -> Subspaces:
    """One-shot HOSVD calibration, Phase I of LANCE (Algorithm 1, lines 2-13).

    For every chosen layer and every chosen mode ``i`` of its input, accumulate the
    running covariance ``B_i`` of Eq. (2) over ``num_batches`` batches, eigen-decompose
    it and keep the smallest number of leading eigenvectors whose energy reaches
    ``eps`` (Eq. 3).

    Parameters
    ----------
    model
        The (pretrained) network.  Left unchanged: parameters, buffers and training
        flags are as before the call.  It runs in eval mode during calibration, the
        mode in which fine-tuning keeps its BatchNorm layers.
    loader
        Iterable of batches; ``(inputs, targets)`` tuples or bare input tensors.
    layers
        Names of Conv2d / Linear modules (as in ``model.named_modules()``).
    eps
        Energy threshold in (0, 1] (Table 4: 0.7).  ``eps = 1`` keeps every direction.
    num_batches
        ``N``, the number of calibration batches (Table 4: 100); at least 1.
    modes
        Input modes to compress: indices (negative allowed), e.g. ``(0, 1, 2, 3)`` for
        ``(B, C, H, W)``; ``"all"``; ``"no_batch"`` (every mode but the batch mode, so
        that any batch size can be trained); ``"channel"`` (only the mode the weights
        act on: the weight gradient is then the full gradient times a projector, the
        case Theorem 1 covers, see :mod:`lance_lib.layers`); or a mapping from every
        layer name to one of these (a layer left out raises).  Default ``None`` =
        every mode, the batch mode included, as Eq. (1) is written; the fine-tuning
        harness (:func:`lance_lib.methods.apply_method`) defaults to ``"channel"``.
    memory
        Continual learning (Sec. 2.3): per layer, an orthonormal memory ``M`` of
        feature-mode directions of earlier tasks.  The feature mode (channels for
        Conv2d, last mode for Linear) is then calibrated in the null space of ``M``.
    memory_rule
        Rank rule with a memory, ``"eq5"`` or ``"eq3"``; see
        :func:`lance_lib.hosvd.leading_subspace`.
    forward
        ``forward(model, batch)`` runs one batch; default ``model(batch[0])``.

    Returns
    -------
    Subspaces
        Factors, ranks and captured energy per layer, in the order of the input's
        modes (``None`` for uncompressed modes).
    """
    eps = check_eps(eps)
    covs, shapes = collect_covariances(model, loader, layers, num_batches, modes, forward)
    targets = resolve_layers(model, layers)
    result: dict[str, LayerSubspace] = {}
    for name, mode_covs in covs.items():
        shape = shapes[name]
        dmode = feature_mode(targets[name], len(shape))
        factors: list[torch.Tensor | None] = []
        ranks: list[int] = []
        energy: list[float] = []
        for i, cov in enumerate(mode_covs):
            if cov is None:
                factors.append(None)
                ranks.append(shape[i])
                energy.append(1.0)
                continue
            mem = memory.get(name) if memory is not None and i == dmode else None
            try:
                sub = leading_subspace(cov.cov, eps, mem, memory_rule)
            except ValueError as err:
                raise ValueError(
                    f"layer {name!r}, mode {i}: {err}. Every calibration activation of this "
                    "layer was zero along this mode; calibrate on real data or leave the "
                    "layer out."
                ) from None
            factors.append(sub.basis.contiguous())
            ranks.append(sub.rank)
            energy.append(sub.energy)
        result[name] = LayerSubspace(
            factors=factors,
            ranks=ranks,
            energy=energy,
            input_shape=shape,
            kind="conv2d" if isinstance(targets[name], nn.Conv2d) else "linear",
        )
    settings = {
        "eps": eps,
        "num_batches": int(num_batches),
        "modes": modes_jsonable(modes),
        "memory_rule": memory_rule if memory is not None else None,
    }
    return Subspaces(result, settings)
