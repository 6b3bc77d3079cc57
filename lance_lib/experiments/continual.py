"""One continual-learning experiment: a frozen config, its registered runner, a cached record.

:class:`ContinualConfig` (kind ``"continual"``) names a benchmark, a strategy, a seed,
overrides of the benchmark's settings and a device; it is validated once, at
construction. :func:`run_continual_experiment` (registered for it with
:func:`lance_lib.experiments.base.register_experiment`, so
:func:`lance_lib.experiments.base.run_experiment` and the grid run it) computes the
record through :func:`lance_lib.experiments.cache.cached_record`; :func:`run_benchmark`
is the convenient entry point. :func:`table3_configs` declares what the Table 3
notebook needs (registered as its sweep).

The record
----------
Every record holds the fields of :data:`RECORD_FIELDS`:

``acc_matrix``
    ``A[j, i]``, test accuracy (%) on task ``i`` after training task ``j`` (``T x T``,
    zeros above the diagonal); joint multitask training has the single row ``A[T, :]``.
``ACC``, ``BWT``
    Eq. (6) in percentage points (``BWT`` is ``None`` for multitask).
``layer_ranks``
    One ``{layer: [rank per mode]}`` per task: the ranks of the activation each
    backbone layer keeps for backward while training that task (the mode's full size
    where nothing is compressed).
``frozen_layers``
    One list of layer names per task: the layers whose weights could not change
    (LANCE: mode-``d`` rank 0; GPM: a basis spanning the layer's whole input space).
``memory``
    ``mb`` and its ``definition``, plus per-strategy details (LANCE: memory matrices and
    activation cores; GPM: the bases and the ``n x n`` projection matrices).
``tasks``
    The strategy's per-task details (LANCE: memory growth; GPM: thresholds, samples and
    basis ranks).
``training``
    Per task: epochs run, best validation loss, final learning rate.
``benchmark``, ``method``, ``label``, ``deviations``, ``task_names``, ``task_sizes``
    What ran, how it departs from the paper's protocol, and the data it ran on.
``peak_gpu_memory_mb``
    ``torch.cuda.max_memory_allocated`` over the run on CUDA, else ``None``.

plus ``settings`` and ``provenance`` (added by the cache).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from lance_lib.accounting import MIB
from lance_lib.continual.benchmarks import BENCHMARKS, build_benchmark_model, load_benchmark
from lance_lib.continual.specs import BenchmarkSpec
from lance_lib.continual.strategies import STRATEGIES, build_strategy
from lance_lib.experiments.base import (
    ExperimentConfig,
    register_experiment,
    register_sweep,
    run_experiment,
)
from lance_lib.experiments.cache import cached_record, record_path
from lance_lib.io import jsonable
from lance_lib.paths import results_dir as default_results_dir
from lance_lib.validation import check_choice, check_int

__all__ = [
    "RECORD_FIELDS",
    "ContinualConfig",
    "run_benchmark",
    "run_continual_experiment",
    "table3_configs",
]

#: The fields every continual-learning record holds (see the module docstring).
RECORD_FIELDS = (
    "acc_matrix",
    "ACC",
    "BWT",
    "layer_ranks",
    "frozen_layers",
    "memory",
    "tasks",
    "training",
    "benchmark",
    "method",
    "label",
    "deviations",
    "task_names",
    "task_sizes",
    "peak_gpu_memory_mb",
)


@dataclass(frozen=True)
class ContinualConfig(ExperimentConfig):
    """One continual-learning run: a strategy on a benchmark, validated at construction.

    Attributes
    ----------
    benchmark
        A key of :data:`lance_lib.continual.BENCHMARKS`.
    method
        A registered strategy: ``"lance"``, ``"gpm"``, ``"finetune"`` (lower bound) or
        ``"multitask"`` (upper bound).
    seed
        Fixes model initialisation, dropout, data order, validation split, calibration
        batches and GPM's samples.
    overrides
        :class:`~lance_lib.continual.BenchmarkSpec` fields to change (e.g.
        ``{"epochs": 2, "num_tasks": 3, "memory_rule": "eq5"}``); every value is
        validated by the spec and stored normalised.
    device
        Torch device (``"cpu"``, ``"cuda"``, ``"cuda:1"``); ``None``: CUDA when
        available, else CPU.

    Raises
    ------
    TypeError, ValueError
        At construction, naming the setting, the value and what would work (an unknown
        benchmark, method or override; ``epochs=0``; ``num_batches=1.5``; ...).
    """

    kind: ClassVar[str] = "continual"
    #: 3: multitask trains on single-task batches in turn, at the sequential budget
    record_format: ClassVar[int] = 3
    #: The fields a complete record holds (what the cache and the grid require).
    record_fields: ClassVar[tuple[str, ...]] = RECORD_FIELDS

    benchmark: str
    method: str
    seed: int = 0
    overrides: Mapping[str, Any] = field(default_factory=dict)
    device: str | None = None

    def validate(self) -> None:
        """Check every setting once (the benchmark's spec validates the overrides)."""
        check_choice("benchmark", self.benchmark, BENCHMARKS)
        check_choice("method", self.method, STRATEGIES)
        object.__setattr__(self, "seed", check_int("seed", self.seed, minimum=0))
        if not isinstance(self.overrides, Mapping):
            raise TypeError(
                f"overrides must be a mapping of BenchmarkSpec fields, got {self.overrides!r}"
            )
        if "name" in self.overrides:
            raise ValueError("overrides cannot rename the benchmark; choose benchmark= instead")
        spec = BENCHMARKS[self.benchmark].replace(**self.overrides)
        normalised = {k: getattr(spec, k) for k in sorted(self.overrides)}
        object.__setattr__(self, "overrides", normalised)
        if self.device is not None:
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError):
                raise ValueError(
                    f"device must be a torch device such as 'cpu', 'cuda' or 'cuda:0' (or None "
                    f"for CUDA when available), got {self.device!r}"
                ) from None

    def spec(self) -> BenchmarkSpec:
        """The benchmark's settings with the overrides applied."""
        return BENCHMARKS[self.benchmark].replace(**self.overrides)

    def settings(self) -> dict[str, Any]:
        """The config's fields and the full resolved benchmark spec (the results key)."""
        return {**super().settings(), "spec": jsonable(dataclasses.asdict(self.spec()))}


