"""Pretraining on one class split, for runs without downloadable ImageNet weights.

LANCE fine-tunes ImageNet-pretrained models (Appendix A.1). Offline, this module follows
the protocol of the paper's Table 1 instead: pretrain from scratch on one class split
(Split A), then fine-tune on the other (Split B). Checkpoints are cached, keyed by a hash
of every setting, verified on load, and rebuilt when damaged.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lance_lib.io import atomic_write
from lance_lib.models import build_model

__all__ = [
    "AUGMENTATIONS",
    "CHECKPOINT_FORMAT",
    "CROP_PADDING",
    "CheckpointWarning",
    "MOMENTUM",
    "WEIGHT_DECAY",
    "checkpoint_path",
    "pretrain",
    "pretrain_settings",
    "state_dict_sha256",
]

#: Bumped whenever the training recipe or the file layout changes; part of the cache key.
CHECKPOINT_FORMAT = 2
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
AUGMENTATIONS = ("flip", "crop-flip")
#: Zero padding (stored pixels) of the ``"crop-flip"`` augmentation, as in the usual
#: CIFAR recipe (pad 4, random 32 x 32 crop).
CROP_PADDING = 4


class CheckpointWarning(UserWarning):
    """A cached checkpoint was unreadable or did not match; it is being rebuilt."""


def pretrain_settings(
    model_name: str,
    dataset: str,
    classes: Sequence[int] | None,
    *,
    resolution: int,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    augment: str = "flip",
    weight_decay: float = WEIGHT_DECAY,
) -> dict[str, Any]:
    """Every setting that determines the pretrained weights (the cache key).

    Parameters
    ----------
    model_name, dataset, classes, resolution, epochs, batch_size, lr, seed, augment,
    weight_decay
        As in :func:`pretrain`.

    Returns
    -------
    dict
        JSON-serializable; includes the fixed recipe (optimizer, momentum, schedule)
        and :data:`CHECKPOINT_FORMAT`.
    """
    if augment not in AUGMENTATIONS:
        raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {augment!r}")
    return {
        "format": CHECKPOINT_FORMAT,
        "model": model_name,
        "dataset": dataset,
        "classes": None if classes is None else [int(c) for c in classes],
        "resolution": int(resolution),
        "epochs": int(epochs),
        "batch_size": int(batch_size),
        "lr": float(lr),
        "optimizer": "sgd",
        "momentum": MOMENTUM,
        "weight_decay": float(weight_decay),
        "schedule": "cosine-per-step",
        "augment": augment,
        "crop_padding": CROP_PADDING if augment == "crop-flip" else 0,
        "seed": int(seed),
    }


def checkpoint_path(settings: dict[str, Any], cache_dir: str | os.PathLike) -> Path:
    """Human-readable checkpoint file name plus a short hash of all settings.

    Parameters
    ----------
    settings : dict
        From :func:`pretrain_settings`.
    cache_dir : path-like
        Directory holding the checkpoints.

    Returns
    -------
    Path
        E.g. ``resnet18-cifar10_mini-c0-4-r32-e10-s0-1a2b3c4d5e.pt``.
    """
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    classes = settings["classes"]
    if classes is None:
        tag = "all"
    elif classes == list(range(classes[0], classes[0] + len(classes))):
        tag = f"c{classes[0]}-{classes[-1]}"
    else:
        tag = f"{len(classes)}cls"
    name = (
        f"{settings['model']}-{settings['dataset']}-{tag}-r{settings['resolution']}"
        f"-e{settings['epochs']}-s{settings['seed']}-{key}.pt"
    )
    return Path(cache_dir) / name


def state_dict_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and raw bytes of every tensor (sorted by name).

    Parameters
    ----------
    state_dict : dict of str to Tensor

    Returns
    -------
    str
        Hex digest; independent of how the tensors were serialized.
    """
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _save_atomic(path: Path, payload: dict[str, Any]) -> None:
    """``torch.save`` ``payload`` to ``path`` atomically (:func:`lance_lib.io.atomic_write`)."""
    atomic_write(path, lambda fh: torch.save(payload, fh), binary=True)


def _partial_path(path: Path) -> Path:
    """Where the per-epoch training state of the checkpoint ``path`` is kept."""
    return path.with_name(path.stem + ".partial.pt")


def _from_cache(path: Path, settings: dict[str, Any]) -> tuple[nn.Module, dict] | None:
    """Model and payload of the checkpoint at ``path`` if it is intact and fits ``settings``."""
    if not path.exists():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if payload.get("settings") != settings:
            raise ValueError("it was made with different settings")
        if state_dict_sha256(payload["state_dict"]) != payload.get("sha256"):
            raise ValueError("its weights fail the SHA-256 check")
        model = build_model(settings["model"], payload["num_classes"])
        model.load_state_dict(payload["state_dict"])
    except Exception as error:  # any unreadable or mismatching file is rebuilt
        warnings.warn(
            f"checkpoint {path} is unusable ({type(error).__name__}: {error}); rebuilding it",
            CheckpointWarning,
            3,
        )
        return None
    return model, payload


