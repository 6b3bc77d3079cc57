"""One training step on a prepared tail: the settings and inputs of step measurements.

The latency experiment (Fig. 5, :mod:`lance_lib.experiments.latency`) and the region
memory experiment (:mod:`lance_lib.experiments.region_memory`) both measure single
training steps of the trainable tail of a network prepared for fine-tuning its last
``N`` convolutions (:func:`lance_lib.experiments.setup.prepare_finetuning`): on a fixed
batch of the fine-tuning classes, with the next ``num_batches`` batches as LANCE's
calibration set (Phase I). :class:`TailProbeConfig` holds and validates the settings
they share, :meth:`TailProbeConfig.probe_batches` draws those images once, and
:func:`tail_inputs` runs them through the frozen prefix; :func:`run_cached` stores a
record as every experiment does (:func:`lance_lib.experiments.cache.cached_record`).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from lance_lib.data import DATASETS, class_subset, get_dataset, make_loader
from lance_lib.experiments.base import ExperimentConfig
from lance_lib.experiments.cache import cached_record, record_path
from lance_lib.experiments.setup import (
    Prepared,
    check_weights,
    default_resolution,
    prepare_finetuning,
    reference_sha256,
    resolve_device,
)
from lance_lib.hosvd import check_eps
from lance_lib.models import MODEL_INFO
from lance_lib.paths import results_dir as default_results_dir
from lance_lib.progress import progress_enabled
from lance_lib.validation import check_choice, check_int

__all__ = [
    "TAIL_MODELS",
    "Batch",
    "TailProbeConfig",
    "TailRecord",
    "run_cached",
    "tail_inputs",
]

#: Models whose frozen prefix :func:`lance_lib.models.split_at` can cut off.
TAIL_MODELS: tuple[str, ...] = ("resnet18", "resnet34", "mobilenet_v2", "mcunet")

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class TailProbeConfig(ExperimentConfig):
    """Settings shared by experiments that measure steps of a prepared tail.

    Attributes
    ----------
    model
        One of :data:`TAIL_MODELS`.
    dataset
        The fine-tuning dataset (a key of :data:`lance_lib.data.DATASETS` or
        ``imagefolder:<path>``); the images are its training split's, unaugmented.
    weights
        Starting weights (:data:`lance_lib.experiments.setup.WEIGHTS`); the default
        fine-tuning classes follow from them (:func:`lance_lib.experiments.setup.class_split`).
    resolution
        Input side in pixels; ``None``: the weights' own (reference) or the model's
        native resolution (:func:`lance_lib.experiments.setup.default_resolution`).
    batch_size
        Samples of the measured batch and of each calibration batch.
    eps
        Energy threshold of Eq. (3) for LANCE (and the per-step HOSVD / ASI).
    num_batches
        Calibration batches ``N`` of Phase I (Eq. 2), drawn after the measured batch.
    seed
        Fixes the batches, the new classifier and (``"pretrained-split-A"``) the
        pretraining.
    pretrain_epochs, pretrain_resolution
        ``weights="pretrained-split-A"`` only.
    device
        Where the steps run (``"cpu"``, ``"cuda"``, ``"cuda:1"``); ``None``: CUDA when
        available. Part of the results key in its resolved form: a step measured on
        one device says nothing about another.
    """

    #: The dataclass listing the fields of the kind's record (set by each kind).
    record_type: ClassVar[type]

    model: str = "resnet18"
    dataset: str = "cifar10_mini"
    weights: str | None = "reference"
    resolution: int | None = None
    batch_size: int = 128
    eps: float = 0.7
    num_batches: int = 2
    seed: int = 0
    pretrain_epochs: int = 10
    pretrain_resolution: int = 32
    device: str | None = None

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)

    def validate(self) -> None:
        """Check the shared settings; integral floats are stored as ``int``."""
        check_choice("model", self.model, TAIL_MODELS)
        if self.dataset not in DATASETS and not str(self.dataset).startswith("imagefolder:"):
            check_choice("dataset", self.dataset, DATASETS)
        check_weights(self.model, self.weights)
        for name in ("batch_size", "num_batches", "pretrain_epochs", "pretrain_resolution"):
            self._set(name, check_int(name, getattr(self, name), minimum=1))
        self._set(
            "resolution", check_int("resolution", self.resolution, minimum=8, allow_none=True)
        )
        self._set("seed", check_int("seed", self.seed, minimum=0))
        self._set("eps", check_eps(self.eps))
        try:
            resolve_device(self.device)
        except (RuntimeError, TypeError) as error:
            raise ValueError(
                f"device={self.device!r} is not a torch device ({error}); use 'cpu', "
                f"'cuda', 'cuda:1', or None for CUDA when available"
            ) from None

    @property
    def input_resolution(self) -> int:
        """``resolution``, or its default for the model and weights."""
        return self.resolution or default_resolution(self.model, self.weights)

    def settings(self) -> dict[str, Any]:
        """Every field, with ``resolution`` and ``device`` resolved (the results key)."""
        out = super().settings()
        out["resolution"] = self.input_resolution
        out["device"] = str(resolve_device(self.device))
        return out

    def record_request(
        self, results_dir: str | os.PathLike | None = None
    ) -> tuple[Path, dict[str, Any], tuple[str, ...]]:
        """Where the record lives, the settings it must store, and its required fields.

        The path is ``<results_dir>/<kind>-<model>-<key>.json``
        (:func:`lance_lib.paths.results_dir` ``(kind)`` by default). With reference
        weights the stored settings also hold the weight file's SHA-256, read from the
        verified manifest (so this raises :class:`lance_lib.weights.ReferenceWeightsError`
        for a missing or altered file), and a record made from other weights does not
        answer the request.
        """
        settings = self.settings()
        folder = default_results_dir(self.kind) if results_dir is None else Path(results_dir)
        path = record_path(folder, f"{self.kind}-{self.model}", settings)
        if self.weights == "reference":
            settings["weights_sha256"] = reference_sha256(self.model)
        return path, settings, tuple(f.name for f in dataclasses.fields(self.record_type))

    def prepare(
        self, layers: int, *, root: str | os.PathLike | None, progress: bool | None
    ) -> Prepared:
        """The network with its last ``layers`` convolutions trainable, on :attr:`device`."""
        return prepare_finetuning(
            self.model,
            weights=self.weights,
            dataset=self.dataset,
            layers=layers,
            resolution=self.input_resolution,
            pretrain_epochs=self.pretrain_epochs,
            pretrain_resolution=self.pretrain_resolution,
            seed=self.seed,
            root=root,
            device=self.device,
            progress=progress_enabled(progress),
        )

    def probe_batches(self, prep: Prepared, *, root: str | os.PathLike | None) -> list[Batch]:
        """The measured batch, then ``num_batches`` calibration batches (images, on CPU).

        Unaugmented training images of the fine-tuning classes at the prepared
        resolution, in the order of a loader shuffled with ``seed``.

        Raises
        ------
        ValueError
            The classes hold fewer than ``1 + num_batches`` full batches.
        """
        images = get_dataset(
            self.dataset, "train", root=root, resolution=prep.resolution, augment=False
        )
        subset = class_subset(images, prep.classes.finetune)
        loader = make_loader(subset, self.batch_size, train=True, seed=self.seed, drop_last=True)
        wanted = 1 + self.num_batches
        batches = list(itertools.islice(loader, wanted))
        if len(batches) < wanted:
            raise ValueError(
                f"{self.dataset} has {len(subset)} training images of the fine-tuning classes, "
                f"{len(batches)} full batches of batch_size={self.batch_size}; the measurement "
                f"needs {wanted} (1 measured + num_batches={self.num_batches} for "
                f"calibration): lower batch_size or num_batches"
            )
        return batches


@dataclass(frozen=True)
class TailRecord:
    """The fields every step-measurement record starts with: what was measured.

    Attributes
    ----------
    model_label
        :attr:`lance_lib.models.ModelInfo.label`.
    stand_in
        The model's stand-in note (the MCU-class model), or ``None``.
    resolution
        Input side in pixels.
    classes
        The fine-tuning classes of the batches (labels of the dataset).
    weights
        ``name``, ``sha256`` and ``record`` of the starting weights
        (:class:`lance_lib.experiments.setup.StartingWeights`).
    device
        Where the steps ran.
    """

    model_label: str
    stand_in: str | None
    resolution: int
    classes: list[int]
    weights: dict[str, Any]
    device: str

    @staticmethod
    def describe(model: str, prep: Prepared) -> dict[str, Any]:
        """These fields for the network ``prep`` prepared from ``model``."""
        return {
            "model_label": MODEL_INFO[model].label,
            "stand_in": prep.stand_in,
            "resolution": prep.resolution,
            "classes": list(prep.classes.finetune),
            "weights": prep.weights.to_dict(),
            "device": str(prep.device),
        }

    @staticmethod
    def provenance(model: str, prep: Prepared) -> dict[str, Any]:
        """What the record's provenance adds: ``{model: sha256}`` of the weights used.

        The reference file's SHA-256, or the starting state dict's for weights made on
        the fly (:class:`lance_lib.experiments.setup.StartingWeights`).
        """
        return {"weights": {model: prep.weights.sha256}}


def tail_inputs(
    prefix: nn.Module | None, batches: Sequence[Batch], device: torch.device
) -> list[Batch]:
    """``batches`` on ``device`` with their images run through the frozen ``prefix``.

    The prefix runs under ``torch.no_grad()``: with BatchNorm frozen its output depends
    on the image only, and it is the same for every method, so it is computed once and
    never timed. ``prefix=None`` (no split) moves the images only.
    """
    out = []
    with torch.no_grad():
        for images, labels in batches:
            images = images.to(device)
            out.append((images if prefix is None else prefix(images), labels.to(device)))
    return out


def run_cached(
    config: TailProbeConfig,
    compute: Callable[[], Mapping[str, Any]],
    *,
    results_dir: str | os.PathLike | None,
    force: bool,
) -> dict[str, Any]:
    """Reuse or compute the record of ``config`` (:meth:`TailProbeConfig.record_request`).

    Parameters
    ----------
    config
        The experiment.
    compute
        Runs the experiment; returns the record's fields.
    results_dir
        Folder of the records; default :func:`lance_lib.paths.results_dir` ``(kind)``.
    force
        Recompute even if a matching record exists.

    Raises
    ------
    lance_lib.weights.ReferenceWeightsError
        Reference weights missing or altered (checked first).
    """
    path, settings, required = config.record_request(results_dir)
    weights = {config.model: settings["weights_sha256"]} if "weights_sha256" in settings else {}
    return cached_record(
        path,
        settings,
        compute,
        required=required,
        force=force,
        provenance_extra={"seeds": [config.seed], "weights": weights, "device": settings["device"]},
    )
