"""Single-task fine-tuning of the last layers, for every method alike (Appendix A.1).

:func:`finetune` runs the protocol of LANCE's Appendix A.1 / Table 4: SGD with
learning rate 0.05, no weight decay, batch 128, 50 epochs, BatchNorm in evaluation
mode, the last ``N`` convolutions (and the new classifier) trainable, top-1 accuracy
on the test split after every epoch. The method (``bp``, ``lance``, ``hosvd``, ``asi``,
``loract``, ``checkpoint``) is chosen by name through
:func:`lance_lib.methods.apply_method`; the model is prepared by
:func:`lance_lib.experiments.setup.prepare_finetuning`, and every epoch is one
:func:`lance_lib.training.loop.train_epoch` and one
:func:`~lance_lib.training.loop.evaluate`, as for every other experiment.

Each run is one record of the results cache
(:func:`lance_lib.experiments.cache.cached_record`): keyed by
:meth:`FinetuneConfig.settings`, reused only when its stored settings equal the
request's and it holds every field of :class:`FinetuneRecord`, written atomically with
its provenance (commit, versions, hardware, seeds, the starting weights' SHA-256) after
the last epoch. A results folder that cannot be written fails before any work.
"""

from __future__ import annotations

import itertools
import os
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

import lance_lib.experiments.finetune_sweeps  # noqa: F401  (registers the notebooks' sweeps)
from lance_lib.data import LabeledSubset, class_subset, get_dataset, make_loader
from lance_lib.experiments.base import register_experiment
from lance_lib.experiments.cache import cached_record
from lance_lib.experiments.finetune_config import FinetuneConfig, FinetuneRecord
from lance_lib.experiments.finetune_diagnostics import SubspaceDiagnostics
from lance_lib.experiments.prefix_cache import step_speedup
from lance_lib.experiments.setup import (
    Prepared,
    dataset_num_classes,
    prepare_finetuning,
    resolve_device,
)
from lance_lib.methods import MethodHandle, angle_to_bp, apply_method, measure_method
from lance_lib.progress import progress_bar, progress_enabled
from lance_lib.training.loop import evaluate, train_epoch

__all__ = ["FinetuneConfig", "FinetuneRecord", "finetune"]

#: Test batches are evaluated this many at a time (no gradients: memory is small).
EVAL_BATCH = 256


def _cycle(loader: Iterable[Any]) -> Iterator[Any]:
    """Endless batches: the loader re-iterated (new shuffles and flips) as needed."""
    return itertools.chain.from_iterable(itertools.repeat(loader))


def _limit(dataset: LabeledSubset, max_samples: int | None, seed: int) -> LabeledSubset:
    """A seeded random subset of at most ``max_samples`` items (in their original order)."""
    if max_samples is None or max_samples >= len(dataset):
        return dataset
    keep = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    return LabeledSubset(dataset, sorted(keep[:max_samples].tolist()))


