"""Phase I of LANCE: one-shot calibration of per-mode activation subspaces.

:func:`calibrate` runs ``N`` calibration mini-batches through a model, collects the
input activation of every chosen Conv2d / Linear layer with forward hooks, folds it
into the running mode covariances of Eq. (2), and truncates each covariance's
eigenbasis by the energy rule of Eq. (3) (Algorithm 1, lines 2-13).  The result is a
:class:`Subspaces` mapping from layer name to :class:`LayerSubspace`.

The result type lives in :mod:`lance_lib.subspaces` and the mode selections in
:mod:`lance_lib.modes`.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from .hosvd import ModeCovariance, check_eps, leading_subspace
from .modes import (
    Modes,
    check_modes,
    feature_mode,
    modes_jsonable,
    resolve_modes,
)
from .subspaces import LayerSubspace, Subspaces
from .validation import check_choice, check_int

__all__ = [
    "calibrate",
    "calibration_batches",
    "check_compressible",
    "check_model_materialised",
    "collect_covariances",
    "resolve_layers",
]

COMPRESSIBLE = (nn.Conv2d, nn.Linear)
#: Rank rules with a continual-learning memory (:func:`lance_lib.hosvd.leading_subspace`).
MEMORY_RULES = ("eq5", "eq3")


def resolve_layers(model: nn.Module, layers: Iterable[str] | str) -> dict[str, nn.Module]:
    """Map layer names to Conv2d / Linear modules of ``model``, with a clear error.

    Raises
    ------
    TypeError
        ``layers`` is neither a name nor an iterable of names.
    ValueError
        ``layers`` is empty.
    KeyError
        If a name is not a module of ``model`` or is not a Conv2d / Linear.
    """
    if isinstance(layers, str):
        names = [layers]
    else:
        try:
            names = list(layers)
        except TypeError:
            raise TypeError(
                f"layers must be a layer name or a list of names (as in "
                f"model.named_modules()), got {layers!r}; e.g. layers=['layer4.1.conv2']"
            ) from None
    if not names:
        raise ValueError(
            "no layers given to calibrate/compress; name at least one Conv2d or Linear "
            "module, e.g. layers=['layer4.1.conv2']"
        )
    modules = dict(model.named_modules())
    out: dict[str, nn.Module] = {}
    for name in names:
        module = modules.get(name) if isinstance(name, str) else None
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


def check_compressible(name: str, module: nn.Module) -> None:
    """Raise if :func:`lance_lib.layers.compress` cannot swap ``module`` for a LANCE layer.

    Called by :func:`calibrate` before any batch runs and by ``compress`` before any
    layer is swapped, so that both reject the same layers, with the same reason.

    Raises
    ------
    ValueError
        A Conv2d whose ``padding_mode`` is not ``"zeros"`` (reflect, replicate and
        circular padding copy input pixels, which the core-only backward of Eq. (4)
        does not model), or whose ``padding`` is a string other than ``"valid"``
        (``"same"`` may pad asymmetrically); the message names the layer and the fix.
    """
    if not isinstance(module, nn.Conv2d):
        return
    if module.padding_mode != "zeros":
        raise ValueError(
            f"layer {name!r}: padding_mode={module.padding_mode!r} is not supported by "
            "LANCE's compressed Conv2d (only zero padding); use padding_mode='zeros' for "
            "this layer, or leave it out of layers"
        )
    if isinstance(module.padding, str) and module.padding != "valid":
        kernel = tuple(module.kernel_size)
        explicit = tuple(d * (k - 1) // 2 for d, k in zip(module.dilation, kernel, strict=True))
        raise ValueError(
            f"layer {name!r}: padding={module.padding!r} is not supported by LANCE's "
            f"compressed Conv2d; give explicit padding (padding={explicit} for its "
            f"{kernel} kernel and odd sizes), or leave the layer out of layers"
        )


def check_model_materialised(model: nn.Module) -> None:
    """Raise if ``model`` holds parameters or buffers without data (``meta``, lazy modules).

    Raises
    ------
    ValueError
        The message names the first such tensor and how to give it data.
    """
    tensors = itertools.chain(model.named_parameters(), model.named_buffers())
    for name, tensor in tensors:
        if isinstance(tensor, nn.parameter.UninitializedTensorMixin):
            raise ValueError(
                f"model has an uninitialised lazy tensor {name!r}; run one forward pass "
                "on a real batch first (or build the model with explicit sizes)"
            )
        if tensor.is_meta:
            raise ValueError(
                f"model tensor {name!r} is on the 'meta' device (a shape without data); "
                "give the model real weights first, e.g. model.to_empty(device='cpu') then "
                "model.load_state_dict(...), or build it on 'cpu' / 'cuda'"
            )


def _default_forward(model: nn.Module, batch: Any) -> Any:
    """``model(batch[0])`` for ``(inputs, targets)`` batches, ``model(batch)`` for tensors."""
    x = batch[0] if isinstance(batch, (list, tuple)) and batch else batch
    if not isinstance(x, torch.Tensor):
        held = type(batch).__name__ + (
            "" if x is batch else f" whose first item is a {type(x).__name__}"
        )
        key = repr(next(iter(batch))) if isinstance(batch, Mapping) and batch else "'image'"
        raise TypeError(
            f"a calibration batch is a {held}; without forward= a batch must be a tensor "
            f"or an (inputs, targets) tuple. Pass forward= to map a batch to the model "
            f"input, e.g. forward=lambda model, batch: model(batch[{key}])"
        )
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return model(x.to(device))


def calibration_batches(loader: Iterable[Any], num_batches: int) -> Iterator[Any]:
    """The first ``num_batches`` items of ``loader``, never touching the next one.

    ``itertools.islice`` asks ``loader``'s iterator for exactly ``num_batches`` items
    (fewer when it runs out), so a loader whose next item blocks, raises or is
    expensive is left alone, and an iterator passed in keeps its remaining items.
    (A ``DataLoader`` with worker processes still prefetches on its own.)

    Raises
    ------
    TypeError
        ``loader`` is not iterable.
    """
    try:
        iterator = iter(loader)
    except TypeError:
        raise TypeError(
            f"loader must be an iterable of batches (a DataLoader, a list or a generator "
            f"of (inputs, targets) tuples or tensors), got {type(loader).__name__}"
        ) from None
    return itertools.islice(iterator, num_batches)


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
    per-module training flags are left as they were.  Exactly ``num_batches`` items
    are taken from ``loader`` (:func:`calibration_batches`), fewer if it runs out.

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
    TypeError
        ``num_batches`` is not an integer; ``loader`` is not iterable; ``forward`` is
        not callable; a batch the default forward cannot run (e.g. a dict: pass
        ``forward=``).
    ValueError
        ``num_batches < 1`` or fractional; a model without data (``meta``); a loader
        that yields no batch; NaN or Inf activations; an unbatched ``(C, H, W)``
        Conv2d input; batches whose shape differs along a calibrated mode (e.g. a
        short last batch while the batch mode is calibrated).
    """
    num_batches = check_int("num_batches", num_batches, minimum=1)
    targets = resolve_layers(model, layers)
    check_modes(modes, list(targets))
    covs, shapes, _ = _accumulate(model, loader, targets, num_batches, modes, forward)
    return covs, shapes


