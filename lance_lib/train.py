"""Single-task fine-tuning of the last layers, for every method alike (Appendix A.1).

:func:`finetune` runs the protocol of LANCE's Appendix A.1 / Table 4: SGD with
learning rate 0.05, no weight decay, batch 128, 50 epochs, BatchNorm in evaluation
mode, the last ``N`` convolutions (and the new classifier) trainable, top-1 accuracy
on the test split after every epoch.  The method (``bp``, ``lance``, ``hosvd``,
``asi``, ``loract``, ``checkpoint``) is chosen by name through
:func:`lance_lib.methods.apply_method`; everything else is shared.

Each run writes one JSON file keyed by all its settings
(:func:`lance_lib.results.result_path`), atomically and only when the run is complete,
and a run whose file exists is skipped.  The file holds the settings, accuracy and
loss per epoch, the gradient angle to BP per epoch (Fig. 2: on one fixed mini-batch at
the start of each epoch), measured and analytic activation memory, FLOPs and step
time (:func:`lance_lib.methods.measure_method` on the same fixed batch), and, with the
prefix cache, its build time and measured speed-up.

Starting weights (``weights``): ``"pretrained-split-A"`` pretrains on class split A of
the dataset (:func:`lance_lib.pretrain.pretrain`, cached) and fine-tunes on split B,
the paper's Table 1 protocol, usable offline; ``"IMAGENET1K_V1"`` loads torchvision's
ImageNet weights (needs a network or a filled torch hub cache); ``None`` starts from a
random initialisation.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .data import LabeledSubset, class_subset, get_dataset, make_loader, two_class_splits
from .experiments.prefix_cache import PrefixCache, step_speedup
from .experiments.pretrain import pretrain
from .methods import (
    METHODS,
    MethodHandle,
    angle_to_bp,
    apply_method,
    measure_method,
    method_settings,
)
from .models import (
    MODEL_INFO,
    build_model,
    freeze_for_finetuning,
    last_n_convs,
    replace_classifier,
    split_at,
)
from .results import read_json, result_path, write_json_atomic

__all__ = ["FinetuneConfig", "evaluate", "finetune"]

WEIGHTS = ("pretrained-split-A", "IMAGENET1K_V1", None)
RESULT_FORMAT = 1


@dataclass
class FinetuneConfig:
    """Every setting of a fine-tuning run (defaults: Table 4 of LANCE).

    Attributes
    ----------
    model
        A single-task model of :data:`lance_lib.models.MODEL_INFO`.
    dataset
        A dataset of :data:`lance_lib.data.DATASETS`.
    classes
        Fine-tuning classes, relabelled ``0..k-1``; ``None``: class split B of
        :func:`lance_lib.data.two_class_splits` with ``weights="pretrained-split-A"``,
        every class otherwise.
    weights
        ``"pretrained-split-A"``, ``"IMAGENET1K_V1"`` or ``None`` (see module notes).
    pretrain_epochs, pretrain_resolution
        Pretraining on split A (``"pretrained-split-A"`` only).
    resolution
        Input side; ``None``: the model's native resolution.
    layers
        ``N``: the last ``N`` convolutions are trained (and treated by the method).
    method, method_options
        A name of :data:`lance_lib.methods.METHODS` and extra options of
        :func:`lance_lib.methods.apply_method` (``rank_ratio``, ``solver``, ``modes``,
        ``seed``, ``region``).
    eps, num_batches
        Energy threshold (Eq. 3) and calibration batches ``N`` (Table 4: 0.7, 100).
    epochs, lr, momentum, batch_size
        SGD settings (Table 4: 50, 0.05, no momentum stated so 0, 128).
    seed
        Fixes the initialisation, data order, flips, calibration batches and LoRAct's
        sampling.
    cache_prefix
        Compute the frozen prefix once per image and mirror (:class:`PrefixCache`)
        and train the tail alone.
    max_steps_per_epoch
        Cut epochs short (smoke runs); ``None`` for full epochs.
    max_samples
        Keep a seeded random subset of at most this many training and test images
        (smoke runs); ``None`` keeps all.
    measure, measure_repeats
        Measure time, FLOPs and memory on the fixed batch before training.
    """

    model: str = "resnet18"
    dataset: str = "cifar10_mini"
    classes: list[int] | None = None
    weights: str | None = "pretrained-split-A"
    pretrain_epochs: int = 10
    pretrain_resolution: int = 32
    resolution: int | None = None
    layers: int = 4
    method: str = "lance"
    method_options: dict[str, Any] = field(default_factory=dict)
    eps: float = 0.7
    num_batches: int = 100
    epochs: int = 50
    lr: float = 0.05
    momentum: float = 0.0
    batch_size: int = 128
    seed: int = 0
    cache_prefix: bool = True
    max_steps_per_epoch: int | None = None
    max_samples: int | None = None
    measure: bool = True
    measure_repeats: int = 3

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> FinetuneConfig:
        """Build from a mapping, with a clear error for unknown keys."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise TypeError(f"unknown fine-tuning settings {unknown}; known: {sorted(known)}")
        return cls(**dict(values))

    def validate(self) -> None:
        """Raise ``ValueError`` for settings that cannot run."""
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {METHODS}")
        if self.weights not in WEIGHTS:
            raise ValueError(f"weights must be one of {WEIGHTS}, got {self.weights!r}")
        if self.model not in MODEL_INFO:
            raise ValueError(f"unknown model {self.model!r}; known: {sorted(MODEL_INFO)}")
        for name in ("epochs", "batch_size", "layers", "num_batches", "measure_repeats"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")

    def settings(self) -> dict[str, Any]:
        """Every setting as JSON-ready values, with the method's own settings resolved."""
        out = asdict(self)
        out["resolution"] = self.resolution or MODEL_INFO[self.model].native_resolution
        out["method_settings"] = method_settings(
            self.method, eps=self.eps, num_batches=self.num_batches, **self.method_options
        )
        out["format"] = RESULT_FORMAT
        return out


def _cycle(loader: Iterable[Any]) -> Iterator[Any]:
    """Endless batches: the loader re-iterated (new shuffles and flips) as needed."""
    return itertools.chain.from_iterable(itertools.repeat(loader))


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, progress: bool = False) -> float:
    """Top-1 accuracy (fraction) of ``model`` on ``loader``; training flags are restored."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    correct = count = 0
    try:
        for x, y in tqdm(loader, desc="eval", disable=not progress, leave=False):
            pred = model(x.to(device)).argmax(1).cpu()
            correct += int((pred == torch.as_tensor(y)).sum())
            count += len(y)
    finally:
        for m, flag in flags.items():
            m.training = flag
    return correct / count


def _limit(dataset: LabeledSubset, max_samples: int | None, seed: int) -> LabeledSubset:
    """A seeded random subset of at most ``max_samples`` items (in their original order)."""
    if max_samples is None or max_samples >= len(dataset):
        return dataset
    keep = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    return LabeledSubset(dataset, sorted(keep[:max_samples].tolist()))


def _classes(cfg: FinetuneConfig, num_classes: int) -> tuple[list[int] | None, list[int]]:
    """Pretraining classes (split A or None) and fine-tuning classes."""
    if cfg.weights == "pretrained-split-A":
        split_a, split_b = two_class_splits(num_classes, seed=cfg.seed)
        return split_a, list(cfg.classes) if cfg.classes is not None else split_b
    return None, list(cfg.classes) if cfg.classes is not None else list(range(num_classes))


def _starting_model(
    cfg: FinetuneConfig, split_a: list[int] | None, root: str | os.PathLike | None, progress: bool
) -> nn.Module:
    if cfg.weights == "pretrained-split-A":
        return pretrain(
            cfg.model,
            cfg.dataset,
            split_a,
            resolution=cfg.pretrain_resolution,
            epochs=cfg.pretrain_epochs,
            seed=cfg.seed,
            root=root,
            progress=progress,
        )
    return build_model(cfg.model, 1000 if cfg.weights else 10, weights=cfg.weights)


def _run(
    cfg: FinetuneConfig,
    settings: dict[str, Any],
    root: str | os.PathLike | None,
    progress: bool,
) -> dict[str, Any]:
    torch.manual_seed(cfg.seed)
    resolution = settings["resolution"]
    train_full = get_dataset(
        cfg.dataset, "train", root=root, resolution=resolution, augment=not cfg.cache_prefix
    )
    test_full = get_dataset(cfg.dataset, "test", root=root, resolution=resolution, augment=False)
    split_a, classes = _classes(cfg, len(train_full.classes))
    train_set = _limit(class_subset(train_full, classes), cfg.max_samples, cfg.seed)
    test_set = _limit(class_subset(test_full, classes), cfg.max_samples, cfg.seed)

    model = _starting_model(cfg, split_a, root, progress)
    replace_classifier(model, len(classes))
    layer_names = [name for name, _ in last_n_convs(model, cfg.layers)]
    freeze_for_finetuning(model, layer_names)
    model.train()

    record: dict[str, Any] = {"settings": settings, "classes": classes, "layers": layer_names}
    if getattr(model, "pretrain_record", None):
        record["pretrain"] = model.pretrain_record
    if getattr(model, "stand_in", None):
        record["stand_in"] = model.stand_in

    if cfg.cache_prefix:
        prefix, net = split_at(model, layer_names[0])
        train_data = PrefixCache(prefix, train_set, flips=True, progress=progress)
        test_data = PrefixCache(prefix, test_set, flips=False, progress=progress)
        where = {id(m): n for n, m in net.named_modules()}
        net_layers = [where[id(model.get_submodule(n))] for n in layer_names]
        record["prefix_cache"] = {
            "build_seconds": train_data.build_seconds + test_data.build_seconds,
            "bytes": train_data.nbytes() + test_data.nbytes(),
        }
    else:
        net, train_data, test_data, net_layers = model, train_set, test_set, layer_names

    loader = make_loader(train_data, cfg.batch_size, train=True, seed=cfg.seed, drop_last=True)
    if len(loader) == 0:
        raise ValueError(f"fewer training samples ({len(train_data)}) than one batch")
    test_loader = make_loader(test_data, 256, train=False)
    calib = _cycle(
        make_loader(train_data, cfg.batch_size, train=True, seed=cfg.seed + 1, drop_last=True)
    )
    fixed_batch = next(
        iter(make_loader(train_data, cfg.batch_size, train=True, seed=cfg.seed + 2, drop_last=True))
    )

    t0 = time.perf_counter()
    handle = apply_method(
        net,
        cfg.method,
        net_layers,
        calib_loader=calib,
        eps=cfg.eps,
        num_batches=cfg.num_batches,
        **cfg.method_options,
    )
    record["calibration_seconds"] = time.perf_counter() - t0 if cfg.method == "lance" else 0.0
    try:
        if cfg.measure:
            record["measurements"] = measure_method(
                handle, fixed_batch, repeats=cfg.measure_repeats
            )
            if cfg.cache_prefix:
                augmented = get_dataset(
                    cfg.dataset, "train", root=root, resolution=resolution, augment=True
                )
                augmented = _limit(class_subset(augmented, classes), cfg.max_samples, cfg.seed)
                record["prefix_cache"].update(
                    _cache_speedup(cfg, handle, prefix, augmented, loader)
                )
        record.update(_train(cfg, handle, loader, test_loader, fixed_batch, progress))
        if cfg.method == "lance":
            record["ranks"] = handle.ranks()
    finally:
        handle.restore()
    return record


def _cache_speedup(
    cfg: FinetuneConfig,
    handle: MethodHandle,
    prefix: nn.Module,
    uncached_set: Any,
    cached_loader: DataLoader,
) -> dict[str, float]:
    """Seconds per training batch with and without the prefix cache (same method, same tail).

    Without the cache a batch is loaded and transformed from the images, run through
    the frozen prefix (no gradient) and then the tail; with it the tail runs on
    cached prefix outputs.  Forward and backward, no optimiser step.
    """
    uncached = make_loader(uncached_set, cfg.batch_size, train=True, seed=cfg.seed, drop_last=True)

    def run_uncached(batch: Any) -> None:
        with torch.no_grad():
            h = prefix(batch[0])
        nn.functional.cross_entropy(handle.model(h), batch[1]).backward()

    def run_cached(batch: Any) -> None:
        nn.functional.cross_entropy(handle.model(batch[0]), batch[1]).backward()

    try:
        return step_speedup(uncached, cached_loader, run_uncached, run_cached, num_batches=2)
    finally:
        for p in handle.model.parameters():
            p.grad = None


def _train(
    cfg: FinetuneConfig,
    handle: MethodHandle,
    loader: DataLoader,
    test_loader: DataLoader,
    fixed_batch: Any,
    progress: bool,
) -> dict[str, Any]:
    """The epoch loop: angle probe, SGD over the loader, evaluation."""
    net = handle.model
    params = [p for p in net.parameters() if p.requires_grad]
    probe = [handle.root.get_submodule(n).weight for n in handle.layers]
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=0.0)
    steps = (
        len(loader)
        if cfg.max_steps_per_epoch is None
        else min(len(loader), cfg.max_steps_per_epoch)
    )
    history: dict[str, list[float]] = {
        "accuracy": [],
        "train_loss": [],
        "angle_deg": [],
        "epoch_seconds": [],
    }
    net.train()
    with tqdm(total=cfg.epochs * steps, desc=f"finetune {cfg.method}", disable=not progress) as bar:
        for _ in range(cfg.epochs):
            history["angle_deg"].append(angle_to_bp(handle, fixed_batch, probe))
            start = time.perf_counter()
            total, count = 0.0, 0
            for x, y in itertools.islice(loader, steps):
                loss = nn.functional.cross_entropy(net(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.detach().item() * len(y)
                count += len(y)
                bar.update()
            history["epoch_seconds"].append(time.perf_counter() - start)
            history["train_loss"].append(total / count)
            with handle.bypassed():
                history["accuracy"].append(evaluate(net, test_loader))
            bar.set_postfix(loss=f"{total / count:.3f}", acc=f"{history['accuracy'][-1]:.3f}")
    return {**history, "final_accuracy": history["accuracy"][-1], "steps_per_epoch": steps}


def finetune(
    config: FinetuneConfig | Mapping[str, Any],
    *,
    results_dir: str | os.PathLike = "results/finetune",
    root: str | os.PathLike | None = None,
    progress: bool = True,
    force: bool = False,
) -> dict[str, Any]:
    """Fine-tune the last layers with one method; one results JSON per setting.

    Parameters
    ----------
    config
        A :class:`FinetuneConfig` or a mapping of its fields.
    results_dir
        Folder of the results files, ``finetune-<model>-<method>-<key>.json``.
    root
        Data root (:func:`lance_lib.data.data_root`).
    progress
        Show tqdm progress bars.
    force
        Recompute even if the results file exists.

    Returns
    -------
    dict
        The stored result: ``settings``, ``classes``, ``layers``, per-epoch
        ``accuracy`` (top-1 fraction on the test split), ``train_loss``,
        ``angle_deg`` (gradient angle to BP on the fixed batch, start of each
        epoch), ``epoch_seconds``, ``final_accuracy``, ``measurements`` (see
        :func:`lance_lib.methods.measure_method`), ``prefix_cache`` (build time,
        bytes, measured speed-up) and, for LANCE, ``ranks`` and
        ``calibration_seconds``; plus ``path``, where it is stored.

    Notes
    -----
    The file is written once, atomically, after the last epoch: an interrupted run
    leaves no results file and is simply run again.  Runs are deterministic for a
    given seed on the same machine and thread count.
    """
    cfg = config if isinstance(config, FinetuneConfig) else FinetuneConfig.from_dict(config)
    cfg.validate()
    settings = cfg.settings()
    path = result_path(results_dir, f"finetune-{cfg.model}-{cfg.method}", settings)
    if not force:
        stored = read_json(path)
        if stored is not None:
            return {**stored, "path": str(path)}
    result = _run(cfg, settings, root, progress)
    write_json_atomic(path, result)
    return {**result, "path": str(Path(path))}