def _make_datasets(
    settings: dict[str, Any], root: str | os.PathLike | None
) -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset, int]:
    """Augmented training set, test set and class count for ``settings`` (data API)."""
    from lance_lib.data import class_subset, get_dataset

    name, classes, resolution = settings["dataset"], settings["classes"], settings["resolution"]
    train = get_dataset(
        name,
        "train",
        root=root,
        resolution=resolution,
        augment=True,
        crop_padding=settings["crop_padding"],
    )
    test = get_dataset(name, "test", root=root, resolution=resolution, augment=False)
    num_classes = len(train.classes)
    if classes is not None:
        train = class_subset(train, classes, remap=True)
        test = class_subset(test, classes, remap=True)
        num_classes = len(classes)
    return train, test, num_classes


def _epoch_seed(settings: dict[str, Any], epoch: int) -> int:
    """Seed of epoch ``epoch``'s data order and augmentation (so a resumed run matches)."""
    return settings["seed"] * 100_003 + epoch + 1


def _fresh_state(
    settings: dict[str, Any], num_classes: int, steps_per_epoch: int, device: torch.device
) -> dict[str, Any]:
    """Model, optimizer and schedule at epoch 0 (seeded initialization)."""
    torch.manual_seed(settings["seed"])
    model = build_model(settings["model"], num_classes).to(device)
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=settings["lr"],
        momentum=settings["momentum"],
        weight_decay=settings["weight_decay"],
    )
    total = settings["epochs"] * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total)
    return {"model": model, "optimizer": optimizer, "scheduler": scheduler, "curve": []}


def _resume(partial: Path, settings: dict[str, Any], state: dict[str, Any]) -> None:
    """Load the per-epoch state saved at ``partial`` into ``state`` if it fits ``settings``."""
    if not partial.exists():
        return
    try:
        saved = torch.load(partial, map_location="cpu", weights_only=True)
        if saved.get("settings") != settings:
            raise ValueError("it was made with different settings")
        state["model"].load_state_dict(saved["model"])
        state["optimizer"].load_state_dict(saved["optimizer"])
        state["scheduler"].load_state_dict(saved["scheduler"])
        state["curve"] = list(saved["curve"])
    except Exception as error:
        warnings.warn(
            f"training state {partial} is unusable ({type(error).__name__}: {error}); "
            "starting from epoch 0",
            CheckpointWarning,
            4,
        )


