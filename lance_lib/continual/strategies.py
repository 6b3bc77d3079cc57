"""Continual-learning strategies: LANCE, sequential fine-tuning and joint multitask training.

Every strategy registers itself by name with :func:`register_strategy` where it is
defined (GPM in :mod:`lance_lib.continual.gpm`); :func:`build_strategy` builds one from
a benchmark's settings, so nothing chooses a strategy with ``if``/``elif`` on its name.

A :class:`SequentialStrategy` trains the tasks one after another through
:func:`lance_lib.continual.training.run_continual`, which calls its hooks (as
Avalanche's plugins): :meth:`~SequentialStrategy.before_task` prepares a task and says
what each layer keeps for backward and which layers are frozen (:class:`TaskLayers`),
:meth:`~SequentialStrategy.after_backward` may edit gradients, and
:meth:`~SequentialStrategy.after_task` finishes the task; the strategy's state (LANCE's
memory, GPM's bases) lives in the strategy. :class:`Multitask` trains every task at
once instead.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch
from torch import nn
from torch.utils.data import DataLoader

from lance_lib.accounting import MIB, subspace_elements
from lance_lib.continual.memory import (
    DEFAULT_NULL_SPACE_RULE,
    frozen_layers,
    null_space_calibration,
    update_memory,
)
from lance_lib.continual.specs import TaskLayers
from lance_lib.continual.training import layer_input_shapes, run_continual, train_multitask
from lance_lib.layers import compress, restore
from lance_lib.models import MultiHead
from lance_lib.subspaces import Subspaces
from lance_lib.validation import check_choice, check_int, check_real

if TYPE_CHECKING:
    from lance_lib.continual.specs import BenchmarkSpec, ContinualTask

__all__ = [
    "BYTES_PER_ELEMENT",
    "STRATEGIES",
    "ContinualStrategy",
    "FineTune",
    "LanceCL",
    "Multitask",
    "SequentialStrategy",
    "backbone_layers",
    "build_strategy",
    "register_strategy",
]

BYTES_PER_ELEMENT = 4

S = TypeVar("S", bound="type[ContinualStrategy]")
_STRATEGIES: dict[str, type[ContinualStrategy]] = {}

#: ``{name: strategy class}`` of every registered strategy (read-only).
STRATEGIES: Mapping[str, type[ContinualStrategy]] = MappingProxyType(_STRATEGIES)


def register_strategy(name: str) -> Callable[[S], S]:
    """Decorator: register a :class:`ContinualStrategy` subclass under ``name``."""

    def decorate(cls: S) -> S:
        if name in _STRATEGIES:
            raise ValueError(f"strategy {name!r} is registered twice; rename one")
        cls.name = name
        _STRATEGIES[name] = cls
        return cls

    return decorate


def build_strategy(
    name: str, spec: BenchmarkSpec, model: MultiHead, seed: int
) -> ContinualStrategy:
    """The strategy ``name`` with a benchmark's settings (:meth:`ContinualStrategy.from_spec`)."""
    check_choice("method", name, STRATEGIES)
    return STRATEGIES[name].from_spec(spec, model, seed)


def backbone_layers(model: nn.Module) -> list[str]:
    """Names of the Conv2d / Linear layers of a :class:`~lance_lib.models.MultiHead` backbone.

    The layers LANCE compresses and GPM projects; the per-task heads are excluded
    (each is trained only on its own task).
    """
    if not isinstance(model, MultiHead):
        raise TypeError(f"continual learning needs a MultiHead model, got {type(model).__name__}")
    return [
        f"backbone.{name}"
        for name, m in model.backbone.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]


class ContinualStrategy(ABC):
    """A way of learning a sequence of tasks; registered by :func:`register_strategy`."""

    name: ClassVar[str] = "strategy"
    #: The benchmark settings that tell this strategy's variants apart in tables (e.g.
    #: LANCE's ``memory_rule``); other strategies ignore them.
    variant_settings: ClassVar[tuple[str, ...]] = ()

    @classmethod
    @abstractmethod
    def from_spec(cls, spec: BenchmarkSpec, model: MultiHead, seed: int) -> ContinualStrategy:
        """The strategy with a benchmark's settings, for ``model``."""

    @abstractmethod
    def fit(
        self,
        model: MultiHead,
        tasks: Sequence[ContinualTask],
        spec: BenchmarkSpec,
        *,
        seed: int,
        progress: bool | None,
    ) -> dict[str, Any]:
        """Train ``model`` on ``tasks``; the record's fields (see ``run_continual``)."""


