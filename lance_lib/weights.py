"""Reference backbones: pretrained here on CIFAR-10 class split A, shipped in the repository.

LANCE fine-tunes ImageNet-pretrained networks (Appendix A.1). ImageNet weights cannot be
downloaded on the machines this project is built on, and no package ships them, so the
project trains its own starting points with the protocol of the paper's Table 1:
pretrain on one half of the classes (split A), fine-tune on the other half (split B).
The weights are stored as fp16 state dicts under ``data/weights/`` and listed in
``data/weights/manifest.json``, one entry per model with its SHA-256, its training curve
and the command that rebuilds it (``make weights`` runs them all).

``weights="IMAGENET1K_V1"`` keeps working for users with a network; ``"reference"``
(every profile's default) loads these files, and a missing or altered file is an error
that names ``make weights``.

Command line::

    python -m lance_lib.weights list
    python -m lance_lib.weights verify
    python -m lance_lib.weights build resnet18 [--root DATA] [--threads N]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import platform
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lance_lib.io import atomic_write, ensure_writable, write_text_atomic
from lance_lib.provenance import cpu_model, git_commit

__all__ = [
    "REFERENCE_RECIPES",
    "ReferenceRecipe",
    "ReferenceWeightsError",
    "build_reference",
    "file_sha256",
    "load_reference",
    "manifest_entry",
    "read_manifest",
    "weights_dir",
]

MANIFEST = "manifest.json"


class ReferenceWeightsError(FileNotFoundError):
    """A reference weight file is missing, unlisted or differs from its manifest entry."""


def weights_dir() -> Path:
    """``data/weights/`` of the repository (or ``$LANCE_WEIGHTS`` when set)."""
    override = os.environ.get("LANCE_WEIGHTS")
    if override:
        return Path(override).expanduser()
    return Path(__file__).resolve().parent.parent / "data" / "weights"


@dataclass(frozen=True)
class ReferenceRecipe:
    """How one reference backbone is trained (see :func:`lance_lib.training.pretrain.pretrain`).

    Attributes
    ----------
    model
        A single-task model of :data:`lance_lib.models.MODEL_INFO`.
    resolution
        Training (and fine-tuning) input side in pixels: CIFAR's 32 px images are
        upsampled so that the compressed layers' spatial modes are not trivial (layer4
        of a ResNet is 2 x 2 at 64 px, the MCU stand-in's last stage 3 x 3 at 96 px).
    epochs
        Length of the cosine schedule; the curve in the manifest shows where the test
        accuracy stops improving.
    lr, batch_size, weight_decay, augment, seed
        SGD with momentum 0.9 (:func:`lance_lib.training.pretrain.pretrain`).
    dataset
        Full CIFAR-10 (25,000 training images of split A).
    split_seed
        Seed of :func:`lance_lib.data.two_class_splits`; split A is fixed for every
        experiment that uses these weights, whatever the experiment's own seed.
    """

    model: str
    resolution: int
    epochs: int
    lr: float = 0.1
    batch_size: int = 128
    weight_decay: float = 5e-4
    augment: str = "crop-flip"
    seed: int = 0
    dataset: str = "cifar10"
    split_seed: int = 0

    @property
    def classes(self) -> list[int]:
        """Split A of CIFAR-10 (the pretraining classes, in label order)."""
        from lance_lib.data import two_class_splits

        return two_class_splits(10, seed=self.split_seed)[0]

    @property
    def file(self) -> str:
        """File name under :func:`weights_dir`."""
        return f"{self.model}-{self.dataset}-splitA-r{self.resolution}.pt"

    @property
    def command(self) -> str:
        """The command that rebuilds this entry."""
        return f"python -m lance_lib.weights build {self.model}"


#: The shipped backbones. MCU stand-in: MobileNetV2-0.35 (see :func:`lance_lib.models.mcunet`).
REFERENCE_RECIPES: dict[str, ReferenceRecipe] = {
    "resnet18": ReferenceRecipe("resnet18", resolution=64, epochs=18),
    "mcunet": ReferenceRecipe("mcunet", resolution=96, epochs=20),
}


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(directory: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """Entries of ``manifest.json`` (an empty list when there is none)."""
    path = Path(directory or weights_dir()) / MANIFEST
    if not path.exists():
        return []
    entries = json.loads(path.read_text())
    if not isinstance(entries, list):
        raise ReferenceWeightsError(f"{path} must hold a JSON list of entries")
    return entries


def manifest_entry(model: str, directory: str | os.PathLike | None = None) -> dict[str, Any]:
    """The manifest entry of ``model``, its file checked against the recorded SHA-256.

    Raises
    ------
    ReferenceWeightsError
        No entry, no file, or a file whose SHA-256 differs; the message names the
        command that rebuilds it.
    """
    directory = Path(directory or weights_dir())
    fix = f"rebuild it with `make weights` (or `python -m lance_lib.weights build {model}`)"
    entries = [e for e in read_manifest(directory) if e.get("model") == model]
    if not entries:
        known = sorted(REFERENCE_RECIPES)
        raise ReferenceWeightsError(
            f"no reference weights for model {model!r} in {directory / MANIFEST} "
            f"(reference models: {known}); {fix}, or pass weights=None / 'IMAGENET1K_V1'"
        )
    entry = entries[-1]
    path = directory / entry["file"]
    if not path.is_file():
        raise ReferenceWeightsError(f"reference weights {path} are missing; {fix}")
    digest = file_sha256(path)
    if digest != entry["sha256"]:
        raise ReferenceWeightsError(
            f"reference weights {path} have SHA-256 {digest[:12]}..., the manifest says "
            f"{entry['sha256'][:12]}...; the file was altered or is incomplete: {fix}"
        )
    return entry


def load_reference(model: str, directory: str | os.PathLike | None = None) -> nn.Module:
    """The reference backbone ``model`` (split-A classifier), verified, on CPU in eval mode.

    Parameters
    ----------
    model
        A key of :data:`REFERENCE_RECIPES`.
    directory
        Folder of the manifest; default :func:`weights_dir`.

    Returns
    -------
    nn.Module
        float32 weights, with ``reference_record``: the manifest entry (file, SHA-256,
        resolution, classes, test accuracy, ...). Replace the classifier before
        fine-tuning (:func:`lance_lib.models.replace_classifier`).
    """
    from lance_lib.models import build_model

    entry = manifest_entry(model, directory)
    state = torch.load(Path(directory or weights_dir()) / entry["file"], weights_only=True)
    net = build_model(model, len(entry["classes"]))
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    net.eval()
    net.reference_record = entry
    return net


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Hold an exclusive lock on the manifest while it is read, changed and written."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".manifest.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def build_reference(
    model: str,
    *,
    root: str | os.PathLike | None = None,
    directory: str | os.PathLike | None = None,
    progress: bool = True,
    device: str | None = None,
) -> dict[str, Any]:
    """Train (or resume) the reference backbone ``model`` and record it in the manifest.

    Parameters
    ----------
    model
        A key of :data:`REFERENCE_RECIPES`.
    root
        Data root holding CIFAR-10 (:func:`lance_lib.data.data_root`); the per-epoch
        training state is kept under ``<root>/checkpoints`` so an interrupted build
        resumes.
    directory
        Where the fp16 file and the manifest go; default :func:`weights_dir`.
    progress, device
        As in :func:`lance_lib.training.pretrain.pretrain`.

    Returns
    -------
    dict
        The new manifest entry.
    """
    from lance_lib.training.pretrain import pretrain, state_dict_sha256

    if model not in REFERENCE_RECIPES:
        raise ValueError(
            f"model={model!r} has no reference recipe; choose one of {sorted(REFERENCE_RECIPES)}"
        )
    recipe = REFERENCE_RECIPES[model]
    directory = ensure_writable(directory or weights_dir(), "weights directory")
    net = pretrain(
        recipe.model,
        recipe.dataset,
        recipe.classes,
        resolution=recipe.resolution,
        epochs=recipe.epochs,
        batch_size=recipe.batch_size,
        lr=recipe.lr,
        seed=recipe.seed,
        augment=recipe.augment,
        weight_decay=recipe.weight_decay,
        root=root,
        progress=progress,
        device=device,
    )
    record = net.pretrain_record
    half = {k: v.half() if v.is_floating_point() else v for k, v in net.state_dict().items()}
    target = atomic_write(directory / recipe.file, lambda fh: torch.save(half, fh), binary=True)
    entry = {
        "model": recipe.model,
        "file": recipe.file,
        "sha256": file_sha256(target),
        "state_dict_sha256": state_dict_sha256(half),
        "dataset": "CIFAR-10 (torchvision CIFAR10 or the ImageFolder tree), class split A",
        "classes": recipe.classes,
        "resolution": recipe.resolution,
        "epochs": recipe.epochs,
        "test_accuracy": round(100 * record["test_accuracy"], 2),
        "curve_test_accuracy": [round(100 * c["test_accuracy"], 2) for c in record["curve"]],
        "curve_train_loss": [round(c["train_loss"], 4) for c in record["curve"]],
        "train_seconds": round(record["train_seconds"], 1),
        "recipe": asdict(recipe),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": cpu_model(),
        "device": str(device or ("cuda" if torch.cuda.is_available() else "cpu")),
        "threads": record["threads"],
        "commit": git_commit()["commit"],
        "command": recipe.command,
    }
    with _locked(directory):
        entries = [e for e in read_manifest(directory) if e.get("model") != model]
        entries.append(entry)
        entries.sort(key=lambda e: e["model"])
        write_text_atomic(directory / MANIFEST, json.dumps(entries, indent=2) + "\n")
    return entry


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``list``, ``verify``, ``build MODEL [MODEL ...]``."""
    parser = argparse.ArgumentParser(prog="python -m lance_lib.weights", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="print the manifest")
    sub.add_parser("verify", help="check every listed file against its SHA-256")
    build = sub.add_parser("build", help="train (or resume) reference backbones")
    build.add_argument("models", nargs="+", choices=sorted(REFERENCE_RECIPES))
    build.add_argument("--root", default=None, help="data root holding CIFAR-10")
    build.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    build.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    if args.command == "list":
        for entry in read_manifest():
            print(f"{entry['model']:10s} {entry['file']} acc {entry['test_accuracy']}%")
        return 0
    if args.command == "verify":
        failures = 0
        for entry in read_manifest():
            try:
                manifest_entry(entry["model"])
                print(f"ok      {entry['file']}")
            except ReferenceWeightsError as error:
                failures += 1
                print(f"FAILED  {error}")
        return 1 if failures else 0
    if args.threads:
        torch.set_num_threads(args.threads)
    for model in args.models:
        entry = build_reference(model, root=args.root, device=args.device)
        print(json.dumps(entry, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
