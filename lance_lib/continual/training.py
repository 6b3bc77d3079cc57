"""The task-incremental protocol of Appendix A.2: sequential tasks and joint training.

Every task trains through the project's one loop,
:func:`lance_lib.training.loop.train_epoch`, with a ``forward`` that selects the
task's head and an ``after_backward`` through which a strategy edits gradients (GPM's
projection); test accuracies come from :func:`lance_lib.training.loop.evaluate`.
What this module adds is the protocol around them:

* :class:`PlateauSchedule` - Table 7's learning-rate schedule with best-model restore,
  driven by :func:`validation_loss`;
* :func:`run_continual` - tasks one after another, filling the accuracy matrix and,
  per task, each layer's ranks and the layers that were frozen;
* :func:`train_multitask` - every task at once (the upper bound);
* :func:`layer_input_shapes` - the input shape of each layer on one batch.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from lance_lib.calibration import resolve_layers
from lance_lib.continual.metrics import average_accuracy, backward_transfer
from lance_lib.data import make_loader
from lance_lib.layers import LanceConv2d, LanceLinear, restore
from lance_lib.models import MultiHead
from lance_lib.progress import progress_bar
from lance_lib.training.loop import evaluate, train_epoch
from lance_lib.validation import check_int, check_real

if TYPE_CHECKING:
    from lance_lib.continual.specs import BenchmarkSpec, ContinualTask, TaskLayers

__all__ = [
    "PlateauSchedule",
    "TaskHooks",
    "layer_input_shapes",
    "run_continual",
    "task_accuracy",
    "train_multitask",
    "validation_loss",
]

#: ``forward(model, inputs) -> logits``.
Forward = Callable[[nn.Module, torch.Tensor], torch.Tensor]


class TaskHooks(Protocol):
    """What :func:`run_continual` calls on a strategy, task after task (its plugin hooks).

    :class:`~lance_lib.continual.strategies.SequentialStrategy` is the one
    implementation; the protocol keeps this loop free of the strategies' module.
    """

    name: str
    drop_last: bool

    def before_task(self, model: MultiHead, task: int, loader: DataLoader) -> TaskLayers:
        """Prepare task ``task``; say what each layer keeps and which are frozen."""
        ...

    def after_backward(self, model: MultiHead, task: int) -> None:
        """Adjust gradients after ``loss.backward()``."""
        ...

    def after_task(self, model: MultiHead, task: int, loader: DataLoader) -> None:
        """Finish task ``task``."""
        ...

    def report(self) -> dict[str, Any]:
        """Per-task details and the strategy's memory."""
        ...


class PlateauSchedule:
    """Learning-rate schedule of Table 7 (GPM's), with best-model restore.

    After every epoch call :meth:`step` with the validation loss. An improvement
    stores a copy of the model and resets the patience; otherwise, after ``patience``
    epochs without improvement the learning rate is divided by ``factor``; training
    stops when it falls below ``min_lr``. :meth:`restore` loads the best model.

    Parameters
    ----------
    optimizer
        Its parameter groups' ``lr`` is changed in place.
    lr, factor, patience, min_lr
        Table 7: e.g. Split CIFAR-100 ``0.01, 2, 6, 1e-5``.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        lr: float,
        factor: float,
        patience: int,
        min_lr: float,
    ) -> None:
        self.optimizer = optimizer
        self.lr = check_real("lr", lr, low=0.0, low_open=True)
        self.factor = check_real("factor", factor, low=1.0, low_open=True)
        self.patience = check_int("patience", patience, minimum=1)
        self.min_lr = check_real("min_lr", min_lr, low=0.0)
        self.best_loss = math.inf
        self.best_state: dict[str, torch.Tensor] | None = None
        self.wait = self.patience
        self._set_lr()

    def _set_lr(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr

    def step(self, val_loss: float, model: nn.Module) -> bool:
        """Record one epoch's validation loss; return True when training should stop."""
        if val_loss < self.best_loss:
            self.best_loss = val_loss
            self.best_state = copy.deepcopy(model.state_dict())
            self.wait = self.patience
            return False
        self.wait -= 1
        if self.wait > 0:
            return False
        self.lr /= self.factor
        if self.lr < self.min_lr:
            return True
        self.wait = self.patience
        self._set_lr()
        return False

    def restore(self, model: nn.Module) -> None:
        """Load the model state with the lowest validation loss (if any was recorded)."""
        if self.best_state is not None:
            model.load_state_dict(self.best_state)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _head(task: int) -> Forward:
    return lambda model, x: model(x, task)