class SequentialStrategy(ContinualStrategy):
    """A strategy trained task after task by :func:`~lance_lib.continual.training.run_continual`.

    Parameters
    ----------
    layers
        The backbone's Conv2d / Linear layers (:func:`backbone_layers`).
    """

    #: Whether training loaders must drop their last incomplete batch.
    drop_last: bool = False

    def __init__(self, layers: Sequence[str]) -> None:
        self.layers = list(layers)

    def fit(
        self,
        model: MultiHead,
        tasks: Sequence[ContinualTask],
        spec: BenchmarkSpec,
        *,
        seed: int,
        progress: bool | None,
    ) -> dict[str, Any]:
        """Train the tasks in order (:func:`~lance_lib.continual.training.run_continual`)."""
        return run_continual(model, tasks, self, spec, seed=seed, progress=progress)

    def full_ranks(self, model: MultiHead, task: int, loader: DataLoader) -> TaskLayers:
        """Every layer keeps its whole input (ranks = the input's shape); none frozen."""
        return TaskLayers(layer_input_shapes(model, self.layers, loader, _head(task)))

    def before_task(self, model: MultiHead, task: int, loader: DataLoader) -> TaskLayers:
        """Prepare task ``task``; say what each layer keeps and which are frozen."""
        return self.full_ranks(model, task, loader)

    def after_backward(self, model: MultiHead, task: int) -> None:
        """Adjust gradients after ``loss.backward()`` (nothing by default)."""

    def after_task(self, model: MultiHead, task: int, loader: DataLoader) -> None:
        """Finish task ``task`` (nothing by default)."""

    @abstractmethod
    def report(self) -> dict[str, Any]:
        """Per-task details (``tasks``) and ``memory`` (MB with its ``definition``)."""


def _head(task: int) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
    return lambda model, x: model(x, task)


@register_strategy("finetune")
class FineTune(SequentialStrategy):
    """Plain sequential fine-tuning with full BP: the lower bound (no memory)."""

    @classmethod
    def from_spec(cls, spec: BenchmarkSpec, model: MultiHead, seed: int) -> FineTune:
        """Fine-tuning reads no benchmark setting beyond the optimiser's."""
        return cls(backbone_layers(model))

    def report(self) -> dict[str, Any]:
        """No memory."""
        return {
            "tasks": [],
            "memory": {
                "mb": 0.0,
                "definition": "sequential fine-tuning stores nothing between tasks",
            },
        }