def _to(batch: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = batch
    return x.to(device), torch.as_tensor(y).to(device)


def _split_sets(
    cfg: FinetuneConfig, prep: Prepared, root: str | os.PathLike | None, *, augment: bool
) -> tuple[LabeledSubset, LabeledSubset]:
    """The fine-tuning classes' training and test images (limited to ``max_samples``)."""
    out = []
    for split in ("train", "test"):
        full = get_dataset(
            cfg.dataset,
            split,
            root=root,
            resolution=prep.resolution,
            augment=augment and split == "train",
        )
        subset = class_subset(full, prep.classes.finetune)
        out.append(_limit(subset, cfg.max_samples, cfg.seed))
    return out[0], out[1]


#: Prefix caches built in this process, keyed by what they depend on (at most a few: a
#: notebook's sweep fine-tunes many methods and settings on the same frozen prefix).
_TAIL_SETS: OrderedDict[tuple, tuple[Any, Any]] = OrderedDict()
_TAIL_SETS_KEPT = 2


def _tail_sets(
    cfg: FinetuneConfig, prep: Prepared, root: str | os.PathLike | None, progress: bool
) -> tuple[Any, Any]:
    """Training and test data of the tail, the prefix outputs reused within the process.

    The cached prefix outputs depend only on the starting weights (their SHA-256), where
    the network is split, the images (dataset, classes, resolution, ``max_samples`` and
    the seed that draws them) and the device, never on the method or the training
    settings; so the runs of one sweep build them once.
    """
    key = (
        prep.weights.sha256,
        prep.layers[0] if prep.prefix is not None else None,
        cfg.dataset,
        str(root),
        prep.resolution,
        tuple(prep.classes.finetune),
        cfg.max_samples,
        cfg.seed if cfg.max_samples is not None else None,
        str(prep.device),
    )
    if prep.prefix is not None and key in _TAIL_SETS:
        _TAIL_SETS.move_to_end(key)
        return _TAIL_SETS[key]
    train_set, test_set = _split_sets(cfg, prep, root, augment=not cfg.cache_prefix)
    # Building draws from the global stream (each DataLoader iterator takes a seed from
    # it); fork it, so that a run computes the same numbers whether it builds or reuses.
    with torch.random.fork_rng(devices=[prep.device] if prep.device.type == "cuda" else []):
        sets = (
            prep.tail_data(train_set, flips=True, progress=progress),
            prep.tail_data(test_set, flips=False, progress=progress),
        )
    if prep.prefix is not None:
        _TAIL_SETS[key] = sets
        while len(_TAIL_SETS) > _TAIL_SETS_KEPT:
            _TAIL_SETS.popitem(last=False)
    return sets


def _num_classes(cfg: FinetuneConfig, root: str | os.PathLike | None) -> int:
    """Classes of the dataset (read from the data for ``imagefolder:`` datasets)."""
    known = dataset_num_classes(cfg.dataset)
    if known is not None:
        return known
    return len(get_dataset(cfg.dataset, "test", root=root, resolution=8, augment=False).classes)


def _cache_speedup(
    cfg: FinetuneConfig,
    handle: MethodHandle,
    prep: Prepared,
    root: str | os.PathLike | None,
    cached_loader: Iterable[Any],
) -> dict[str, float]:
    """Seconds per training batch with and without the prefix cache (same method, same tail).

    Without the cache a batch is loaded and transformed from the images, run through
    the frozen prefix (no gradient) and then the tail; with it the tail runs on
    cached prefix outputs. Forward and backward, no optimiser step.
    """
    augmented, _ = _split_sets(cfg, prep, root, augment=True)
    uncached = make_loader(augmented, cfg.batch_size, train=True, seed=cfg.seed, drop_last=True)

    def run_uncached(batch: Any) -> None:
        x, y = _to(batch, prep.device)
        with torch.no_grad():
            h = prep.prefix(x)
        nn.functional.cross_entropy(handle.model(h), y).backward()

    def run_cached(batch: Any) -> None:
        x, y = _to(batch, prep.device)
        nn.functional.cross_entropy(handle.model(x), y).backward()

    try:
        return step_speedup(uncached, cached_loader, run_uncached, run_cached, num_batches=2)
    finally:
        for p in handle.model.parameters():
            p.grad = None


def _scheduler(
    cfg: FinetuneConfig, optimizer: torch.optim.Optimizer, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The per-step learning-rate schedule of ``cfg.lr_schedule`` (``None``: constant)."""
    if cfg.lr_schedule == "constant":
        return None
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)


def _train(
    cfg: FinetuneConfig,
    handle: MethodHandle,
    loader: Iterable[Any],
    test_loader: Iterable[Any],
    fixed_batch: tuple[torch.Tensor, torch.Tensor],
    diagnostics: SubspaceDiagnostics | None,
    progress: bool,
) -> dict[str, Any]:
    """The epochs: angle probe on the fixed batch, one training pass, evaluation with BP
    (and, when asked, LANCE's subspace diagnostics)."""
    net = handle.model
    params = [p for p in net.parameters() if p.requires_grad]
    probe = [handle.root.get_submodule(n).weight for n in handle.layers]
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=0.0)
    steps = len(loader) if cfg.max_steps_per_epoch is None else cfg.max_steps_per_epoch
    steps = min(steps, len(loader))
    scheduler = _scheduler(cfg, optimizer, cfg.epochs * steps)
    history: dict[str, list[float]] = {
        key: []
        for key in ("accuracy", "train_loss", "train_accuracy", "angle_deg", "epoch_seconds", "lr")
    }
    net.train()
    total = cfg.epochs * steps
    with progress_bar(total=total, desc=f"finetune {cfg.method}", progress=progress) as bar:
        for epoch in range(cfg.epochs):
            history["lr"].append(optimizer.param_groups[0]["lr"])
            history["angle_deg"].append(angle_to_bp(handle, fixed_batch, probe))
            stats = train_epoch(
                net, loader, optimizer, max_steps=steps, bar=bar, scheduler=scheduler
            )
            history["train_loss"].append(stats.loss)
            history["train_accuracy"].append(stats.accuracy)
            history["epoch_seconds"].append(stats.seconds)
            with handle.bypassed() as model:
                history["accuracy"].append(evaluate(model, test_loader))
            if diagnostics is not None:
                diagnostics.after_epoch(handle, last=epoch == cfg.epochs - 1)
            bar.set_postfix(loss=f"{stats.loss:.3f}", acc=f"{history['accuracy'][-1]:.3f}")
    return {**history, "final_accuracy": history["accuracy"][-1], "steps_per_epoch": steps}


def _run(cfg: FinetuneConfig, root: str | os.PathLike | None, progress: bool) -> dict[str, Any]:
    """Prepare, calibrate or swap, measure, train: the fields of a :class:`FinetuneRecord`."""
    torch.manual_seed(cfg.seed)  # the flips of the training data draw from the global stream
    prep = prepare_finetuning(
        cfg.model,
        weights=cfg.weights,
        dataset=cfg.dataset,
        classes=cfg.classes,
        num_classes=_num_classes(cfg, root),
        layers=cfg.layers,
        split=cfg.cache_prefix,
        resolution=cfg.input_resolution,
        pretrain_epochs=cfg.pretrain_epochs,
        pretrain_resolution=cfg.pretrain_resolution,
        seed=cfg.seed,
        root=root,
        device=cfg.device,
        progress=progress,
    )
    train_data, test_data = _tail_sets(cfg, prep, root, progress)
    prefix_cache = None
    if prep.prefix is not None:
        prefix_cache = {
            "build_seconds": train_data.build_seconds + test_data.build_seconds,
            "bytes": train_data.nbytes() + test_data.nbytes(),
        }

    def batches(seed: int) -> Any:
        return make_loader(train_data, cfg.batch_size, train=True, seed=seed, drop_last=True)

    loader = batches(cfg.seed)
    if len(loader) == 0:
        raise ValueError(
            f"batch_size={cfg.batch_size} is larger than the {len(train_data)} training "
            f"samples: no full batch; lower batch_size or raise max_samples"
        )
    test_loader = make_loader(test_data, EVAL_BATCH, train=False)
    fixed_batch = _to(next(iter(batches(cfg.seed + 2))), prep.device)

    t0 = time.perf_counter()
    handle = apply_method(
        prep.tail,
        cfg.method,
        list(prep.tail_layers),
        calib_loader=_cycle(batches(cfg.seed + 1)),
        eps=cfg.eps,
        num_batches=cfg.num_batches,
        **cfg.method_options,
    )
    calibration_seconds = time.perf_counter() - t0
    cuda = prep.device.type == "cuda"
    try:
        measurements = None
        if cfg.measure:
            measurements = measure_method(
                handle, fixed_batch, repeats=cfg.measure_repeats
            ).to_dict()
            if prefix_cache is not None:
                prefix_cache.update(_cache_speedup(cfg, handle, prep, root, loader))
        diagnostics = None
        if cfg.energy_batches or cfg.recalibrate:
            with torch.random.fork_rng(devices=[prep.device] if cuda else []):
                energy_inputs = [
                    _to(batch, prep.device)[0]
                    for batch in itertools.islice(batches(cfg.seed + 3), cfg.energy_batches)
                ]
            diagnostics = SubspaceDiagnostics(
                handle,
                energy_inputs,
                recalibrate_with=(lambda: _cycle(batches(cfg.seed + 1)))
                if cfg.recalibrate
                else None,
            )
        if cuda:
            torch.cuda.reset_peak_memory_stats(prep.device)
        history = _train(cfg, handle, loader, test_loader, fixed_batch, diagnostics, progress)
        ranks = handle.ranks()
    finally:
        handle.restore()
    record = FinetuneRecord(
        classes=list(prep.classes.finetune),
        pretrain_classes=None if prep.classes.pretrain is None else list(prep.classes.pretrain),
        layers=list(prep.layers),
        weights=prep.weights.to_dict(),
        stand_in=prep.stand_in,
        calibration_seconds=calibration_seconds,
        ranks=ranks,
        measurements=measurements,
        prefix_cache=prefix_cache,
        cuda_max_memory_allocated=torch.cuda.max_memory_allocated(prep.device) if cuda else None,
        diagnostics=None if diagnostics is None else diagnostics.to_dict(),
        **history,
    )
    # the starting weights' hash also for weights pretrained on the fly (cached_record
    # merges this into the record's provenance)
    return {**record.to_dict(), "provenance": {"weights": {cfg.model: prep.weights.sha256}}}


@register_experiment(FinetuneConfig)
def finetune(
    config: FinetuneConfig | Mapping[str, Any],
    *,
    results_dir: str | os.PathLike | None = None,
    root: str | os.PathLike | None = None,
    progress: bool | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Fine-tune the last layers with one method; one cached record per setting.

    Parameters
    ----------
    config
        A :class:`FinetuneConfig` or a mapping of its fields (validated before anything
        else: unknown keys are a ``TypeError``, bad values a ``ValueError`` naming them).
    results_dir
        Folder of the records ``finetune-<model>-<method>-<key>.json``; default
        :func:`lance_lib.paths.results_dir` ``("finetune")`` (under the repository
        root, or ``$LANCE_RESULTS``), whatever the working directory.
    root
        Data root (:func:`lance_lib.data.data_root`).
    progress
        Show tqdm progress bars; ``None``: when someone watches
        (:func:`lance_lib.progress.progress_enabled`).
    force
        Recompute even if a matching record exists.

    Returns
    -------
    dict
        The record: every field of :class:`FinetuneRecord`, ``settings`` (the
        request's, plus ``weights_sha256`` for reference weights), ``provenance``
        (:func:`lance_lib.provenance.record`: commit, versions, CPU/GPU, threads,
        device, seeds and ``weights`` ``{model: sha256}``) and ``path``.

    Raises
    ------
    lance_lib.weights.ReferenceWeightsError
        ``weights="reference"`` and the weight file is missing or altered (checked
        first, even when a record exists: a record is only as good as its weights).
    PermissionError
        The results folder cannot be written (checked before the run).

    Notes
    -----
    The record is written once, atomically, after the last epoch: an interrupted run
    leaves no record and is simply run again. The stored settings of a reference run
    include the weight file's SHA-256, so rebuilt weights invalidate older records.
    Runs are deterministic for a given seed on the same machine, device and thread
    count.
    """
    cfg = FinetuneConfig.from_dict(config)
    path, settings, required = cfg.record_request(results_dir)
    return cached_record(
        path,
        settings,
        lambda: _run(cfg, root, progress_enabled(progress)),
        required=required,
        force=force,
        provenance_extra={"seeds": [cfg.seed], "device": str(resolve_device(cfg.device))},
    )
