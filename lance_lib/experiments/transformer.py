"""The transformer companion: LANCE and LoRAct on the blocks of a pre-norm ViT.

The LANCE paper says its method applies to transformers but shows no transformer
result; LoRAct (arXiv:2509.23472) is built for them.  :func:`run_comparison` pretrains
the small ViT of :mod:`lance_lib.models.vit` on class split A of a dataset, fine-tunes
its last ``blocks`` blocks (and a new classifier) on split B with every method of
:data:`lance_lib.methods.BLOCK_METHODS` (the LoRAct variants once per rank
ratio), from the same weights, on the same batches, in one process, and records
accuracy, measured activation memory (the treated layers, the whole blocks, the whole
region, and the recomputation's transient) and step time as ratios to BP.  Every
method runs through the one harness (:func:`lance_lib.methods.apply_method`,
:func:`~lance_lib.methods.measure_method`, :func:`~lance_lib.methods.angle_to_bp`);
:class:`BlockMeasurement` is the record's view of a measurement.

Training runs through :func:`lance_lib.training.loop.train_epoch` and
:func:`~lance_lib.training.loop.evaluate`; the record is cached by its settings
(:func:`lance_lib.experiments.cache.cached_record`); the experiment is registered for
:func:`lance_lib.experiments.base.run_experiment` and declares the notebook's sweep.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterator, Mapping
from copy import deepcopy
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..data import class_subset, get_dataset, make_loader
from ..hosvd import check_eps
from ..methods import (
    BLOCK_METHODS,
    MethodMeasurement,
    angle_to_bp,
    apply_method,
    measure_method,
)
from ..methods.loract import check_rank_ratio
from ..methods.registry import method_label
from ..models import replace_classifier
from ..models.vit import block_linear_names, block_names, split_blocks
from ..modes import canonical_modes
from ..paths import results_dir as default_results_dir
from ..progress import progress_bar, progress_enabled
from ..training.loop import evaluate, train_epoch
from ..validation import check_choice, check_int, check_real
from .base import ExperimentConfig, register_experiment, register_sweep
from .cache import cached_record, record_path
from .prefix_cache import PrefixCache
from .setup import class_split, resolve_device, starting_model

__all__ = ["TRANSFORMER_RECORD_FIELDS", "BlockMeasurement", "TransformerConfig", "run_comparison"]

#: The fields of every transformer record (besides ``settings`` and ``provenance``).
TRANSFORMER_RECORD_FIELDS = ("classes", "pretrain", "tokens", "steps_per_epoch", "rows")

#: Methods whose runs repeat once per rank ratio.
_SKETCHED = ("loract", "loract_prenorm", "loract_prenorm_linear")


@dataclass(frozen=True)
class TransformerConfig(ExperimentConfig):
    """Every setting of a transformer comparison (:func:`run_comparison`).

    Attributes
    ----------
    model, dataset
        A transformer of :data:`lance_lib.models.MODEL_INFO` (``vit_tiny``) and a
        dataset of :data:`lance_lib.data.DATASETS`.
    resolution
        Input side (the ViT's native 32 px).
    pretrain_epochs, pretrain_lr
        Pretraining from scratch on class split A
        (:func:`lance_lib.experiments.setup.starting_model`).
    blocks
        ``k``: the last ``k`` blocks (and the classifier) are fine-tuned; the methods
        treat these blocks.
    methods
        Methods of :data:`lance_lib.methods.BLOCK_METHODS`, ``"bp"`` included
        (every ratio is to BP); the LoRAct variants run once per ``rank_ratios`` entry.
    rank_ratios
        LoRAct's ``r`` in ``(0, 1]``.
    eps, num_batches, modes
        LANCE: energy threshold (Eq. 3), calibration batches ``N``, compressed modes
        (default ``"channel"``: the features only).
    epochs, lr, momentum, batch_size
        SGD fine-tuning on split B.
    max_steps_per_epoch
        Cut epochs short (smoke runs); ``None`` for full epochs.
    measure_repeats
        Timed steps per method.
    seed
        Fixes pretraining, the new classifier, data order, flips, calibration batches
        and LoRAct's sampling.
    device
        ``"cpu"``, ``"cuda"``, ``"cuda:1"`` ...; ``None`` picks CUDA when available.
    """

    kind: ClassVar[str] = "transformer"
    record_format: ClassVar[int] = 2
    record_fields: ClassVar[tuple[str, ...]] = TRANSFORMER_RECORD_FIELDS

    model: str = "vit_tiny"
    dataset: str = "cifar10_mini"
    resolution: int = 32
    pretrain_epochs: int = 20
    pretrain_lr: float = 0.1
    blocks: int = 2
    methods: tuple[str, ...] = BLOCK_METHODS
    rank_ratios: tuple[float, ...] = (0.5, 0.25, 0.125)
    eps: float = 0.7
    num_batches: int = 20
    modes: Any = "channel"
    epochs: int = 10
    lr: float = 0.01
    momentum: float = 0.9
    batch_size: int = 64
    max_steps_per_epoch: int | None = None
    measure_repeats: int = 3
    seed: int = 0
    device: str | None = None

    def validate(self) -> None:
        """Check every setting once (names the setting, the value and the fix)."""
        set_ = object.__setattr__
        set_(self, "methods", tuple(self.methods))
        set_(self, "rank_ratios", tuple(check_rank_ratio(r) for r in self.rank_ratios))
        for method in self.methods:
            check_choice("methods entry", method, BLOCK_METHODS)
        if "bp" not in self.methods:
            raise ValueError(
                "methods must include 'bp' (the reference of every ratio); got "
                f"{list(self.methods)}"
            )
        if not self.rank_ratios and any(m in _SKETCHED for m in self.methods):
            raise ValueError("rank_ratios is empty but a LoRAct variant is in methods")
        for name in ("blocks", "epochs", "batch_size", "num_batches", "measure_repeats"):
            set_(self, name, check_int(name, getattr(self, name), minimum=1))
        for name in ("resolution", "pretrain_epochs"):
            set_(self, name, check_int(name, getattr(self, name), minimum=1))
        set_(self, "seed", check_int("seed", self.seed, minimum=0))
        set_(
            self,
            "max_steps_per_epoch",
            check_int("max_steps_per_epoch", self.max_steps_per_epoch, minimum=1, allow_none=True),
        )
        set_(self, "eps", check_eps(self.eps))
        set_(self, "modes", canonical_modes(self.modes))
        for name in ("lr", "pretrain_lr"):
            set_(self, name, check_real(name, getattr(self, name), low=0.0, low_open=True))
        set_(self, "momentum", check_real("momentum", self.momentum, low=0.0, high=1.0))
        if self.device is not None:
            resolve_device(self.device)

    def variants(self) -> list[tuple[str, float | None]]:
        """``(method, rank_ratio)`` pairs in run order (``None`` for BP and LANCE)."""
        out: list[tuple[str, float | None]] = []
        for method in self.methods:
            if method in _SKETCHED:
                out += [(method, r) for r in self.rank_ratios]
            else:
                out.append((method, None))
        return out


@dataclass(frozen=True)
class BlockMeasurement:
    """A row's measured fields: one :class:`~lance_lib.methods.MethodMeasurement` seen
    block by block.

    Attributes
    ----------
    step_s, step_s_median
        Seconds of each timed forward + backward and their median.
    layer_bytes
        What the treated modules keep for backward plus LANCE's factors.
    block_bytes
        Distinct bytes the treated blocks keep between the passes (everything saved
        inside them: LayerNorms, projections, attention, GELU), plus the factors.
    region_bytes
        Every distinct storage the step keeps between the passes (the trained blocks,
        the classifier and the loss; a frozen prefix keeps nothing) plus the factors.
    recompute_bytes
        The largest recomputation's saved bytes during backward (the pre-norm mode's
        attention or MLP); 0 when nothing is recomputed.
    peak_bytes
        ``region_bytes + recompute_bytes``.
    factor_bytes
        LANCE's factors, held as buffers.
    cuda_peak_bytes, cuda_baseline_bytes
        On CUDA, ``torch.cuda.max_memory_allocated`` during one step and the memory
        allocated before it; ``None`` elsewhere.
    """

    step_s: list[float]
    step_s_median: float
    layer_bytes: int
    block_bytes: int
    region_bytes: int
    recompute_bytes: int
    peak_bytes: int
    factor_bytes: int
    cuda_peak_bytes: int | None
    cuda_baseline_bytes: int | None

    @classmethod
    def from_measurement(cls, m: MethodMeasurement, blocks: list[str]) -> BlockMeasurement:
        """The view of ``m`` for the transformer blocks named ``blocks``."""
        factors = m.measured_factor_bytes
        return cls(
            step_s=m.step_s,
            step_s_median=m.step_s_median,
            layer_bytes=m.measured_layer_bytes,
            block_bytes=m.saved.distinct_bytes_under(blocks) + factors,
            region_bytes=m.stored_between_passes_bytes,
            recompute_bytes=m.recompute_bytes,
            peak_bytes=m.measured_region_bytes,
            factor_bytes=factors,
            cuda_peak_bytes=m.cuda_peak_bytes,
            cuda_baseline_bytes=m.cuda_baseline_bytes,
        )

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict (a record row's measured part)."""
        return dataclasses.asdict(self)


