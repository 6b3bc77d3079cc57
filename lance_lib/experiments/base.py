"""One shape for every experiment: a frozen, validated config and a registered runner.

Every kind of experiment (fine-tuning, continual learning, transformer fine-tuning,
latency, region memory, ...) is a frozen dataclass deriving from
:class:`ExperimentConfig`: validated once, in ``__post_init__``; its
:meth:`~ExperimentConfig.settings` (every field, JSON-ready, with the kind and the
record format) are hashed into the results key. The function that runs it is
registered for its config class with :func:`register_experiment`, so that
:func:`run_experiment` (and the Dask grid, which maps it over configs) runs any config
without asking what it is. What a notebook needs is declared beside the experiment
too: :func:`register_sweep` registers the function turning the notebook's parameters
into configs (collected by :mod:`lance_lib.experiments.sweeps`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, TypeVar

from lance_lib.experiments.cache import load_record, settings_key
from lance_lib.io import jsonable

__all__ = [
    "ExperimentConfig",
    "experiment_kinds",
    "register_experiment",
    "register_sweep",
    "registered_sweeps",
    "run_experiment",
    "stored_record",
]

C = TypeVar("C", bound="ExperimentConfig")
Runner = Callable[..., dict[str, Any]]
_RUNNERS: dict[type, Runner] = {}
SweepFunction = Callable[[Mapping[str, Any]], list["ExperimentConfig"]]
_SWEEPS: dict[str, SweepFunction] = {}


class ExperimentConfig:
    """Mixin for the frozen dataclass config of one kind of experiment.

    Subclasses set ``kind`` (the record-name prefix) and ``record_format`` (bumped when
    the record's schema changes, so older records are recomputed), and override
    :meth:`validate`, which ``__post_init__`` calls once.
    """

    kind: ClassVar[str] = "experiment"
    record_format: ClassVar[int] = 1

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``TypeError``/``ValueError`` naming the field, the value and the fix."""

    @classmethod
    def from_dict(cls: type[C], values: Mapping[str, Any]) -> C:
        """Build from a mapping; unknown keys are a ``TypeError`` listing the known ones."""
        if isinstance(values, cls):
            return values
        if not isinstance(values, Mapping):
            raise TypeError(
                f"a {cls.__name__} is built from a mapping of its fields, got "
                f"{type(values).__name__}"
            )
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise TypeError(f"unknown {cls.kind} settings {unknown}; known: {sorted(known)}")
        return cls(**dict(values))

    def replace(self: C, **changes: Any) -> C:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def settings(self) -> dict[str, Any]:
        """Every field, JSON-ready, plus ``kind`` and ``format``: the results key's input."""
        out = jsonable(dataclasses.asdict(self))
        out["kind"] = self.kind
        out["format"] = self.record_format
        return out

    def key(self) -> str:
        """The 12-digit hash of :meth:`settings`."""
        return settings_key(self.settings())


def register_experiment(config_class: type[C]) -> Callable[[Runner], Runner]:
    """Decorator: ``runner(config, **options)`` runs configs of ``config_class``."""

    def decorate(runner: Runner) -> Runner:
        _RUNNERS[config_class] = runner
        return runner

    return decorate


def experiment_kinds() -> dict[str, type]:
    """``{kind: config class}`` of every registered experiment."""
    return {cls.kind: cls for cls in _RUNNERS}


def run_experiment(config: ExperimentConfig, **options: Any) -> dict[str, Any]:
    """Run ``config`` with the runner registered for its class (cached by the runner)."""
    runner = _RUNNERS.get(type(config))
    if runner is None:
        known = sorted(cls.__name__ for cls in _RUNNERS)
        raise TypeError(
            f"no experiment runner registered for {type(config).__name__}; registered: {known}"
        )
    return runner(config, **options)


def stored_record(config: ExperimentConfig) -> dict[str, Any] | None:
    """The record of ``config`` already in the results cache, without running anything.

    For configs that say where their record lives (a ``record_request()`` method, as
    :class:`~lance_lib.experiments.finetune_config.FinetuneConfig`); ``None`` when it was
    not computed yet (or the stored file does not answer the request, with a
    :class:`~lance_lib.experiments.cache.CacheWarning`).

    Returns
    -------
    dict or None
        The record with ``path``, as :func:`run_experiment` returns it.
    """
    request = getattr(config, "record_request", None)
    if request is None:
        raise TypeError(
            f"{type(config).__name__} does not say where its record lives (no record_request); "
            "run it with run_experiment instead"
        )
    path, settings, required = request()
    stored = load_record(path, settings, required)
    return None if stored is None else {**stored, "path": str(path)}


def register_sweep(notebook: str) -> Callable[[SweepFunction], SweepFunction]:
    """Decorator: ``function(params) -> [configs]`` declares what ``notebook`` needs.

    ``notebook`` is the notebook's file stem (also its profile section's name).
    """

    def decorate(function: SweepFunction) -> SweepFunction:
        _SWEEPS[notebook] = function
        return function

    return decorate


def registered_sweeps() -> dict[str, SweepFunction]:
    """The sweeps registered so far, ``{notebook: function}`` (see
    :func:`lance_lib.experiments.sweeps.sweeps` for all of them)."""
    return dict(_SWEEPS)