def _device(config: ContinualConfig) -> torch.device:
    return torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))


@register_experiment(ContinualConfig)
def run_continual_experiment(
    config: ContinualConfig,
    *,
    results_dir: str | os.PathLike | None = None,
    root: str | os.PathLike | None = None,
    progress: bool | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Run one continual-learning config, or return its stored record.

    Parameters
    ----------
    config
        What to run.
    results_dir
        Folder of the record ``cl-<benchmark>-<method>-<key>.json`` (default
        :func:`lance_lib.paths.results_dir` ``("continual")``); checked for writability
        before any work.
    root
        Data root (:func:`lance_lib.data.data_root`).
    progress
        Show progress bars (``None``: when someone watches).
    force
        Recompute even when a matching record exists.

    Returns
    -------
    dict
        The record (:data:`RECORD_FIELDS`, ``settings``, ``provenance``, ``path``).
    """
    settings = config.settings()
    folder = default_results_dir("continual") if results_dir is None else results_dir
    path = record_path(folder, f"cl-{config.benchmark}-{config.method}", settings)
    device = _device(config)

    def compute() -> dict[str, Any]:
        spec = config.spec()
        tasks = load_benchmark(spec, root=root, seed=config.seed)
        torch.manual_seed(config.seed)
        model = build_benchmark_model(spec, len(tasks)).to(device)
        strategy = build_strategy(config.method, spec, model, config.seed)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        out = strategy.fit(model, tasks, spec, seed=config.seed, progress=progress)
        peak = torch.cuda.max_memory_allocated(device) / MIB if device.type == "cuda" else None
        return {
            **out,
            "benchmark": config.benchmark,
            "method": config.method,
            "label": spec.label,
            "deviations": list(spec.deviations),
            "task_names": [t.name for t in tasks],
            "task_sizes": [[len(t.train), len(t.val), len(t.test)] for t in tasks],
            "peak_gpu_memory_mb": peak,
        }

    return cached_record(
        path,
        settings,
        compute,
        required=config.record_fields,
        force=force,
        provenance_extra={"seeds": config.seed, "device": device},
    )


def run_benchmark(
    name: str,
    method: str,
    *,
    epochs: int | None = None,
    seed: int = 0,
    device: str | None = None,
    results_dir: str | os.PathLike | None = None,
    root: str | os.PathLike | None = None,
    progress: bool | None = None,
    force: bool = False,
    **overrides: Any,
) -> dict[str, Any]:
    """Run one method on one benchmark with Table 7's settings; cache the record.

    Builds a :class:`ContinualConfig` (which validates every argument before any data
    is loaded) and runs it with :func:`run_continual_experiment`.

    Parameters
    ----------
    name
        A key of :data:`~lance_lib.continual.BENCHMARKS`: ``"split_cifar100"``,
        ``"split_miniimagenet"``, ``"five_datasets"``, ``"five_datasets_nosvhn"`` or the
        embedded offline ``"cifar10_mini"``.
    method
        ``"lance"``, ``"gpm"``, ``"finetune"`` or ``"multitask"``.
    epochs
        Most epochs per task (default the benchmark's).
    seed, device
        As in :class:`ContinualConfig`.
    results_dir, root, progress, force
        As in :func:`run_continual_experiment`.
    **overrides
        Any :class:`~lance_lib.continual.BenchmarkSpec` field (e.g. ``num_tasks=2``,
        ``memory_rule="eq5"``, ``max_steps=5``).

    Returns
    -------
    dict
        The record (see :mod:`lance_lib.experiments.continual`).
    """
    if epochs is not None:
        overrides["epochs"] = epochs
    config = ContinualConfig(name, method, seed, overrides, device)
    return run_experiment(
        config, results_dir=results_dir, root=root, progress=progress, force=force
    )


def table3_configs(
    benchmarks: Sequence[str],
    methods: Sequence[str],
    seeds: Sequence[int],
    *,
    epochs: int | None = None,
    overrides: Mapping[str, Any] | None = None,
    variants: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    device: str | None = None,
) -> list[ContinualConfig]:
    """The runs of Table 3: every benchmark x method (x variant) x seed.

    Parameters
    ----------
    benchmarks, methods, seeds
        What to run.
    epochs
        Most epochs per task (``None``: each benchmark's own).
    overrides
        Benchmark settings applied to every run.
    variants
        Per method, the settings of each of its variants, one run each: e.g.
        ``{"lance": [{"memory_rule": "residual"}, {"memory_rule": "eq5"}]}`` runs both
        readings of the rank rule (:data:`~lance_lib.continual.memory.NULL_SPACE_RULES`).
        A method without an entry runs once.
    device
        As in :class:`ContinualConfig`.
    """
    common = dict(overrides or {})
    if epochs is not None:
        common["epochs"] = epochs
    variants = variants or {}
    return [
        ContinualConfig(bench, method, seed, {**common, **variant}, device)
        for bench in benchmarks
        for method in methods
        for variant in variants.get(method, [{}])
        for seed in seeds
    ]


@register_sweep("table3_continual")
def _table3_sweep(params: Mapping[str, Any]) -> list[ContinualConfig]:
    return table3_configs(
        params["benchmarks"],
        params["methods"],
        params["seeds"],
        epochs=params.get("epochs"),
        overrides=params.get("overrides"),
        variants=params.get("variants"),
        device=params.get("device"),
    )