def _pretrain_fresh(
    settings: dict[str, Any],
    root: str | os.PathLike | None,
    device: torch.device,
    progress: bool,
    path: Path,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train as ``settings`` say, resuming from the last finished epoch; returns the model
    and the checkpoint payload."""
    from lance_lib.data import make_loader
    from lance_lib.training.loop import evaluate, train_epoch

    train_set, test_set, num_classes = _make_datasets(settings, root)
    batch_size = settings["batch_size"]
    steps = len(train_set) // batch_size if len(train_set) >= batch_size else 1
    state = _fresh_state(settings, num_classes, steps, device)
    partial = _partial_path(path)
    _resume(partial, settings, state)
    model, curve = state["model"], state["curve"]
    test_loader = make_loader(test_set, 256, train=False)
    epochs = settings["epochs"]
    with tqdm(
        total=epochs * steps,
        initial=len(curve) * steps,
        desc=f"pretrain {path.stem}",
        disable=not progress,
    ) as bar:
        for epoch in range(len(curve), epochs):
            torch.manual_seed(_epoch_seed(settings, epoch))  # flips, crops, dropout
            loader = make_loader(
                train_set, batch_size, train=True, seed=_epoch_seed(settings, epoch)
            )
            model.train()
            stats = train_epoch(
                model, loader, state["optimizer"], scheduler=state["scheduler"], bar=bar
            )
            accuracy = evaluate(model, test_loader)
            curve.append(
                {
                    "epoch": epoch + 1,
                    "train_loss": stats.loss,
                    "train_accuracy": stats.accuracy,
                    "test_accuracy": accuracy,
                    "seconds": stats.seconds,
                }
            )
            bar.set_postfix(epoch=epoch + 1, loss=f"{stats.loss:.3f}", test=f"{accuracy:.3f}")
            if epoch + 1 < epochs:
                _save_atomic(
                    partial,
                    {
                        "settings": settings,
                        "model": model.state_dict(),
                        "optimizer": state["optimizer"].state_dict(),
                        "scheduler": state["scheduler"].state_dict(),
                        "curve": curve,
                    },
                )
    state_dict = model.cpu().state_dict()
    payload = {
        "settings": settings,
        "num_classes": num_classes,
        "metrics": {
            "train_loss": curve[-1]["train_loss"],
            "test_accuracy": curve[-1]["test_accuracy"],
            "train_seconds": sum(c["seconds"] for c in curve),
            "curve": curve,
            "threads": torch.get_num_threads(),
        },
        "state_dict": state_dict,
        "sha256": state_dict_sha256(state_dict),
    }
    return model, payload


def pretrain(
    model_name: str,
    dataset: str = "cifar10_mini",
    classes: Sequence[int] | None = None,
    *,
    resolution: int = 32,
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 0.05,
    seed: int = 0,
    augment: str = "flip",
    weight_decay: float = WEIGHT_DECAY,
    cache_dir: str | os.PathLike | None = None,
    root: str | os.PathLike | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
) -> nn.Module:
    """Train ``model_name`` from scratch on a class subset, or reuse the cached result.

    Parameters
    ----------
    model_name : str
        A single-task model of :data:`lance_lib.models.MODEL_INFO`.
    dataset : str
        Dataset name for :func:`lance_lib.data.get_dataset`.
    classes : sequence of int, optional
        Pretraining classes (Split A), remapped to ``0..len(classes)-1`` in the given
        order; all classes when ``None``.
    resolution : int
        Square input side.
    epochs, batch_size, lr : int, int, float
        Training length, mini-batch size and initial learning rate.
    seed : int
        Fixes the initialization, the data order and the augmentation.
    augment : {"flip", "crop-flip"}
        Random horizontal flips (the paper's only augmentation), or flips plus a random
        crop of the stored image padded by :data:`CROP_PADDING` zero pixels.
    weight_decay : float
        SGD weight decay.
    cache_dir : path-like, optional
        Checkpoint directory; default ``<data_root(root)>/checkpoints``.
    root : path-like, optional
        Data root passed to the data API.
    progress : bool
        Show a tqdm progress bar.
    device : str or torch.device, optional
        Where to train; CUDA when available, else CPU.

    Returns
    -------
    nn.Module
        On CPU in eval mode, with the classifier of the pretraining classes (use
        :func:`lance_lib.models.replace_classifier` before fine-tuning), and a
        ``pretrain_record`` dict: ``settings``, ``checkpoint``, ``num_classes``,
        ``train_loss``, ``test_accuracy`` (fraction, on the same classes' test split,
        after the last epoch), ``curve`` (one entry per epoch: ``train_loss``,
        ``train_accuracy``, ``test_accuracy``, ``seconds``), ``train_seconds``,
        ``threads`` and ``cached`` (whether the weights came from the cache).

    Notes
    -----
    Recipe: SGD with momentum 0.9 and weight decay (the usual from-scratch CIFAR
    recipe; fine-tuning itself uses none, Table 4), learning rate annealed to zero by a
    cosine schedule stepped every mini-batch, cross-entropy, the augmentation above on
    the training split, the test accuracy measured after every epoch.
    ``torch.manual_seed(seed)`` precedes model construction; every epoch reseeds the
    data order and the augmentation from ``(seed, epoch)``, so a run is reproducible on
    the same device and thread count, and a resumed run continues exactly where the
    interrupted one stopped. The caller's global random state is left untouched (the
    run happens under :func:`torch.random.fork_rng`), so code after ``pretrain`` draws
    the same random numbers whether the weights were trained or loaded.

    Long runs survive interruption: after every epoch the model, optimizer, schedule
    and curve are saved atomically beside the checkpoint (``<name>.partial.pt``), and
    a new call with the same settings resumes from there. The final checkpoint is
    written atomically and stores the settings and a SHA-256 of the weights
    (:func:`state_dict_sha256`). A file that cannot be read (e.g. truncated), fails the
    hash, was made with other settings or does not fit the model raises a
    :class:`CheckpointWarning` and is rebuilt; it is never used silently.
    """
    settings = pretrain_settings(
        model_name,
        dataset,
        classes,
        resolution=resolution,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        augment=augment,
        weight_decay=weight_decay,
    )
    if cache_dir is None:
        from lance_lib.data import data_root

        cache_dir = data_root(root) / "checkpoints"
    path = checkpoint_path(settings, cache_dir)

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # Leave the caller's random stream as it was, whether the cache is hit or not.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        cached = _from_cache(path, settings)
        if cached is None:
            model, payload = _pretrain_fresh(settings, root, device, progress, path)
            _save_atomic(path, payload)
            _partial_path(path).unlink(missing_ok=True)
        else:
            model, payload = cached
    model.cpu().eval()
    model.pretrain_record = {
        "settings": settings,
        "checkpoint": str(path),
        "num_classes": payload["num_classes"],
        **payload["metrics"],
        "cached": cached is not None,
    }
    return model
