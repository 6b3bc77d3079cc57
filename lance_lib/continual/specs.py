"""The plain data of continual learning: benchmark settings, tasks, per-task layer plans.

Everything here is data with its validation and imports nothing else of
:mod:`lance_lib.continual`, so the benchmarks, the strategies and the training loop
all read it without importing one another: :class:`BenchmarkSpec` (Table 7's settings
of one benchmark), :class:`ContinualTask` (one task's datasets), :class:`TaskLayers`
(what a strategy keeps and freezes during a task), and GPM's published per-layer sample
counts :data:`REFERENCE_SAMPLES` that a spec takes by default.

References
----------
Apolinario & Roy, "LANCE: Low Rank Activation Compression for Efficient On-Device
Continual Learning", arXiv:2509.21617, Sec. 3, Appendix A.2 (Tables 5-7).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from torch.utils.data import Dataset

from lance_lib.continual.memory import DEFAULT_NULL_SPACE_RULE, NULL_SPACE_RULES
from lance_lib.data import DATASETS
from lance_lib.models import MODEL_INFO
from lance_lib.validation import check_choice, check_int, check_real

__all__ = [
    "MODES",
    "REFERENCE_SAMPLES",
    "BenchmarkSpec",
    "ContinualTask",
    "TaskLayers",
]

#: GPM's per-layer sample counts, by network, in the order of
#: :func:`~lance_lib.continual.strategies.backbone_layers` (see :mod:`lance_lib.continual.gpm`).
REFERENCE_SAMPLES: Mapping[str, tuple[int, ...]] = MappingProxyType(
    {
        "alexnet_cl": (24, 100, 100, 125, 125),
        # conv1, layer1 (4), layer2.0.conv1/conv2/shortcut, layer2.1.conv1: 10;
        # layer2.1.conv2, layer3.0.conv1/conv2/shortcut: 50; the 7 later convs: 100
        "reduced_resnet18_cl": (10,) * 9 + (50,) * 4 + (100,) * 7,
    }
)

#: LANCE's calibrated-mode settings a benchmark may choose (see :class:`BenchmarkSpec`).
MODES = ("no_batch", "all", "channel")


@dataclass(frozen=True)
class BenchmarkSpec:
    """Settings of one continual-learning benchmark (Table 7 of LANCE), validated once.

    Attributes
    ----------
    name, label
        Registry name and the text tables show.
    datasets
        One dataset split into ``num_tasks`` tasks of ``classes_per_task`` classes, or
        several datasets, one task each (5-Datasets).
    num_tasks, classes_per_task
        Tasks and classes (outputs of each head) per task.
    model, model_options, resolution
        A ``multi_head`` network of :data:`lance_lib.models.MODEL_INFO`, extra builder
        arguments (e.g. ``{"first_stride": 2}``) and the input side in pixels.
    lr, batch_size, min_lr, lr_factor, patience, epochs
        Table 7 (``lr_factor`` divides the rate: Table 7's decay 1/2 is factor 2;
        ``epochs`` is the most epochs per task).
    max_steps
        At most this many optimizer steps per epoch (``None``: the whole training set;
        for quick checks).
    eps, eps_cl, num_batches, num_batches_cl
        ``eps``, ``eps_CL``, ``N``, ``N_CL`` of Table 7.
    modes
        LANCE's calibrated modes, one of :data:`MODES`: ``"no_batch"`` (default),
        ``"all"`` (Eq. 1 as written; training then drops the last incomplete batch) or
        ``"channel"``.
    memory_rule
        The rank rule of mode ``d`` for tasks ``t >= 2``, a key of
        :data:`lance_lib.continual.memory.NULL_SPACE_RULES`: ``"residual"`` (default;
        no layer with a non-empty null space is frozen) or ``"eq5"`` (GPM-style).
    gpm_threshold, gpm_threshold_step
        GPM's energy threshold for task ``t`` (0-based): ``base + t * step``.
    gpm_samples
        GPM's training samples per layer: one count for all layers, or one per layer
        of the backbone; ``None`` (default) takes GPM's own counts for the network
        (:data:`REFERENCE_SAMPLES`).
    val_fraction
        Share of each training set held out for validation (Tables 5-6: 5%).
    deviations
        How this benchmark departs from the paper's protocol (recorded with every
        result and shown beside the tables).

    Raises
    ------
    TypeError, ValueError
        At construction, for any setting out of range; the message names the setting,
        the value and what would work.

    Notes
    -----
    Why ``modes="no_batch"`` by default: a calibrated batch factor ``(B, r_B)`` fixes
    the batch size, so the last incomplete batch of every epoch would have to be
    dropped, and it mixes the samples of randomly drawn batches. It saves at most
    ``r_B / B`` of the core, while for the 1024- and 2048-wide FC layers the factor term
    ``n_d r_d`` of Appendix C dominates the count anyway. Every mode setting keeps the
    null-space guarantee: the weight gradient's input-feature rows lie in the span of
    the mode-``d`` factor whichever other modes are compressed.
    """

    name: str
    label: str
    datasets: tuple[str, ...]
    num_tasks: int
    classes_per_task: int
    model: str
    model_options: Mapping[str, Any] = field(default_factory=dict)
    resolution: int = 32
    lr: float = 0.01
    batch_size: int = 64
    min_lr: float = 1e-5
    lr_factor: float = 2.0
    patience: int = 6
    epochs: int = 200
    max_steps: int | None = None
    eps: float = 0.9
    eps_cl: float = 0.95
    num_batches: int = 100
    num_batches_cl: int = 10
    modes: str = "no_batch"
    memory_rule: str = DEFAULT_NULL_SPACE_RULE
    gpm_threshold: float = 0.97
    gpm_threshold_step: float = 0.003
    gpm_samples: int | tuple[int, ...] | None = None
    val_fraction: float = 0.05
    deviations: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"name must be a non-empty string, got {self.name!r}")
        datasets = (self.datasets,) if isinstance(self.datasets, str) else tuple(self.datasets)
        if not datasets:
            raise ValueError("datasets must name at least one dataset, e.g. ('cifar100',)")
        for d in datasets:
            check_choice("datasets", d, DATASETS)
        put("datasets", datasets)
        put("num_tasks", check_int("num_tasks", self.num_tasks, minimum=1))
        if len(datasets) > 1 and self.num_tasks > len(datasets):
            raise ValueError(
                f"num_tasks must be <= {len(datasets)} for {self.name} (one task per dataset "
                f"of {datasets}), got {self.num_tasks}"
            )
        put("classes_per_task", check_int("classes_per_task", self.classes_per_task, minimum=1))
        multi_head = {n for n, info in MODEL_INFO.items() if info.kind == "multi_head"}
        check_choice("model", self.model, multi_head)
        if not isinstance(self.model_options, Mapping):
            raise TypeError(f"model_options must be a mapping, got {self.model_options!r}")
        put("model_options", dict(self.model_options))
        put("resolution", check_int("resolution", self.resolution, minimum=1))
        put("lr", check_real("lr", self.lr, low=0.0, low_open=True))
        put("batch_size", check_int("batch_size", self.batch_size, minimum=1))
        put("min_lr", check_real("min_lr", self.min_lr, low=0.0))
        put("lr_factor", check_real("lr_factor", self.lr_factor, low=1.0, low_open=True))
        put("patience", check_int("patience", self.patience, minimum=1))
        put("epochs", check_int("epochs", self.epochs, minimum=1))
        put("max_steps", check_int("max_steps", self.max_steps, minimum=1, allow_none=True))
        for name in ("eps", "eps_cl", "gpm_threshold"):
            put(name, check_real(name, getattr(self, name), low=0.0, high=1.0, low_open=True))
        put("num_batches", check_int("num_batches", self.num_batches, minimum=1))
        put("num_batches_cl", check_int("num_batches_cl", self.num_batches_cl, minimum=1))
        check_choice("modes", self.modes, MODES)
        check_choice("memory_rule", self.memory_rule, NULL_SPACE_RULES)
        put(
            "gpm_threshold_step", check_real("gpm_threshold_step", self.gpm_threshold_step, low=0.0)
        )
        if self.gpm_samples is None:
            if self.model not in REFERENCE_SAMPLES:
                raise ValueError(
                    f"GPM publishes no per-layer sample counts for {self.model!r}; set "
                    "gpm_samples (one count, or one per backbone layer), e.g. gpm_samples=125"
                )
            put("gpm_samples", REFERENCE_SAMPLES[self.model])
        elif isinstance(self.gpm_samples, (list, tuple)):
            if not self.gpm_samples:
                raise ValueError("gpm_samples must list at least one count, or be one count")
            counts = [check_int("gpm_samples", k, minimum=1) for k in self.gpm_samples]
            put("gpm_samples", tuple(counts))
        else:
            put("gpm_samples", check_int("gpm_samples", self.gpm_samples, minimum=1))
        put(
            "val_fraction",
            check_real("val_fraction", self.val_fraction, low=0.0, high=1.0, high_open=True),
        )
        put("deviations", tuple(str(d) for d in self.deviations))

    def replace(self, **changes: Any) -> BenchmarkSpec:
        """A copy with ``changes`` (validated again); unknown names are a ``TypeError``."""
        known = [f.name for f in dataclasses.fields(self)]
        unknown = sorted(set(changes) - set(known))
        if unknown:
            raise TypeError(f"unknown benchmark settings {unknown}; BenchmarkSpec fields: {known}")
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class ContinualTask:
    """One task: its name and its train / validation / test sets (labels from 0)."""

    name: str
    train: Dataset
    val: Dataset
    test: Dataset


@dataclass(frozen=True)
class TaskLayers:
    """How a strategy trains the backbone's layers during one task.

    Attributes
    ----------
    layer_ranks
        Per layer, the rank per mode of the activation it keeps for backward (the
        mode's full size where it is not compressed).
    frozen_layers
        Layers whose weights cannot change during the task.
    """

    layer_ranks: dict[str, list[int]]
    frozen_layers: list[str] = field(default_factory=list)
