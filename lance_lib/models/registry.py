"""The model registry: every network is registered where it is defined.

As timm's ``models/_registry.py``: a builder decorated with :func:`register_model`
fills one table, :data:`MODEL_INFO`, with a frozen :class:`ModelInfo` (label, native
input resolution, stand-in note, kind); :func:`build_model` dispatches through that
table, so nothing chooses a model with ``if``/``elif`` on its name. The builders live in
:mod:`lance_lib.models.cnn` (the paper's single-task CNNs), in
:mod:`lance_lib.models.cl_networks` (the continual-learning networks with one head per
task) and in :mod:`lance_lib.models.vit` (the transformer companion).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TypeVar

from torch import nn

__all__ = ["MODEL_INFO", "MODEL_KINDS", "ModelInfo", "build_model", "register_model"]

#: ``single_task``: ``builder(num_classes, *, weights=None, **kw)``, one classifier.
#: ``multi_head``: ``builder(num_tasks, classes_per_task, **kw)``, one head per task
#: (task-incremental continual learning, Appendix A.2 of LANCE).
MODEL_KINDS = ("single_task", "multi_head")


@dataclass(frozen=True)
class ModelInfo:
    """Static description of a registered model.

    Attributes
    ----------
    name
        Registry name (the builder's function name), as passed to :func:`build_model`.
    label
        Human-readable name for tables and figures.
    native_resolution
        Input side length in pixels the architecture is meant for.
    stand_in
        ``None``, or a sentence saying which network replaces the paper's (every output
        that uses such a model says so).
    kind
        One of :data:`MODEL_KINDS`: how :func:`build_model` calls the builder.
    builder
        The registered function.
    """

    name: str
    label: str
    native_resolution: int
    stand_in: str | None = None
    kind: str = "single_task"
    builder: Callable[..., nn.Module] | None = field(default=None, repr=False, compare=False)


B = TypeVar("B", bound=Callable[..., nn.Module])
_MODELS: dict[str, ModelInfo] = {}

#: ``{name: ModelInfo}`` of every registered model (read-only; filled by
#: :func:`register_model` where each builder is defined).
MODEL_INFO: Mapping[str, ModelInfo] = MappingProxyType(_MODELS)


def register_model(
    *, label: str, native_resolution: int, stand_in: str | None = None, kind: str = "single_task"
) -> Callable[[B], B]:
    """Decorator: register a model builder under its function name.

    Parameters
    ----------
    label, native_resolution, stand_in, kind
        The :class:`ModelInfo` fields.

    Returns
    -------
    callable
        A decorator returning the builder unchanged.

    Raises
    ------
    ValueError
        ``kind`` is unknown, or the name is registered already.
    """
    if kind not in MODEL_KINDS:
        raise ValueError(f"kind={kind!r} is not a model kind; use one of {MODEL_KINDS}")

    def decorate(builder: B) -> B:
        name = builder.__name__
        if name in _MODELS:
            raise ValueError(f"model {name!r} is registered twice; rename one builder")
        _MODELS[name] = ModelInfo(name, label, native_resolution, stand_in, kind, builder)
        return builder

    return decorate


def build_model(name: str, num_classes: int, *, weights: str | None = None, **kwargs) -> nn.Module:
    """Build a registered model by name.

    Parameters
    ----------
    name
        A key of :data:`MODEL_INFO`.
    num_classes
        Classifier outputs; for a ``multi_head`` model (``alexnet_cl``,
        ``reduced_resnet18_cl``) the outputs of each task head.
    weights
        Torchvision weight name for the ImageNet models (see
        :func:`lance_lib.models.resnet18`); ``multi_head`` models have none.
    **kwargs
        Passed to the builder. ``multi_head`` models require ``num_tasks``.

    Returns
    -------
    nn.Module

    Raises
    ------
    KeyError
        ``name`` is not registered (the message lists the registered names).
    ValueError
        ``weights`` given for a model without pretrained weights.
    """
    info = MODEL_INFO.get(name)
    if info is None:
        raise KeyError(f"unknown model {name!r}; registered models: {sorted(MODEL_INFO)}")
    if info.kind == "multi_head":
        if weights is not None:
            raise ValueError(f"{name} has no pretrained weights; pass weights=None")
        return info.builder(classes_per_task=num_classes, **kwargs)
    return info.builder(num_classes, weights=weights, **kwargs)