def _endless(loader: Any) -> Iterator[Any]:
    """The loader's batches again and again (fresh shuffles and flips each pass)."""
    while True:
        yield from loader


def _run(cfg: TransformerConfig, root: str | os.PathLike | None, progress: bool | None) -> dict:
    device = resolve_device(cfg.device)
    progress = progress_enabled(progress)
    classes = class_split(cfg.model, cfg.dataset, "pretrained-split-A")
    model, start_weights = starting_model(
        cfg.model,
        "pretrained-split-A",
        dataset=cfg.dataset,
        pretrain_classes=classes.pretrain,
        pretrain_epochs=cfg.pretrain_epochs,
        pretrain_resolution=cfg.resolution,
        pretrain_lr=cfg.pretrain_lr,
        seed=cfg.seed,
        root=root,
        progress=progress,
        device=device,
    )
    torch.manual_seed(cfg.seed)
    replace_classifier(model, len(classes.finetune))
    model.requires_grad_(False)
    model.to(device)
    prefix, tail = split_blocks(model, cfg.blocks)
    tail.requires_grad_(True)
    data = {}
    for split in ("train", "test"):
        images = get_dataset(
            cfg.dataset, split, root=root, resolution=cfg.resolution, augment=False
        )
        subset = class_subset(images, list(classes.finetune))
        data[split] = PrefixCache(prefix, subset, flips=split == "train", progress=progress)
    start = deepcopy(tail.state_dict())

    batches = len(data["train"]) // cfg.batch_size
    if batches == 0:
        raise ValueError(
            f"fewer training samples ({len(data['train'])}) than one batch of "
            f"batch_size={cfg.batch_size}; lower batch_size"
        )
    steps = batches if cfg.max_steps_per_epoch is None else min(batches, cfg.max_steps_per_epoch)
    test_loader = make_loader(data["test"], 256, train=False)

    def loader(seed: int) -> torch.utils.data.DataLoader:
        return make_loader(data["train"], cfg.batch_size, train=True, seed=seed, drop_last=True)

    x, y = next(iter(loader(cfg.seed + 2)))
    fixed = (x.to(device), y.to(device))

    linears, blocks = block_linear_names(tail), block_names(tail)
    rows = []
    for method, ratio in cfg.variants():
        tail.load_state_dict(start)
        label = method_label(method, ratio)
        t0 = time.perf_counter()
        handle = apply_method(
            tail,
            method,
            linears,
            calib_loader=_endless(loader(cfg.seed + 1)),
            eps=cfg.eps,
            num_batches=cfg.num_batches,
            modes=cfg.modes,
            rank_ratio=ratio or 1.0,
            seed=cfg.seed,
        )
        setup_s = time.perf_counter() - t0
        try:
            measured = BlockMeasurement.from_measurement(
                measure_method(handle, fixed, repeats=cfg.measure_repeats), blocks
            )
            params = [p for p in tail.parameters() if p.requires_grad]
            angle = angle_to_bp(handle, fixed, params)
            optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum)
            torch.manual_seed(cfg.seed)  # the same batches and flips for every method
            train_batches = _endless(loader(cfg.seed))
            accuracy, losses = [], []
            with progress_bar(total=cfg.epochs * steps, desc=label, progress=progress) as bar:
                for _ in range(cfg.epochs):
                    stats = train_epoch(
                        handle.model, train_batches, optimizer, max_steps=steps, bar=bar
                    )
                    losses.append(stats.loss)
                    with handle.bypassed() as plain:
                        accuracy.append(100.0 * evaluate(plain, test_loader))
            ranks = handle.ranks()
        finally:
            handle.restore()
        rows.append(
            {
                "method": method,
                "label": label,
                "rank_ratio": ratio,
                "settings": handle.settings.to_dict(),
                "accuracy": accuracy[-1],
                "accuracy_curve": accuracy,
                "train_loss": losses,
                "angle_deg": angle,
                "setup_s": setup_s,
                "ranks": ranks,
                **measured.to_dict(),
            }
        )
    bp = next(r for r in rows if r["method"] == "bp")
    for r in rows:
        r["accuracy_delta"] = r["accuracy"] - bp["accuracy"]
        for key in ("layer", "block", "region", "peak"):
            r[f"{key}_memory_ratio"] = r[f"{key}_bytes"] / bp[f"{key}_bytes"]
        r["step_time_ratio"] = r["step_s_median"] / bp["step_s_median"]
    return {
        "classes": {"split_a": list(classes.pretrain), "split_b": list(classes.finetune)},
        "pretrain": start_weights.record,
        "tokens": int(model.embed.num_tokens),
        "steps_per_epoch": steps,
        "rows": rows,
    }


