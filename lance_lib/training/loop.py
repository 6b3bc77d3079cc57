"""The one training loop: :func:`train_epoch` and :func:`evaluate`.

Fine-tuning, pretraining, transformer fine-tuning and every continual-learning task run
through these two functions, as torchvision's reference ``train_one_epoch`` and
``evaluate`` serve all of its recipes. What differs between experiments enters through
arguments: ``forward`` picks a task head (continual learning), ``after_backward`` lets a
method edit gradients before the step (GPM's projection), ``scheduler`` is stepped per
batch.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

__all__ = ["EpochStats", "Forward", "evaluate", "train_epoch"]

#: ``forward(model, inputs) -> logits``; the default calls ``model(inputs)``.
Forward = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def _call(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    return model(inputs)


def _device_of(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


@dataclass(frozen=True)
class EpochStats:
    """What one pass over the training batches measured.

    Attributes
    ----------
    loss
        Mean training loss per sample.
    accuracy
        Top-1 training accuracy (fraction) on the batches seen, in training mode.
    steps, samples
        Optimizer steps taken and samples seen.
    seconds
        Wall-clock time of the pass.
    """

    loss: float
    accuracy: float
    steps: int
    samples: int
    seconds: float


def train_epoch(
    model: nn.Module,
    batches: Iterable[Any],
    optimizer: torch.optim.Optimizer,
    *,
    forward: Forward | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = nn.functional.cross_entropy,
    scheduler: Any | None = None,
    after_backward: Callable[[], None] | None = None,
    max_steps: int | None = None,
    bar: tqdm | None = None,
) -> EpochStats:
    """One pass of SGD-style training over ``batches`` (``(inputs, labels)`` pairs).

    Parameters
    ----------
    model
        Trained in place; its training flags are left as the caller set them (e.g.
        frozen BatchNorm in ``eval`` mode during fine-tuning).
    batches
        Iterable of ``(inputs, labels)``; moved to the model's device.
    optimizer
        Stepped once per batch.
    forward
        ``forward(model, inputs)`` returning logits; e.g. ``lambda m, x: m(x, task)``
        for one head of a multi-head network.
    loss_fn
        ``loss_fn(logits, labels)``; cross-entropy by default.
    scheduler
        Stepped after every optimizer step (per-batch schedules).
    after_backward
        Called between ``backward`` and ``step`` (gradient projection).
    max_steps
        Stop after this many batches; ``None`` runs the whole iterable.
    bar
        A tqdm bar advanced once per batch (its postfix shows the running loss).

    Returns
    -------
    EpochStats
    """
    forward = forward or _call
    device = _device_of(model)
    steps = samples = correct = 0
    total_loss = 0.0
    start = time.perf_counter()
    for inputs, labels in itertools.islice(batches, max_steps):
        inputs, labels = inputs.to(device), torch.as_tensor(labels).to(device)
        logits = forward(model, inputs)
        loss = loss_fn(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if after_backward is not None:
            after_backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        n = len(labels)
        steps, samples = steps + 1, samples + n
        total_loss += loss.detach().item() * n
        correct += int((logits.detach().argmax(1) == labels).sum())
        if bar is not None:
            bar.update()
            bar.set_postfix(loss=f"{total_loss / samples:.3f}", refresh=False)
    if steps == 0:
        raise ValueError("train_epoch got no batches: the loader is empty (check batch_size)")
    return EpochStats(
        loss=total_loss / samples,
        accuracy=correct / samples,
        steps=steps,
        samples=samples,
        seconds=time.perf_counter() - start,
    )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    forward: Forward | None = None,
    progress: bool = False,
    desc: str = "eval",
) -> float:
    """Top-1 accuracy (fraction) of ``model`` on ``loader``, in eval mode.

    Parameters
    ----------
    model
        Evaluated in ``eval`` mode; every module's training flag is restored afterwards.
    loader
        Iterable of ``(inputs, labels)``.
    forward
        As in :func:`train_epoch`.
    progress, desc
        Show a tqdm bar with this description.

    Returns
    -------
    float
        Correct predictions over samples.
    """
    forward = forward or _call
    flags = {m: m.training for m in model.modules()}
    model.eval()
    device = _device_of(model)
    correct = count = 0
    try:
        for inputs, labels in tqdm(loader, desc=desc, disable=not progress, leave=False):
            labels = torch.as_tensor(labels)
            pred = forward(model, inputs.to(device)).argmax(1).cpu()
            correct += int((pred == labels).sum())
            count += len(labels)
    finally:
        for m, flag in flags.items():
            m.training = flag
    if count == 0:
        raise ValueError("evaluate got no batches: the loader is empty")
    return correct / count
