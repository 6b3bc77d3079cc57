"""What one fine-tuning run is: its frozen config and the fields of its result record.

:class:`FinetuneConfig` holds every setting of a run of LANCE's Appendix A.1 protocol
(defaults: Table 4) and is validated once, at construction, so that a bad value fails
before any data is read or any weight is loaded, naming the setting, the value and the
fix. :class:`FinetuneRecord` documents the fields of the record a run stores
(:func:`lance_lib.experiments.finetune.finetune`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from lance_lib.data import DATASETS
from lance_lib.experiments.base import ExperimentConfig
from lance_lib.experiments.cache import record_path
from lance_lib.experiments.setup import (
    check_classes,
    check_weights,
    dataset_num_classes,
    default_resolution,
    reference_sha256,
)
from lance_lib.methods import METHODS, method_settings
from lance_lib.models import MODEL_INFO
from lance_lib.paths import results_dir as default_results_dir
from lance_lib.validation import check_choice, check_int, check_real

__all__ = ["FINETUNE_MODELS", "FinetuneConfig", "FinetuneRecord"]


def _finetune_models() -> tuple[str, ...]:
    return tuple(name for name, info in MODEL_INFO.items() if info.kind == "single_task")


#: Models :class:`FinetuneConfig` accepts: the single-task models of the registry.
FINETUNE_MODELS: tuple[str, ...] = _finetune_models()

_POSITIVE_INTS = ("epochs", "batch_size", "layers", "num_batches", "measure_repeats")
_OPTIONAL_POSITIVE_INTS = ("resolution", "max_steps_per_epoch", "max_samples")

#: Learning-rate schedules over the whole run (stepped after every optimizer step):
#: ``constant`` (Appendix A.1) or ``cosine`` (annealed from ``lr`` to 0 at the last step).
LR_SCHEDULES: tuple[str, ...] = ("constant", "cosine")

#: Fields added after records existed: left out of :meth:`FinetuneConfig.settings` at
#: their default, so that every results key made before them stays what it was.
_KEYED_ONLY_WHEN_SET: dict[str, Any] = {
    "lr_schedule": "constant",
    "energy_batches": 0,
    "recalibrate": False,
}


@dataclass(frozen=True)
class FinetuneConfig(ExperimentConfig):
    """Every setting of a fine-tuning run (defaults: Table 4 of LANCE).

    Attributes
    ----------
    model
        A single-task model of :data:`lance_lib.models.MODEL_INFO`.
    dataset
        A dataset of :data:`lance_lib.data.DATASETS` (or ``"imagefolder:<path>"``).
    classes
        Fine-tuning classes (labels of ``dataset``), relabelled ``0..k-1``; ``None``:
        the default of ``weights`` (:func:`lance_lib.experiments.setup.class_split`:
        split B of CIFAR-10 for the reference weights).
    weights
        ``"reference"`` (the shipped CIFAR-10 split-A backbones), ``"pretrained-split-A"``,
        ``"IMAGENET1K_V1"`` or ``None`` (see :mod:`lance_lib.experiments.setup`).
    pretrain_epochs, pretrain_resolution
        Pretraining on split A (``"pretrained-split-A"`` only).
    resolution
        Input side; ``None``: the reference weights' resolution, else the model's native
        one (:func:`lance_lib.experiments.setup.default_resolution`).
    layers
        ``N``: the last ``N`` convolutions are trained (and treated by the method).
    method, method_options
        A name of :data:`lance_lib.methods.METHODS` and extra options of
        :func:`lance_lib.methods.apply_method` (``rank_ratio``, ``solver``, ``modes``,
        ``seed``, ``region``).
    eps, num_batches
        Energy threshold (Eq. 3) and calibration batches ``N`` (Table 4: 0.7, 100);
        ``eps`` is checked only for the methods that use it.
    epochs, lr, momentum, batch_size
        SGD settings (Table 4: 50, 0.05, no momentum stated so 0, 128).
    lr_schedule
        ``"constant"`` (Appendix A.1) or ``"cosine"`` (from ``lr`` down to 0 at the last
        step, stepped per batch): a faster road to the plateau, the same for every
        method, named as a deviation by the profiles that use it.
    energy_batches
        Diagnostic (LANCE): on this many fixed training batches, the share of each
        compressed layer's *current* input energy that its subspace captures, right
        after calibration and after every epoch (``diagnostics["subspace_energy"]`` of
        the record); 0: not measured.
    recalibrate
        Diagnostic beyond the paper (LANCE): calibrate the subspaces again (Phase I on
        the same calibration batches, the current weights) after every epoch but the
        last, to separate a stale subspace from a too small rank.
    seed
        Fixes the new classifier, data order, flips, calibration batches, LoRAct's
        sampling and (``"pretrained-split-A"``) the pretraining; not the class split.
    cache_prefix
        Compute the frozen prefix once per image and mirror
        (:class:`lance_lib.experiments.prefix_cache.PrefixCache`) and train the tail alone.
    max_steps_per_epoch
        Cut epochs short (smoke runs); ``None`` for full epochs.
    max_samples
        Keep a seeded random subset of at most this many training and test images
        (smoke runs); ``None`` keeps all.
    measure, measure_repeats
        Measure time, FLOPs and memory on the fixed batch before training.
    device
        Where the run computes (``"cpu"``, ``"cuda"``, ``"cuda:1"``); ``None``: CUDA
        when available. Not part of :meth:`settings` (a record does not depend on
        where it was computed, as it does not on the thread count); the device used is
        in the record's provenance.

    Notes
    -----
    Validation runs once, in ``__post_init__``; integral floats (``num_batches=2.0``)
    are stored as ``int``, ``classes`` as a tuple and ``method_options`` as a copy,
    so that the settings stored with a record are the ones that ran. Configs hash by
    their :meth:`key`.
    """

    kind: ClassVar[str] = "finetune"
    record_format: ClassVar[int] = 3

    model: str = "resnet18"
    dataset: str = "cifar10_mini"
    classes: tuple[int, ...] | None = None
    weights: str | None = "reference"
    pretrain_epochs: int = 10
    pretrain_resolution: int = 32
    resolution: int | None = None
    layers: int = 4
    method: str = "lance"
    method_options: Mapping[str, Any] = field(default_factory=dict)
    eps: float = 0.7
    num_batches: int = 100
    epochs: int = 50
    lr: float = 0.05
    momentum: float = 0.0
    lr_schedule: str = "constant"
    batch_size: int = 128
    seed: int = 0
    cache_prefix: bool = True
    max_steps_per_epoch: int | None = None
    max_samples: int | None = None
    measure: bool = True
    measure_repeats: int = 3
    energy_batches: int = 0
    recalibrate: bool = False
    device: str | None = None

    def __hash__(self) -> int:
        return hash(self.key())

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)

    def validate(self) -> None:
        """Check every setting; normalise integral values (see Notes of the class)."""
        check_choice("model", self.model, FINETUNE_MODELS)
        if self.dataset not in DATASETS and not str(self.dataset).startswith("imagefolder:"):
            check_choice("dataset", self.dataset, DATASETS)
        check_weights(self.model, self.weights)
        check_choice("method", self.method, METHODS)
        for name in _POSITIVE_INTS:
            self._set(name, check_int(name, getattr(self, name), minimum=1))
        for name in _OPTIONAL_POSITIVE_INTS:
            self._set(name, check_int(name, getattr(self, name), minimum=1, allow_none=True))
        if self.weights == "pretrained-split-A":
            for name in ("pretrain_epochs", "pretrain_resolution"):
                self._set(name, check_int(name, getattr(self, name), minimum=1))
        self._set("seed", check_int("seed", self.seed, minimum=0))
        self._set("lr", check_real("lr", self.lr, low=0.0, low_open=True))
        self._set(
            "momentum", check_real("momentum", self.momentum, low=0.0, high=1.0, high_open=True)
        )
        check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        self._set("energy_batches", check_int("energy_batches", self.energy_batches, minimum=0))
        for name in ("cache_prefix", "measure", "recalibrate"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        diagnostic = [n for n in ("energy_batches", "recalibrate") if getattr(self, n)]
        if diagnostic and self.method != "lance":
            raise ValueError(
                f"{diagnostic} are diagnostics of LANCE's subspaces, got method="
                f"{self.method!r}; leave them at 0 / False or use method='lance'"
            )
        self._set("classes", check_classes(self.classes, dataset_num_classes(self.dataset)))
        if not isinstance(self.method_options, Mapping):
            raise TypeError(
                f"method_options must be a mapping of apply_method options, got "
                f"{self.method_options!r}; e.g. method_options={{'rank_ratio': 0.25}}"
            )
        self._set("method_options", dict(self.method_options))
        self.method_settings()  # the method checks the options it uses (eps for LANCE ...)
        if self.device is not None:
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError) as error:
                raise ValueError(
                    f"device must name a torch device ('cpu', 'cuda', 'cuda:1') or be None, "
                    f"got {self.device!r} ({error})"
                ) from None

    def method_settings(self) -> dict[str, Any]:
        """The settings that determine the method (:func:`lance_lib.methods.method_settings`)."""
        return method_settings(
            self.method, eps=self.eps, num_batches=self.num_batches, **self.method_options
        )

    @property
    def input_resolution(self) -> int:
        """``resolution``, or its default for the model and weights."""
        return self.resolution or default_resolution(self.model, self.weights)

    def settings(self) -> dict[str, Any]:
        """The results key's input: every field but ``device``, the resolution resolved,
        and the method's own settings; fields added later only when they differ from
        their default (so older keys are unchanged)."""
        out = super().settings()
        del out["device"]
        for name, default in _KEYED_ONLY_WHEN_SET.items():
            if out[name] == default:
                del out[name]
        out["resolution"] = self.input_resolution
        out["method_settings"] = self.method_settings()
        return out

    def record_request(
        self, results_dir: str | os.PathLike | None = None
    ) -> tuple[Path, dict[str, Any], tuple[str, ...]]:
        """Where the record lives, the settings it must store, and its required fields.

        The path is ``<results_dir>/finetune-<model>-<method>-<key>.json``
        (:func:`lance_lib.paths.results_dir` ``("finetune")`` by default). With
        reference weights the stored settings also hold the weight file's SHA-256, read
        from the verified manifest (so this raises
        :class:`lance_lib.weights.ReferenceWeightsError` for a missing or altered
        file), and a record made from other weights does not answer the request.
        """
        settings = self.settings()
        folder = default_results_dir(self.kind) if results_dir is None else Path(results_dir)
        path = record_path(folder, f"{self.kind}-{self.model}-{self.method}", settings)
        if self.weights == "reference":
            settings["weights_sha256"] = reference_sha256(self.model)
        return path, settings, FinetuneRecord.fields()


@dataclass(frozen=True)
class FinetuneRecord:
    """The fields of a stored fine-tuning record (besides ``settings`` and ``provenance``).

    Attributes
    ----------
    classes
        Fine-tuning classes (labels of the dataset), in the order of the new labels.
    pretrain_classes
        Split A, the classes the starting weights were trained on, or ``None``.
    layers
        Names of the trained convolutions in the whole model.
    weights
        ``name``, ``sha256`` and ``record`` of the starting weights
        (:class:`lance_lib.experiments.setup.StartingWeights`).
    stand_in
        The model's stand-in note (MCU-class model), or ``None``.
    accuracy
        Top-1 test accuracy (fraction) after every epoch.
    train_loss, train_accuracy
        Mean training loss and accuracy (training mode) of every epoch.
    angle_deg
        Angle between the method's and BP's weight gradients on the fixed batch, at
        the start of every epoch (Fig. 2).
    epoch_seconds
        Wall-clock time of every epoch's training pass.
    final_accuracy
        ``accuracy[-1]``.
    steps_per_epoch
        Optimizer steps of one epoch.
    calibration_seconds
        Time of :func:`lance_lib.methods.apply_method`: Phase I (calibration) for LANCE,
        the layer swap for the others.
    ranks
        The method's ranks per layer after training (:meth:`MethodHandle.ranks`).
    measurements
        :func:`lance_lib.methods.measure_method` on the fixed batch (time, FLOPs,
        measured and analytic memory), or ``None`` with ``measure=False``.
    prefix_cache
        ``build_seconds``, ``bytes`` and, when measured, the step speed-up of the prefix
        cache (:func:`lance_lib.experiments.prefix_cache.step_speedup`); ``None`` without it.
    cuda_max_memory_allocated
        ``torch.cuda.max_memory_allocated`` over the training epochs (bytes) on CUDA,
        ``None`` on other devices.
    lr
        The learning rate of every epoch's first step (the schedule's values).
    diagnostics
        With ``energy_batches`` or ``recalibrate``
        (:mod:`lance_lib.experiments.finetune_diagnostics`): ``subspace_energy``
        ``{layer: [epochs + 1 fractions]}`` (after calibration, then after every
        epoch, of the subspace that trained that epoch; ``None`` with
        ``energy_batches=0``), ``energy_batches``, ``recalibrated`` and
        ``ranks_per_epoch`` (``{layer: mode ranks}`` in use during each epoch: one entry
        per epoch when recalibrated, else the one calibration); ``None`` otherwise.

    Notes
    -----
    ``lr`` and ``diagnostics`` came later: records made before them lack them and are
    still complete (:meth:`fields` lists the required fields only).
    """

    classes: list[int]
    pretrain_classes: list[int] | None
    layers: list[str]
    weights: dict[str, Any]
    stand_in: str | None
    accuracy: list[float]
    train_loss: list[float]
    train_accuracy: list[float]
    angle_deg: list[float]
    epoch_seconds: list[float]
    final_accuracy: float
    steps_per_epoch: int
    calibration_seconds: float
    ranks: dict[str, Any]
    measurements: dict[str, Any] | None
    prefix_cache: dict[str, Any] | None
    cuda_max_memory_allocated: int | None
    lr: list[float] | None = None
    diagnostics: dict[str, Any] | None = None

    @classmethod
    def fields(cls) -> tuple[str, ...]:
        """The required field names (those without a default): what every complete
        stored record holds."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING)

    def to_dict(self) -> dict[str, Any]:
        """The record's fields as a dict (JSON-ready values)."""
        return dataclasses.asdict(self)