def _check_forward(forward: Any) -> Callable[[nn.Module, Any], Any]:
    if forward is None:
        return _default_forward
    if not callable(forward):
        raise TypeError(
            f"forward must be a function forward(model, batch) that runs one batch, got "
            f"{forward!r}; e.g. forward=lambda model, batch: model(batch['image'])"
        )
    return forward


def _accumulate(
    model: nn.Module,
    loader: Iterable[Any],
    targets: Mapping[str, nn.Module],
    num_batches: int,
    modes: Modes,
    forward: Callable[[nn.Module, Any], Any] | None,
) -> tuple[dict[str, list[ModeCovariance | None]], dict[str, tuple[int, ...]], int]:
    """:func:`collect_covariances` on checked arguments; also the number of batches used."""
    forward = _check_forward(forward)
    check_model_materialised(model)
    batches = calibration_batches(loader, num_batches)
    covs: dict[str, list[ModeCovariance | None]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    batch_index = 0

    def make_hook(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0]
            if isinstance(module, nn.Conv2d) and x.ndim != 4:
                raise ValueError(
                    f"layer {name!r} (Conv2d) received an input of shape {tuple(x.shape)} in "
                    f"calibration batch {batch_index}; LANCE calibrates batched "
                    "(B, C, H, W) inputs (Eq. 1 has a batch mode): add the batch dimension "
                    "(x.unsqueeze(0)) or batch the data with a DataLoader"
                )
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
            for batch in batches:
                forward(model, batch)
                batch_index += 1
    finally:
        for h in handles:
            h.remove()
        for m, flag in flags.items():
            m.training = flag
    if batch_index == 0:
        raise ValueError(
            "the calibration loader yielded no batches; pass a loader with at least one "
            "batch (a DataLoader with drop_last=True and fewer samples than batch_size is "
            "empty)"
        )
    missing = [n for n in targets if n not in covs]
    if missing:
        raise ValueError(
            f"layers {missing} were never called during calibration forward passes; name "
            "layers the forward pass reaches (or pass forward= to run the part of the "
            "model that holds them)"
        )
    if batch_index < num_batches:
        warnings.warn(
            f"calibration loader ran out after {batch_index} of num_batches={num_batches} "
            f"batches; the subspaces record num_batches={batch_index} (the batches used) "
            f"and num_batches_requested={num_batches}",
            stacklevel=3,
        )
    return covs, shapes, batch_index


def _check_memory(memory: Any, targets: Mapping[str, nn.Module]) -> None:
    if memory is None:
        return
    if not isinstance(memory, Mapping):
        raise TypeError(
            f"memory must map layer names to (n, m) orthonormal tensors, got "
            f"{type(memory).__name__}; e.g. memory={{{next(iter(targets))!r}: M}}"
        )
    for name, m in memory.items():
        if not isinstance(m, torch.Tensor) or m.ndim != 2:
            raise TypeError(
                f"memory[{name!r}] must be an (n, m) tensor of orthonormal columns, got "
                f"{type(m).__name__}{'' if not isinstance(m, torch.Tensor) else tuple(m.shape)}"
            )


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
        Any iterable of batches (a ``DataLoader``, a list, a generator, an iterator);
        ``(inputs, targets)`` tuples or bare input tensors, or anything else with
        ``forward``.  Exactly ``num_batches`` items are taken from it (the next item
        is never requested: :func:`calibration_batches`).
    layers
        Names of Conv2d / Linear modules (as in ``model.named_modules()``).  Conv2d
        layers must be ones :func:`lance_lib.layers.compress` accepts
        (:func:`check_compressible`: zero padding, no ``padding='same'``).
    eps
        Energy threshold in (0, 1] (Table 4: 0.7).  ``eps = 1`` keeps every direction.
    num_batches
        ``N``, the number of calibration batches (Table 4: 100); a whole number, at
        least 1.  A loader that runs out first gives fewer (with a warning); the
        number used is ``settings["num_batches"]`` of the result.
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
        ``forward(model, batch)`` runs one batch; default ``model(batch[0])`` for
        tuples and lists, ``model(batch)`` for tensors (on the model's device).

    Returns
    -------
    Subspaces
        Factors, ranks and captured energy per layer, in the order of the input's
        modes (``None`` for uncompressed modes); ``settings`` holds ``eps``,
        ``num_batches`` (used), ``num_batches_requested``, ``modes`` and
        ``memory_rule``.

    Raises
    ------
    TypeError, ValueError, KeyError
        Every argument is checked before the first batch runs (bad ``eps``,
        ``num_batches``, ``memory_rule``, ``memory``, ``forward`` or ``modes``; unknown
        layers; layers ``compress`` would reject; a model on the ``meta`` device); the
        message names the argument, the value and the fix.  Errors found while the
        batches run are those of :func:`collect_covariances`.
    """
    eps = check_eps(eps)
    num_batches = check_int("num_batches", num_batches, minimum=1)
    check_choice("memory_rule", memory_rule, MEMORY_RULES)
    targets = resolve_layers(model, layers)
    for name, module in targets.items():
        check_compressible(name, module)
    check_modes(modes, list(targets))
    _check_memory(memory, targets)
    covs, shapes, used = _accumulate(model, loader, targets, num_batches, modes, forward)
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
            if mem is not None and mem.shape[0] != cov.size:
                raise ValueError(
                    f"memory[{name!r}] has {mem.shape[0]} rows, but the layer's input feature "
                    f"mode {i} has size {cov.size}; pass the memory built for this layer"
                )
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
        "num_batches": used,
        "num_batches_requested": num_batches,
        "modes": modes_jsonable(modes),
        "memory_rule": memory_rule if memory is not None else None,
    }
    return Subspaces(result, settings)