@contextmanager
def _uncompressed(model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily put the original modules back (a calibrated batch mode fixes B)."""
    swapped = [
        (name, m) for name, m in model.named_modules() if isinstance(m, (LanceConv2d, LanceLinear))
    ]
    restore(model)
    try:
        yield model
    finally:
        for name, m in swapped:
            model.set_submodule(name, m)


@torch.no_grad()
def validation_loss(model: nn.Module, loader: Iterable[Any], forward: Forward) -> float:
    """Mean cross-entropy over ``loader`` in eval mode (what :class:`PlateauSchedule` follows).

    Training flags are restored afterwards; compressed layers are evaluated as the
    original modules (any batch size).
    """
    flags = {m: m.training for m in model.modules()}
    device = _device(model)
    total, count = 0.0, 0
    model.eval()
    try:
        with _uncompressed(model):
            for x, y in loader:
                y = torch.as_tensor(y).to(device)
                total += F.cross_entropy(forward(model, x.to(device)), y, reduction="sum").item()
                count += len(y)
    finally:
        for m, flag in flags.items():
            m.training = flag
    if count == 0:
        raise ValueError("the validation loader yielded no samples")
    return total / count


def task_accuracy(model: MultiHead, loader: Iterable[Any], task: int) -> float:
    """Test accuracy (%) of head ``task`` (:func:`lance_lib.training.loop.evaluate`)."""
    with _uncompressed(model):
        return 100.0 * evaluate(model, loader, forward=_head(task))


def layer_input_shapes(
    model: nn.Module, layers: Sequence[str], loader: Iterable[Any], forward: Forward
) -> dict[str, list[int]]:
    """Input shape of each layer on the first batch of ``loader`` (eval mode, no grad)."""
    shapes: dict[str, list[int]] = {}

    def hook(name: str) -> Callable[..., None]:
        def record(_m: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            shapes.setdefault(name, list(inputs[0].shape))

        return record

    handles = [
        m.register_forward_pre_hook(hook(name)) for name, m in resolve_layers(model, layers).items()
    ]
    flags = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad(), _uncompressed(model):
            x = next(iter(loader))[0]
            forward(model, x.to(_device(model)))
    finally:
        for h in handles:
            h.remove()
        for m, flag in flags.items():
            m.training = flag
    return {name: shapes[name] for name in layers}


def _mixed_order(dataset: Dataset, seed: int) -> Dataset:
    """``dataset`` in one fixed random order, so that evaluation batches mix classes."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    return Subset(dataset, order.tolist())


def _loaders(
    task: ContinualTask, spec: BenchmarkSpec, seed: int, drop_last: bool
) -> tuple[DataLoader, DataLoader, DataLoader]:
    """Training loader (reshuffled every epoch) and fixed-order validation / test loaders.

    The continual-learning networks normalise with batch statistics
    (``track_running_stats=False``, as GPM's), so an evaluation batch holding a single
    class would be normalised with that class's own mean and lose what tells the
    classes apart. Validation and test sets are therefore put in one fixed random
    order (seeded), the same batches at every evaluation, as the mixed order of the
    original CIFAR test files gives.
    """
    train = make_loader(task.train, spec.batch_size, train=True, seed=seed, drop_last=drop_last)
    val = make_loader(_mixed_order(task.val, seed), spec.batch_size, train=False)
    test = make_loader(_mixed_order(task.test, seed), spec.batch_size, train=False)
    return train, val, test


def _freeze_after_first_task(model: MultiHead) -> None:
    """BatchNorm parameters and biases of the backbone learn on task 1 only (GPM)."""
    for p in model.backbone.parameters():
        if p.ndim == 1:
            p.requires_grad_(False)


def _fit(
    model: MultiHead,
    train_loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    spec: BenchmarkSpec,
    val_loss: Callable[[], float],
    *,
    forward: Forward,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    after_backward: Callable[[], None] | None = None,
    desc: str,
    progress: bool | None,
) -> dict[str, Any]:
    """Epochs of :func:`train_epoch` under the :class:`PlateauSchedule`; best model restored."""
    schedule = PlateauSchedule(optimizer, spec.lr, spec.lr_factor, spec.patience, spec.min_lr)
    epochs_run, train_seconds, start = 0, 0.0, time.perf_counter()
    bar = progress_bar(range(spec.epochs), progress=progress, desc=desc)
    for _ in bar:
        model.train()
        stats = train_epoch(
            model,
            train_loader,
            optimizer,
            forward=forward,
            loss_fn=loss_fn,
            after_backward=after_backward,
            max_steps=spec.max_steps,
        )
        epochs_run += 1
        train_seconds += stats.seconds
        loss = val_loss()
        bar.set_postfix(
            train_loss=f"{stats.loss:.3f}", val_loss=f"{loss:.3f}", lr=f"{schedule.lr:.1e}"
        )
        if schedule.step(loss, model):
            break
    schedule.restore(model)
    return {
        "epochs": epochs_run,
        "last_train_loss": stats.loss,
        "best_val_loss": schedule.best_loss,
        "final_lr": schedule.lr,
        "train_seconds": train_seconds,
        "seconds": time.perf_counter() - start,
    }


def run_continual(
    model: MultiHead,
    tasks: Sequence[ContinualTask],
    strategy: TaskHooks,
    spec: BenchmarkSpec,
    *,
    seed: int = 0,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Train ``tasks`` one after another and fill the accuracy matrix.

    Task-incremental protocol (Appendix A.2): one head per task; SGD with the
    :class:`PlateauSchedule` of Table 7 on the held-out validation loss, best model
    restored at the end of each task; BatchNorm parameters and backbone biases learn
    on task 1 only. Before task ``j`` the strategy prepares it
    (:meth:`~lance_lib.continual.strategies.SequentialStrategy.before_task`, e.g.
    null-space calibration); after it, the test accuracy of every task ``i <= j``
    fills ``A[j, i]``.

    Parameters
    ----------
    model
        The multi-head network (trained in place).
    tasks
        The tasks, in order.
    strategy
        LANCE, GPM or fine-tuning (:mod:`lance_lib.continual.strategies`).
    spec
        Optimiser and schedule settings (``lr``, ``batch_size``, ``epochs``,
        ``max_steps``, ``lr_factor``, ``patience``, ``min_lr``).
    seed
        Seeds the data order of task ``j`` with ``seed + j``.
    progress
        Show a bar per task (``None``: when someone watches, see
        :func:`lance_lib.progress.progress_enabled`).

    Returns
    -------
    dict
        ``acc_matrix`` (``T x T``, zeros above the diagonal), ``ACC``, ``BWT``,
        ``training`` (per task: epochs run, the last epoch's mean training loss, the
        best validation loss, the final lr, the seconds spent in training steps and in
        the whole task with its validations),
        ``layer_ranks`` (per task, ``{layer: [rank per mode]}`` of the activation each
        layer keeps for backward), ``frozen_layers`` (per task, the layers whose
        weights could not change) and the strategy's
        :meth:`~lance_lib.continual.strategies.ContinualStrategy.report`.
    """
    if len(tasks) == 0:
        raise ValueError("no tasks to train")
    if len(tasks) > model.num_tasks:
        raise ValueError(f"{len(tasks)} tasks but the model has {model.num_tasks} heads")
    loaders = [_loaders(t, spec, seed + i, strategy.drop_last) for i, t in enumerate(tasks)]
    num = len(tasks)
    acc = [[0.0] * num for _ in range(num)]
    training, layer_ranks, frozen = [], [], []
    for j, (train_loader, val_loader, _) in enumerate(loaders):
        if j == 1:
            _freeze_after_first_task(model)
        plan = strategy.before_task(model, j, train_loader)
        layer_ranks.append(plan.layer_ranks)
        frozen.append(plan.frozen_layers)
        params = [p for p in model.backbone.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD([*params, *model.heads[j].parameters()], lr=spec.lr)
        training.append(
            _fit(
                model,
                train_loader,
                optimizer,
                spec,
                lambda j=j, v=val_loader: validation_loss(model, v, _head(j)),
                forward=_head(j),
                after_backward=lambda j=j: strategy.after_backward(model, j),
                desc=f"{strategy.name} task {j + 1}/{num}",
                progress=progress,
            )
        )
        strategy.after_task(model, j, train_loader)
        for i in range(j + 1):
            acc[j][i] = task_accuracy(model, loaders[i][2], i)
    return {
        "acc_matrix": acc,
        "ACC": average_accuracy(acc),
        "BWT": backward_transfer(acc),
        "training": training,
        "layer_ranks": layer_ranks,
        "frozen_layers": frozen,
        **strategy.report(),
    }


class _TaskLabelled(Dataset):
    """Samples of one task with labels ``task * classes + y`` (one label space for all heads)."""

    def __init__(self, dataset: Dataset, task: int, classes: int) -> None:
        self.dataset, self.offset = dataset, task * classes

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        x, y = self.dataset[index]
        return x, self.offset + int(y)


class _RoundRobin:
    """Batches of several loaders in turn (one of each, then again), until all run out."""

    def __init__(self, loaders: Sequence[DataLoader]) -> None:
        self.loaders = list(loaders)

    def __len__(self) -> int:
        return sum(len(loader) for loader in self.loaders)

    def __iter__(self) -> Iterator[Any]:
        running = [iter(loader) for loader in self.loaders]
        while running:
            for it in list(running):
                batch = next(it, None)
                if batch is None:
                    running.remove(it)
                else:
                    yield batch


def train_multitask(
    model: MultiHead,
    tasks: Sequence[ContinualTask],
    spec: BenchmarkSpec,
    *,
    layers: Sequence[str],
    seed: int = 0,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Joint training on all tasks at once (the upper bound), one head per task.

    The tasks take turns, one batch each (:class:`_RoundRobin`): every batch holds one
    task's samples, as in the sequential runs and at test time, because the networks
    normalise with batch statistics (a batch mixing CIFAR-10 with MNIST would be
    normalised unlike any test batch). The forward returns every head's logits,
    ``(B, T * C)``, and the loss picks the ``C`` logits of the sample's own task
    (labels are ``task * C + y``). An epoch is every task's epoch; with ``max_steps``
    it is ``max_steps`` steps per task, the sequential runs' budget. The schedule
    follows the summed validation loss of the tasks.

    Returns
    -------
    dict
        ``acc_matrix``, the single row ``[A[T, i]]`` (there is no sequence); ``ACC``;
        ``BWT`` ``None``; ``training``; ``layer_ranks`` and ``frozen_layers``, one
        entry for the one joint training phase (every layer keeps its full input;
        none is frozen); ``memory`` (none stored).
    """
    classes = model.classes_per_task
    loader = _RoundRobin(
        [
            make_loader(
                _TaskLabelled(t.train, i, classes),
                spec.batch_size,
                train=True,
                seed=seed + i,
                drop_last=False,
            )
            for i, t in enumerate(tasks)
        ]
    )
    vals = [
        make_loader(_mixed_order(t.val, seed + i), spec.batch_size, train=False)
        for i, t in enumerate(tasks)
    ]
    tests = [
        make_loader(_mixed_order(t.test, seed + i), spec.batch_size, train=False)
        for i, t in enumerate(tasks)
    ]
    # the sequential runs' budget: with max_steps, that many steps per task and epoch
    if spec.max_steps is not None:
        spec = spec.replace(max_steps=spec.max_steps * len(tasks))

    def every_head(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        features = m.features(x)
        return torch.cat([head(features) for head in m.heads[: len(tasks)]], dim=1)

    def own_head_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        per_task = logits.reshape(len(labels), len(tasks), classes)
        own = per_task[torch.arange(len(labels), device=labels.device), labels // classes]
        return F.cross_entropy(own, labels % classes)

    shapes = layer_input_shapes(model, layers, loader, every_head)
    optimizer = torch.optim.SGD(model.parameters(), lr=spec.lr)
    training = _fit(
        model,
        loader,
        optimizer,
        spec,
        lambda: sum(validation_loss(model, v, _head(i)) for i, v in enumerate(vals)),
        forward=every_head,
        loss_fn=own_head_loss,
        desc="multitask",
        progress=progress,
    )
    row = [task_accuracy(model, test, i) for i, test in enumerate(tests)]
    return {
        "acc_matrix": [row],
        "ACC": sum(row) / len(row),
        "BWT": None,
        "training": [training],
        "layer_ranks": [shapes],
        "frozen_layers": [[]],
        "memory": {"mb": 0.0, "definition": "joint training stores no memory (it sees all data)"},
    }
