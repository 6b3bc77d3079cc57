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
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lance_lib.models import build_model

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointWarning",
    "MOMENTUM",
    "WEIGHT_DECAY",
    "checkpoint_path",
    "pretrain",
    "pretrain_settings",
    "state_dict_sha256",
]

#: Bumped whenever the training recipe or the file layout changes; part of the cache key.
CHECKPOINT_FORMAT = 1
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4


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
) -> dict[str, Any]:
    """Every setting that determines the pretrained weights (the cache key).

    Parameters
    ----------
    model_name, dataset, classes, resolution, epochs, batch_size, lr, seed
        As in :func:`pretrain`.

    Returns
    -------
    dict
        JSON-serializable; includes the fixed recipe (optimizer, momentum, weight decay,
        schedule, augmentation) and :data:`CHECKPOINT_FORMAT`.
    """
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
        "weight_decay": WEIGHT_DECAY,
        "schedule": "cosine-per-step",
        "augment": "random-hflip",
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
    """Write ``payload`` with torch.save to a temporary file, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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


def _make_loaders(
    settings: dict[str, Any], root: str | os.PathLike | None
) -> tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader, int]:
    """Seeded training loader, test loader and class count for ``settings`` (data API)."""
    from lance_lib.data import class_subset, get_dataset, make_loader

    name, classes, resolution = settings["dataset"], settings["classes"], settings["resolution"]
    train = get_dataset(name, "train", root=root, resolution=resolution, augment=True)
    test = get_dataset(name, "test", root=root, resolution=resolution, augment=False)
    num_classes = len(train.classes)
    if classes is not None:
        train = class_subset(train, classes, remap=True)
        test = class_subset(test, classes, remap=True)
        num_classes = len(classes)
    return (
        make_loader(train, settings["batch_size"], train=True, seed=settings["seed"]),
        make_loader(test, 256, train=False),
        num_classes,
    )


def _train(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    *,
    epochs: int,
    lr: float,
    device: torch.device,
    progress: bool,
    desc: str,
) -> float:
    """Full training with SGD and a per-step cosine schedule; returns the last epoch's loss."""
    optimizer = torch.optim.SGD(
        model.parameters(), lr=lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * len(loader))
    criterion = nn.CrossEntropyLoss()
    model.to(device).train()
    epoch_loss = float("nan")
    with tqdm(total=epochs * len(loader), desc=desc, disable=not progress) as bar:
        for epoch in range(epochs):
            total, count = 0.0, 0
            for images, labels in loader:
                images, labels = images.to(device), labels.to(device)
                loss = criterion(model(images), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                total += loss.item() * len(labels)
                count += len(labels)
                bar.update()
            epoch_loss = total / count
            bar.set_postfix(epoch=epoch + 1, loss=f"{epoch_loss:.3f}")
    return epoch_loss


@torch.no_grad()
def _accuracy(model: nn.Module, loader: torch.utils.data.DataLoader, device: torch.device) -> float:
    model.to(device).eval()
    correct, count = 0, 0
    for images, labels in loader:
        correct += (model(images.to(device)).argmax(1).cpu() == labels).sum().item()
        count += len(labels)
    return correct / count


def _pretrain_fresh(
    settings: dict[str, Any],
    root: str | os.PathLike | None,
    device: torch.device,
    progress: bool,
    desc: str,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train from scratch as ``settings`` say; returns the model and checkpoint payload."""
    train_loader, test_loader, num_classes = _make_loaders(settings, root)
    torch.manual_seed(settings["seed"])
    model = build_model(settings["model"], num_classes)
    start = time.perf_counter()
    train_loss = _train(
        model,
        train_loader,
        epochs=settings["epochs"],
        lr=settings["lr"],
        device=device,
        progress=progress,
        desc=f"pretrain {desc}",
    )
    train_seconds = time.perf_counter() - start
    test_accuracy = _accuracy(model, test_loader, device)
    state_dict = model.cpu().state_dict()
    payload = {
        "settings": settings,
        "num_classes": num_classes,
        "metrics": {
            "train_loss": train_loss,
            "test_accuracy": test_accuracy,
            "train_seconds": train_seconds,
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
        Fixes the initialization and the data order.
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
        ``train_loss``, ``test_accuracy`` (fraction, on the same classes' test split),
        ``train_seconds`` and ``cached`` (whether the weights came from the cache).

    Notes
    -----
    Recipe: SGD with momentum 0.9 and weight decay 5e-4 (the usual from-scratch CIFAR
    recipe; fine-tuning itself uses none, Table 4), learning rate annealed to zero by a
    cosine schedule stepped every mini-batch, cross-entropy, random horizontal flips
    (the paper's only augmentation) on the training split. ``torch.manual_seed(seed)``
    precedes model construction (and the flips draw from that generator), and the
    training loader is seeded, so a run is reproducible on the same device and thread
    count. The caller's global random state is left untouched (the run happens
    under :func:`torch.random.fork_rng`), so code after ``pretrain`` draws the same
    random numbers whether the weights were trained or loaded.

    The checkpoint is written atomically (temporary file, then ``os.replace``) and
    stores the settings and a SHA-256 of the weights (:func:`state_dict_sha256`). A
    file that cannot be read (e.g. truncated), fails the hash, was made with other
    settings or does not fit the model raises a :class:`CheckpointWarning` and is
    rebuilt; it is never used silently.
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
            model, payload = _pretrain_fresh(settings, root, device, progress, path.stem)
            _save_atomic(path, payload)
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