@register_experiment(TransformerConfig)
def run_comparison(
    config: TransformerConfig | Mapping[str, Any],
    *,
    results_dir: str | os.PathLike | None = None,
    root: str | os.PathLike | None = None,
    progress: bool | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Fine-tune the last ``k`` ViT blocks with every method; one cached record per setting.

    Parameters
    ----------
    config
        A :class:`TransformerConfig` or a mapping of its fields (validated first).
    results_dir
        Folder of ``transformer-<key>.json``; default
        :func:`lance_lib.paths.results_dir` ``("transformer")``.
    root
        Data root (:func:`lance_lib.data.data_root`).
    progress
        Show tqdm bars (default: when someone watches, :mod:`lance_lib.progress`).
    force
        Recompute even if a matching record exists.

    Returns
    -------
    dict
        ``settings``, ``provenance``, ``path``; ``classes`` (splits A and B);
        ``pretrain`` (the pretraining record: test accuracy on split A, time,
        checkpoint); ``tokens``; ``steps_per_epoch``; ``rows``, one per method
        variant: ``method``, ``label``, ``rank_ratio``, ``settings``, ``accuracy``
        (top-1 % on split B's test images after the last epoch) and
        ``accuracy_curve``, ``train_loss``, ``angle_deg`` (angle to BP's gradient of
        all trained parameters on a fixed batch, before training), ``setup_s``,
        ``ranks``, the fields of :class:`BlockMeasurement`,
        and the ratios to BP of the same run: ``accuracy_delta`` (points),
        ``layer_memory_ratio``, ``block_memory_ratio``, ``region_memory_ratio``,
        ``peak_memory_ratio``, ``step_time_ratio`` (method / BP).

    Notes
    -----
    All variants start from the same weights (pretrained blocks, one seeded new
    classifier), see the same batches, and are measured in the same process, so
    the ratios compare methods, not runs.  The frozen prefix (patch embedding and
    the first blocks) is computed once per image and mirror
    (:class:`lance_lib.experiments.prefix_cache.PrefixCache`).
    """
    cfg = TransformerConfig.from_dict(config)
    settings = cfg.settings()
    folder = default_results_dir(cfg.kind) if results_dir is None else results_dir
    path = record_path(folder, cfg.kind, settings)
    return cached_record(
        path,
        settings,
        lambda: _run(cfg, root, progress),
        required=cfg.record_fields,
        force=force,
        provenance_extra={"seeds": [cfg.seed], "device": str(resolve_device(cfg.device))},
    )


@register_sweep("transformer_finetune")
def transformer_sweep(params: Mapping[str, Any]) -> list[TransformerConfig]:
    """The notebook's one comparison: its parameters named as :class:`TransformerConfig`."""
    fields = {
        "model": params.get("model_name", TransformerConfig.model),
        **{
            key: params[key]
            for key in (
                "dataset",
                "pretrain_epochs",
                "pretrain_lr",
                "blocks",
                "methods",
                "rank_ratios",
                "eps",
                "num_batches",
                "modes",
                "epochs",
                "lr",
                "momentum",
                "batch_size",
                "max_steps_per_epoch",
                "measure_repeats",
                "seed",
                "device",
            )
            if key in params
        },
    }
    return [TransformerConfig.from_dict(fields)]
