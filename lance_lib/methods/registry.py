"""The one method table and the registry that fills it by decorator.

:data:`METHOD_TABLE` holds the display information of every method any table or figure
shows (a :class:`MethodInfo`: name, label, colour, the paper's name, kind, one-line
description), so that plots, tables and notebooks label and colour a method the same
way everywhere.  It lists more than the registered methods: the continual-learning
strategies are display entries whose implementations live in
:mod:`lance_lib.continual`.

The methods register where they are defined, as timm's ``@register_model`` does for
models, the layer methods and the transformer-block methods
(:mod:`lance_lib.methods.loract_prenorm`) alike::

    @register_method("lance")
    @dataclass(frozen=True)
    class LanceSettings(MethodSettings):
        eps: float = 0.7
        ...

A method is its frozen settings dataclass (validated once, at construction) whose
:meth:`MethodSettings.apply` prepares a model and describes what it did
(:class:`Applied`: the modules it swapped, the wrapper to train, how to switch it off
for a plain-BP pass, what it recomputes during backward);
:func:`lance_lib.methods.apply_method` looks the class up by name and the harness reads
that description, so nothing dispatches with ``if``/``elif`` on names or asks which
method it holds.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from ..io import jsonable

__all__ = [
    "METHOD_KINDS",
    "METHOD_TABLE",
    "Applied",
    "MethodInfo",
    "MethodSettings",
    "Recomputation",
    "method_color",
    "method_info",
    "method_label",
    "register_method",
    "registered_methods",
    "settings_class",
    "settings_from_options",
]


@dataclass(frozen=True)
class MethodInfo:
    """How a method is named and drawn.

    Attributes
    ----------
    name
        The key used in code, settings and results files (``"lance"``).
    label
        The display name in tables and legends (``"LANCE"``).
    color
        Its colour in every figure (hex; the seaborn ``colorblind`` palette for the
        paper's methods).
    paper_name
        What the LANCE paper calls it (``None`` when the paper does not use it).
    kind
        ``"layer"``: applied to chosen Conv2d / Linear layers by
        :func:`lance_lib.methods.apply_method`; ``"block"``: applied by the same
        function to the Linear layers of pre-norm transformer blocks, swapping whole
        units (:mod:`lance_lib.methods.loract_prenorm`); ``"continual"``: a
        continual-learning strategy of :mod:`lance_lib.continual`.
    description
        One line saying what the code computes.
    """

    name: str
    label: str
    color: str
    paper_name: str | None
    kind: str
    description: str


METHOD_KINDS = ("layer", "block", "continual")
#: The kinds :func:`register_method` registers (the continual strategies register in
#: :mod:`lance_lib.continual.strategies`).
APPLIED_KINDS = ("layer", "block")

_TABLE: tuple[MethodInfo, ...] = (
    MethodInfo("bp", "BP", "#0173b2", "BP", "layer", "plain backpropagation"),
    MethodInfo(
        "lance",
        "LANCE",
        "#de8f05",
        "LANCE",
        "layer",
        "one-shot HOSVD calibration (Eq. 2-3), then only the core of Eq. (1) is kept",
    ),
    MethodInfo(
        "hosvd",
        "HOSVD",
        "#029e73",
        "HOSVD",
        "layer",
        "a fresh HOSVD of every activation at every step, ranks at eps on that step",
    ),
    MethodInfo(
        "asi",
        "ASI",
        "#d55e00",
        "ASI",
        "layer",
        "one warm-started subspace iteration per mode and step, ranks fixed at step 1",
    ),
    MethodInfo(
        "loract",
        "LoRAct",
        "#cc78bc",
        None,
        "layer",
        "a sampled-column QB sketch of each layer input at rank int(r n), every step",
    ),
    MethodInfo(
        "checkpoint",
        "Checkpointing",
        "#ca9161",
        "Checkpointing",
        "layer",
        "the trainable region recomputed in N segments during backward",
    ),
    MethodInfo(
        "loract_prenorm",
        "LoRAct pre-norm",
        "#7d3c8c",
        None,
        "block",
        "LoRAct's pre-norm mode: each sketched LayerNorm output kept once, attention and "
        "MLP recomputed from it in backward",
    ),
    MethodInfo(
        "loract_prenorm_linear",
        "LoRAct pre-norm (LN + first projection)",
        "#e6a5d8",
        None,
        "block",
        "one sketched LayerNorm output serves the norm and its first projection; the "
        "rest of the block is stored in full",
    ),
    MethodInfo("gpm", "GPM", "#56b4e9", "GPM", "continual", "gradient projection memory"),
    MethodInfo(
        "finetune",
        "Fine-tuning",
        "#949494",
        None,
        "continual",
        "plain sequential fine-tuning, no protection of earlier tasks",
    ),
    MethodInfo(
        "multitask",
        "Multitask",
        "#333333",
        "Multitask",
        "continual",
        "every task trained jointly (the reference upper bound)",
    ),
)

#: Every method any figure or table shows, in display order: ``{name: MethodInfo}``.
METHOD_TABLE: Mapping[str, MethodInfo] = {info.name: info for info in _TABLE}


def method_info(name: str) -> MethodInfo:
    """The :class:`MethodInfo` of ``name``, with a clear error for an unknown name."""
    try:
        return METHOD_TABLE[name]
    except KeyError:
        raise KeyError(
            f"unknown method {name!r}; the method table has {list(METHOD_TABLE)}"
        ) from None


def method_label(name: str, rank_ratio: float | None = None) -> str:
    """Display label, with a sketch rank ratio when given: ``"LoRAct pre-norm r=1/4"``."""
    label = method_info(name).label
    if rank_ratio is None:
        return label
    return f"{label} r={Fraction(rank_ratio).limit_denominator(1024)}"


def method_color(name: str) -> str:
    """The hex colour of ``name`` in every figure."""
    return method_info(name).color


@dataclass(frozen=True)
class Recomputation:
    """What a method that recomputes during backward measured (:attr:`Applied.recomputation`).

    Attributes
    ----------
    recompute_bytes
        The largest recomputation's saved bytes during backward.
    peak_bytes
        The peak of saved bytes during backward; ``None``: what is kept between the
        passes plus ``recompute_bytes``.
    layer_bytes
        What the treated modules hold at that peak; ``None``: what they keep between
        the passes.
    """

    recompute_bytes: int
    peak_bytes: int | None = None
    layer_bytes: int | None = None


#: ``recomputation(inputs, step, names) -> Recomputation``: ``inputs`` the batch's
#: inputs, ``step()`` one training step, ``names`` the treated modules' names in the
#: module to train.
Recompute = Callable[[torch.Tensor, Callable[[], None], list[str]], Recomputation]


@dataclass
class Applied:
    """What :meth:`MethodSettings.apply` did to a model: all the harness knows of it.

    Attributes
    ----------
    model
        The module to train: the model itself, or a wrapper sharing its modules.
    replacements
        Module name -> the module now at that name (empty when nothing was swapped).
    subspaces
        LANCE's calibrated subspaces (``None`` for the other methods).
    treated
        Names of the modules that stand for the treated layers when the method swapped
        larger units than the layers it was given (a transformer block, a LayerNorm
        with its first projection); ``None``: the layers themselves.
    set_enabled
        ``set_enabled(False)`` makes :attr:`model` plain BP on the same weights,
        ``set_enabled(True)`` undoes it, for a wrapper that swaps nothing
        (checkpointing); ``None``: swapping the originals back is enough.
    recomputation
        Measures what the method recomputes during backward (a :data:`Recompute`);
        ``None``: nothing is recomputed.
    """

    model: nn.Module
    replacements: dict[str, nn.Module] = field(default_factory=dict)
    subspaces: Any = None
    treated: list[str] | None = None
    set_enabled: Callable[[bool], None] | None = None
    recomputation: Recompute | None = None


S = TypeVar("S", bound="MethodSettings")
_REGISTRY: dict[str, type[MethodSettings]] = {}


class MethodSettings:
    """Base of every method's frozen settings dataclass (see the module notes).

    Subclasses are ``@dataclass(frozen=True)``, registered with :func:`register_method`
    (which sets :attr:`name`), override :meth:`validate` (called once from
    ``__post_init__``) and :meth:`apply`, and may override :meth:`kept_elements` and
    :meth:`layer_ranks`.
    """

    name: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError``/``TypeError`` naming the setting, its value and the fix."""

    def _normalise(self, name: str, value: Any) -> None:
        """Store the checked (canonical) value of a field; used by :meth:`validate`."""
        object.__setattr__(self, name, value)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings, ``{"method": name, **fields}``: the results key's input."""
        return {"method": self.name, **jsonable(dataclasses.asdict(self))}

    def apply(
        self,
        model: nn.Module,
        targets: Mapping[str, nn.Module],
        *,
        calib_loader: Iterable[Any] | None = None,
        forward: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    ) -> Applied:
        """Prepare ``model`` (in place) for training the layers ``targets``."""
        raise NotImplementedError

    def kept_elements(self, applied: Applied, name: str, input_shape: tuple[int, ...]) -> int:
        """Activation elements layer ``name`` keeps for its weight gradient (Appendix C).

        Default: what the replacement module reports (``stored_elements()``), or the
        whole input when the layer was not replaced.
        """
        module = applied.replacements.get(name)
        if module is None:
            return math.prod(input_shape)
        return module.stored_elements()

    def layer_ranks(self, applied: Applied, name: str) -> Any:
        """The ranks layer ``name`` uses (mode ranks, sketch rank) or ``None``."""
        module = applied.replacements.get(name)
        return getattr(module, "ranks", None) if module is not None else None


def register_method(name: str) -> Callable[[type[S]], type[S]]:
    """Class decorator: register a frozen settings dataclass as method ``name``.

    ``name`` must be a ``"layer"`` or ``"block"`` entry of :data:`METHOD_TABLE` (its
    display information lives there, once).
    """

    def decorate(cls: type[S]) -> type[S]:
        info = method_info(name)
        if info.kind not in APPLIED_KINDS:
            raise ValueError(
                f"{name!r} is a {info.kind!r} entry, not a layer method or a block method; "
                "register it where its kind is registered"
            )
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is already registered by {_REGISTRY[name]}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def registered_methods() -> tuple[str, ...]:
    """Names of the registered methods (layer and block), in registration order."""
    return tuple(_REGISTRY)


def settings_class(name: str) -> type[MethodSettings]:
    """The settings dataclass of method ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {registered_methods()}") from None


def settings_from_options(name: str, **options: Any) -> MethodSettings:
    """Build method ``name``'s settings from a shared bag of options.

    Options that belong to another registered method are ignored (callers pass one
    bag, e.g. ``eps`` and ``rank_ratio``, to every method of a comparison); an option
    that no method knows is a ``TypeError``.
    """
    cls = settings_class(name)
    known = {f.name for m in _REGISTRY.values() for f in dataclasses.fields(m)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"unknown method options {unknown}; known: {sorted(known)}")
    own = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in options.items() if k in own})