@register_strategy("lance")
class LanceCL(SequentialStrategy):
    """LANCE for continual learning (Sec. 2.3, Algorithm 1).

    Task 1 trains with full BP. After every task Phase III grows the memory
    (:func:`~lance_lib.continual.memory.update_memory`); every later task is calibrated
    in the memory's null space
    (:func:`~lance_lib.continual.memory.null_space_calibration`), trained with the
    compressed layers, restored.

    Parameters
    ----------
    layers
        Layers to compress (:func:`backbone_layers`).
    eps, eps_cl
        Energy thresholds of Eq. (3) and Eq. (5) (Table 7: 0.9 and 0.95 / 0.985 / 0.97).
    num_batches, num_batches_cl
        ``N`` and ``N_CL`` (Table 7: 100 and 10). Both are capped at one pass over the
        task's training loader.
    modes
        Calibrated modes (:func:`lance_lib.calibration.calibrate`); ``"no_batch"`` by
        default (see :class:`~lance_lib.continual.BenchmarkSpec`).
    memory_rule
        The rank rule of mode ``d`` for tasks ``t >= 2``, a key of
        :data:`~lance_lib.continual.memory.NULL_SPACE_RULES` (default ``"residual"``).
    """

    variant_settings = ("memory_rule",)

    def __init__(
        self,
        layers: Sequence[str],
        eps: float,
        eps_cl: float,
        num_batches: int = 100,
        num_batches_cl: int = 10,
        modes: Any = "no_batch",
        memory_rule: str = DEFAULT_NULL_SPACE_RULE,
    ) -> None:
        super().__init__(layers)
        self.eps = check_real("eps", eps, low=0.0, high=1.0, low_open=True)
        self.eps_cl = check_real("eps_cl", eps_cl, low=0.0, high=1.0, low_open=True)
        self.num_batches = check_int("num_batches", num_batches, minimum=1)
        self.num_batches_cl = check_int("num_batches_cl", num_batches_cl, minimum=1)
        self.modes = modes
        self.memory_rule = memory_rule
        self.drop_last = modes in (None, "all") or (
            isinstance(modes, Sequence) and not isinstance(modes, str) and 0 in modes
        )
        self.memory: dict[str, torch.Tensor] = {}
        self.subspaces: Subspaces | None = None
        self.tasks: list[dict[str, Any]] = []
        self.full_bp_elements = 0

    @classmethod
    def from_spec(cls, spec: BenchmarkSpec, model: MultiHead, seed: int) -> LanceCL:
        """LANCE with Table 7's ``eps``, ``eps_CL``, ``N``, ``N_CL`` and the spec's rule."""
        return cls(
            backbone_layers(model),
            spec.eps,
            spec.eps_cl,
            spec.num_batches,
            spec.num_batches_cl,
            spec.modes,
            spec.memory_rule,
        )

    @staticmethod
    def _forward(task: int) -> Callable[[nn.Module, Any], Any]:
        def forward(model: nn.Module, batch: Any) -> Any:
            return model(batch[0].to(next(model.parameters()).device), task)

        return forward

    def before_task(self, model: MultiHead, task: int, loader: DataLoader) -> TaskLayers:
        """Task 1: full BP. Later tasks: null-space calibration, then compress."""
        record: dict[str, Any] = {"task": task}
        self.tasks.append(record)
        if task == 0:
            plan = self.full_ranks(model, task, loader)
            self.full_bp_elements = sum(math.prod(s) for s in plan.layer_ranks.values())
            record["full_bp"] = True
            return plan
        n = min(self.num_batches, len(loader))
        self.subspaces = null_space_calibration(
            model,
            loader,
            self.layers,
            self.memory,
            self.eps,
            n,
            self.modes,
            self._forward(task),
            self.memory_rule,
        )
        plan = TaskLayers(
            {name: list(s.ranks) for name, s in self.subspaces.items()},
            frozen_layers(model, self.subspaces),
        )
        compress(model, self.subspaces)
        record.update(
            full_bp=False,
            calibration_batches=n,
            activation_elements=sum(subspace_elements(s)[1] for s in self.subspaces.values()),
        )
        return plan

    def after_task(self, model: MultiHead, task: int, loader: DataLoader) -> None:
        """Restore the original layers and grow the memory (Phase III)."""
        restore(model)
        update = update_memory(
            model,
            loader,
            self.layers,
            self.memory,
            self.eps_cl,
            min(self.num_batches_cl, len(loader)),
            self._forward(task),
        )
        self.memory = update.memory
        self.tasks[-1].update(
            memory_added=update.added,
            memory_rank={k: int(v.shape[1]) for k, v in update.memory.items()},
            saturated_layers=update.saturated,
        )

    def report(self) -> dict[str, Any]:
        """Per-task memory growth and memory: the M matrices plus the largest activation cores."""
        memory_elements = sum(m.numel() for m in self.memory.values())
        cores = [r["activation_elements"] for r in self.tasks if not r.get("full_bp")]
        core_elements = max(cores, default=0)
        mb = BYTES_PER_ELEMENT / MIB
        return {
            "tasks": self.tasks,
            "memory": {
                "mb": (memory_elements + core_elements) * mb,
                "definition": (
                    "LANCE: sum over compressed layers of the final memory M's elements "
                    "(n_d x m) plus the activation cores kept for backward while training "
                    "(Appendix C: prod_i r_i + sum_i n_i r_i per layer, summed over layers; "
                    "the largest over tasks 2..T), 4 bytes per element, MB = 2**20 bytes"
                ),
                "memory_matrices_mb": memory_elements * mb,
                "activation_cores_mb": core_elements * mb,
                "first_task_full_bp_activation_mb": self.full_bp_elements * mb,
                "memory_shapes": {k: list(v.shape) for k, v in self.memory.items()},
            },
        }


@register_strategy("multitask")
class Multitask(ContinualStrategy):
    """Joint training on every task at once: the upper bound (sees all data).

    Parameters
    ----------
    layers
        The backbone's layers, whose ranks the record lists.
    """

    def __init__(self, layers: Sequence[str]) -> None:
        self.layers = list(layers)

    @classmethod
    def from_spec(cls, spec: BenchmarkSpec, model: MultiHead, seed: int) -> Multitask:
        """Joint training reads no benchmark setting beyond the optimiser's."""
        return cls(backbone_layers(model))

    def fit(
        self,
        model: MultiHead,
        tasks: Sequence[ContinualTask],
        spec: BenchmarkSpec,
        *,
        seed: int,
        progress: bool | None,
    ) -> dict[str, Any]:
        """Joint training (:func:`~lance_lib.continual.training.train_multitask`)."""
        out = train_multitask(model, tasks, spec, layers=self.layers, seed=seed, progress=progress)
        return {**out, "tasks": []}
