"""Transformer companion: LANCE and LoRAct on the blocks of a pre-norm ViT (issue 7).

The small ViT of :mod:`lance_lib.vit` is pretrained on class split A of a dataset
(:func:`lance_lib.pretrain.pretrain`, cached like the CNNs) and its last ``k`` blocks
are fine-tuned on split B with one of four methods, every one of them acting on all
``nn.Linear`` layers of the trained blocks (``qkv``, ``proj``, ``fc1``, ``fc2``):

``bp``
    plain backpropagation.
``lance``
    one-shot HOSVD calibration of each layer's ``(batch, tokens, features)`` input
    (Eq. 2-3 of LANCE) and layers that keep only the core of Eq. (1)
    (:mod:`lance_lib.layers`).
``loract``
    layer-wise LoRAct: every Linear input sketched on its own at rank ratio ``r``
    (:class:`lance_lib.baselines.LoRActLinear`).
``loract_prenorm``
    LoRAct's pre-norm trick (:class:`lance_lib.baselines.LoRActPreNorm`) on each
    LayerNorm + projection unit (``norm_qkv``, ``norm_fc1``); the projections whose
    input is not a LayerNorm output (``proj``, ``fc2``) are layer-wise LoRAct.

:func:`run_comparison` runs every method from the same pretrained weights in one
process and reports accuracy, measured activation memory (saved-tensor bytes) and
step time as ratios to BP measured in that run.

LANCE's modes for 3-D inputs
----------------------------
By default the token and feature modes are compressed and the batch mode is not
(``modes="no_batch"``; any indices can be passed):

* feature mode (2): the mode the weight acts on, where LoRAct also compresses; its
  covariance (Eq. 2) carries the low-rank structure of the token embeddings;
* token mode (1): tokens are patch positions, fixed for a given input size, so their
  covariance over calibration batches is a stable statistic, like the spatial modes
  of a convolution's input; its factor ties the layer to the calibrated token count
  (another count raises a clear error, :func:`lance_lib.layers.check_input_shape`);
* batch mode (0): samples in a shuffled batch are exchangeable, so the expected batch
  covariance is ``a I + b 1 1^T``: apart from the mean direction every direction has
  the same energy, no subspace is preferred, and Eq. (3) keeps a large share of the
  batch directions (about half of them at ``eps = 0.7`` on the pretrained
  ``vit_tiny``, whose token and feature modes keep far fewer) while tying training to
  the calibrated batch size.  Eq. (1) compresses all modes; for a transformer this one
  buys least.
"""

from __future__ import annotations

import itertools
import os
import statistics
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from copy import deepcopy
from dataclasses import asdict, dataclass, field, fields
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .accounting import gradient_angle, measure_saved_tensors, time_step
from .baselines import LoRActPreNorm
from .calibration import Modes
from .data import class_subset, get_dataset, make_loader, two_class_splits
from .experiments.prefix_cache import PrefixCache
from .experiments.pretrain import pretrain
from .methods import MethodHandle, apply_method
from .models import replace_classifier
from .models.vit import NormLinear, block_linear_names, split_blocks
from .results import cached_json, result_path
from .train import _cycle, evaluate

__all__ = [
    "TRANSFORMER_METHODS",
    "BlockMethod",
    "TransformerConfig",
    "angle_to_bp",
    "apply_block_method",
    "measure_block_method",
    "method_label",
    "run_comparison",
]

TRANSFORMER_METHODS = ("bp", "lance", "loract", "loract_prenorm")

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class BlockMethod:
    """A method applied to every block of a transformer; see :func:`apply_block_method`.

    Attributes
    ----------
    name
        One of :data:`TRANSFORMER_METHODS`.
    model
        The module to train (modified in place).
    settings
        The method's settings (JSON-serialisable).
    treated
        Names of the modules whose saved tensors are "the compressed layers": the
        blocks' Linear layers, or for ``loract_prenorm`` its LayerNorm + projection
        units and the remaining Linear layers.
    handle
        The :class:`lance_lib.methods.MethodHandle` of the Linear layers swapped
        through :func:`lance_lib.methods.apply_method`.
    units
        ``loract_prenorm`` only: unit name -> (original :class:`NormLinear`,
        :class:`LoRActPreNorm`).
    """

    name: str
    model: nn.Module
    settings: dict[str, Any]
    treated: list[str]
    handle: MethodHandle
    units: dict[str, tuple[nn.Module, nn.Module]] = field(default_factory=dict)

    def _swap_units(self, use_originals: bool) -> None:
        for name, (original, replacement) in self.units.items():
            self.model.set_submodule(name, original if use_originals else replacement)

    @contextmanager
    def bypassed(self) -> Iterator[nn.Module]:
        """Plain BP on the same weights inside the block (for evaluation and reference)."""
        self._swap_units(use_originals=True)
        try:
            with self.handle.bypassed() as model:
                yield model
        finally:
            self._swap_units(use_originals=False)

    def restore(self) -> nn.Module:
        """Put the original modules back; returns the model."""
        self._swap_units(use_originals=True)
        self.units.clear()
        return self.handle.restore()

    def factor_bytes(self) -> int:
        """Bytes of LANCE's factors, held as buffers between steps (0 for the others)."""
        return self.handle.factor_bytes()

    def ranks(self) -> dict[str, Any]:
        """LANCE's mode ranks or LoRAct's sketch rank ``k`` per treated module."""
        out = self.handle.ranks()
        out.update({name: unit.rank for name, (_, unit) in self.units.items()})
        return out


def apply_block_method(
    model: nn.Module,
    method: str,
    *,
    calib_loader: Iterable[Any] | None = None,
    eps: float = 0.7,
    num_batches: int = 100,
    modes: Modes = "no_batch",
    rank_ratio: float = 0.25,
    seed: int = 0,
) -> BlockMethod:
    """Apply ``method`` to every Linear layer of every transformer block of ``model``.

    Parameters
    ----------
    model
        A :class:`lance_lib.vit.VisionTransformer`, or the tail of
        :func:`lance_lib.vit.split_blocks` to treat the trained blocks only.
        Modified in place; :meth:`BlockMethod.restore` undoes it.
    method
        One of :data:`TRANSFORMER_METHODS`.
    calib_loader
        ``lance``: calibration batches (Phase I).
    eps, num_batches
        ``lance``: energy threshold of Eq. (3) and calibration batches ``N``.
    modes
        ``lance``: input modes of the ``(batch, tokens, features)`` activations to
        compress; default ``"no_batch"`` (tokens and features, see the module notes).
    rank_ratio, seed
        ``loract`` / ``loract_prenorm``: sketch rank ratio ``r`` and sampling seed.

    Returns
    -------
    BlockMethod
    """
    if method not in TRANSFORMER_METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {TRANSFORMER_METHODS}")
    linears = block_linear_names(model)
    if not linears:
        raise ValueError("the model has no transformer blocks (modules named 'blocks.*')")
    if method != "loract_prenorm":
        handle = apply_method(
            model,
            method,
            linears,
            calib_loader=calib_loader,
            eps=eps,
            num_batches=num_batches,
            modes=modes,
            rank_ratio=rank_ratio,
            seed=seed,
        )
        return BlockMethod(method, model, _settings(handle.settings, method), linears, handle)
    modules = dict(model.named_modules())
    units = [n for n, m in modules.items() if isinstance(m, NormLinear) and n.startswith("blocks.")]
    in_units = {f"{u}.linear" for u in units}
    rest = [n for n in linears if n not in in_units]
    handle = apply_method(model, "loract", rest, rank_ratio=rank_ratio, seed=seed)
    swapped = {}
    for name in units:
        original = modules[name]
        unit = LoRActPreNorm(original.norm, original.linear, name, rank_ratio=rank_ratio, seed=seed)
        model.set_submodule(name, unit)
        swapped[name] = (original, unit)
    settings = _settings(handle.settings, method)
    return BlockMethod(method, model, settings, units + rest, handle, swapped)


def _settings(settings: Mapping[str, Any], method: str) -> dict[str, Any]:
    out = {**settings, "method": method}
    if method.startswith("loract"):
        out["flatten"] = "BT_x_features"  # one row per token of every sample
    return out


def measure_block_method(
    bm: BlockMethod, batch: Batch, *, repeats: int = 3, warmup: int = 1
) -> dict[str, Any]:
    """Step time and saved-tensor bytes of one training step of ``bm`` on ``batch``.

    Returns
    -------
    dict
        ``step_s`` (forward and backward, list over ``repeats``) and its median
        ``step_s_median``; ``layer_bytes``: what the treated modules keep for
        backward (saved-tensor hooks, :func:`lance_lib.accounting.measure_saved_tensors`)
        plus LANCE's factors; ``region_bytes``: every distinct storage autograd keeps
        in the step (the trained blocks, the classifier and the loss; a frozen
        prefix keeps nothing) plus the factors; ``factor_bytes``.

    Notes
    -----
    Gradients are cleared before and after; weights are not changed.  For
    ``loract_prenorm`` the treated units also stand in for the LayerNorm's stored
    input, which BP and the other methods keep outside the treated Linear layers
    (it is in ``region_bytes`` for every method).
    """
    model = bm.model
    x, y = batch

    def zero() -> None:
        for p in model.parameters():
            p.grad = None

    def step() -> None:
        zero()
        F.cross_entropy(model(x), y).backward()

    times = time_step(step, repeats=repeats, warmup=warmup)
    zero()
    report = measure_saved_tensors(model, lambda: F.cross_entropy(model(x), y))
    factors = bm.factor_bytes()
    return {
        "step_s": times,
        "step_s_median": statistics.median(times),
        "layer_bytes": report.bytes_of(bm.treated) + factors,
        "region_bytes": report.activation_bytes + factors,
        "factor_bytes": factors,
    }


def _gradients(model: nn.Module, batch: Batch, params: Sequence[torch.Tensor]) -> list:
    for p in model.parameters():
        p.grad = None
    F.cross_entropy(model(batch[0]), batch[1]).backward()
    grads = [p.grad.detach().clone() for p in params]
    for p in model.parameters():
        p.grad = None
    return grads


def angle_to_bp(bm: BlockMethod, batch: Batch) -> float:
    """Angle (degrees) between BP's and the method's gradients of every trainable parameter."""
    params = [p for p in bm.model.parameters() if p.requires_grad]
    with bm.bypassed() as model:
        reference = _gradients(model, batch, params)
    return gradient_angle(reference, _gradients(bm.model, batch, params))


def method_label(method: str, rank_ratio: float | None = None) -> str:
    """Display name, e.g. ``"LoRAct pre-norm r=1/4"``."""
    base = {
        "bp": "BP",
        "lance": "LANCE",
        "loract": "LoRAct layer-wise",
        "loract_prenorm": "LoRAct pre-norm",
    }[method]
    if rank_ratio is None:
        return base
    return f"{base} r={Fraction(rank_ratio).limit_denominator(1024)}"


@dataclass
class TransformerConfig:
    """Every setting of a transformer comparison (:func:`run_comparison`).

    Attributes
    ----------
    model, dataset
        A transformer of :data:`lance_lib.models.MODEL_INFO` (``vit_tiny``) and a
        dataset of :data:`lance_lib.data.DATASETS`.
    resolution
        Input side (the ViT's native 32 px).
    pretrain_epochs, pretrain_lr
        Pretraining from scratch on class split A (:func:`lance_lib.pretrain.pretrain`).
    blocks
        ``k``: the last ``k`` blocks (and the classifier) are fine-tuned; the methods
        treat every Linear layer of these blocks.
    methods
        Methods of :data:`TRANSFORMER_METHODS`; the LoRAct variants run once per
        entry of ``rank_ratios``.
    rank_ratios
        LoRAct's ``r``.
    eps, num_batches, modes
        LANCE: energy threshold (Eq. 3), calibration batches ``N``, compressed modes.
    epochs, lr, momentum, batch_size
        SGD fine-tuning on split B.
    max_steps_per_epoch
        Cut epochs short (smoke runs); ``None`` for full epochs.
    measure_repeats
        Timed steps per method.
    seed
        Fixes the class split, pretraining, the new classifier, data order, flips,
        calibration batches and LoRAct's sampling.
    """

    model: str = "vit_tiny"
    dataset: str = "cifar10_mini"
    resolution: int = 32
    pretrain_epochs: int = 20
    pretrain_lr: float = 0.1
    blocks: int = 2
    methods: list[str] = field(default_factory=lambda: list(TRANSFORMER_METHODS))
    rank_ratios: list[float] = field(default_factory=lambda: [0.5, 0.25, 0.125])
    eps: float = 0.7
    num_batches: int = 20
    modes: Any = "no_batch"
    epochs: int = 10
    lr: float = 0.01
    momentum: float = 0.9
    batch_size: int = 64
    max_steps_per_epoch: int | None = None
    measure_repeats: int = 3
    seed: int = 0

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TransformerConfig:
        """Build from a mapping, with a clear error for unknown keys."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise TypeError(f"unknown transformer settings {unknown}; known: {sorted(known)}")
        return cls(**dict(values))

    def validate(self) -> None:
        """Raise ``ValueError`` for settings that cannot run."""
        bad = [m for m in self.methods if m not in TRANSFORMER_METHODS]
        if bad or "bp" not in self.methods:
            raise ValueError(
                f"methods must include 'bp' (the reference of every ratio) and come from "
                f"{TRANSFORMER_METHODS}; got {self.methods}"
            )
        for name in ("blocks", "epochs", "batch_size", "num_batches", "measure_repeats"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")

    def variants(self) -> list[tuple[str, float | None]]:
        """``(method, rank_ratio)`` pairs in run order (``None`` for BP and LANCE)."""
        out: list[tuple[str, float | None]] = []
        for method in self.methods:
            if method.startswith("loract"):
                out += [(method, float(r)) for r in self.rank_ratios]
            else:
                out.append((method, None))
        return out


def _finetune(
    bm: BlockMethod,
    loader: Iterable[Batch],
    test_loader: Iterable[Batch],
    cfg: TransformerConfig,
    steps: int,
    progress: bool,
    desc: str,
) -> dict[str, list[float]]:
    """SGD on the trainable parameters; test accuracy (%) after every epoch."""
    params = [p for p in bm.model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum)
    history: dict[str, list[float]] = {"accuracy": [], "train_loss": []}
    bm.model.train()
    with tqdm(total=cfg.epochs * steps, desc=desc, disable=not progress) as bar:
        for _ in range(cfg.epochs):
            total, count = 0.0, 0
            for x, y in itertools.islice(loader, steps):
                loss = F.cross_entropy(bm.model(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.item() * len(y)
                count += len(y)
                bar.update()
            history["train_loss"].append(total / count)
            with bm.bypassed() as model:
                history["accuracy"].append(100.0 * evaluate(model, test_loader))
    return history


def _run(cfg: TransformerConfig, root: str | os.PathLike | None, progress: bool) -> dict:
    torch.manual_seed(cfg.seed)
    train = get_dataset(cfg.dataset, "train", root=root, resolution=cfg.resolution, augment=False)
    test = get_dataset(cfg.dataset, "test", root=root, resolution=cfg.resolution, augment=False)
    split_a, split_b = two_class_splits(len(train.classes), seed=cfg.seed)
    model = pretrain(
        cfg.model,
        cfg.dataset,
        split_a,
        resolution=cfg.resolution,
        epochs=cfg.pretrain_epochs,
        lr=cfg.pretrain_lr,
        seed=cfg.seed,
        root=root,
        progress=progress,
    )
    replace_classifier(model, len(split_b))
    model.requires_grad_(False)
    prefix, tail = split_blocks(model, cfg.blocks)
    tail.requires_grad_(True)
    train_data = PrefixCache(prefix, class_subset(train, split_b), progress=progress)
    test_data = PrefixCache(prefix, class_subset(test, split_b), flips=False, progress=progress)
    start = deepcopy(tail.state_dict())

    batches = len(train_data) // cfg.batch_size
    if batches == 0:
        raise ValueError(f"fewer training samples ({len(train_data)}) than one batch")
    steps = batches if cfg.max_steps_per_epoch is None else min(batches, cfg.max_steps_per_epoch)
    test_loader = make_loader(test_data, 256, train=False)
    fixed = next(iter(make_loader(train_data, cfg.batch_size, train=True, seed=cfg.seed + 2)))

    rows = []
    for method, ratio in cfg.variants():
        tail.load_state_dict(start)
        calib = _cycle(make_loader(train_data, cfg.batch_size, train=True, seed=cfg.seed + 1))
        t0 = time.perf_counter()
        bm = apply_block_method(
            tail,
            method,
            calib_loader=calib,
            eps=cfg.eps,
            num_batches=cfg.num_batches,
            modes=cfg.modes,
            rank_ratio=ratio or 1.0,
            seed=cfg.seed,
        )
        setup_s = time.perf_counter() - t0
        try:
            measured = measure_block_method(bm, fixed, repeats=cfg.measure_repeats)
            angle = angle_to_bp(bm, fixed)
            label = method_label(method, ratio)
            torch.manual_seed(cfg.seed)  # the same batches and flips for every method
            loader = _cycle(make_loader(train_data, cfg.batch_size, train=True, seed=cfg.seed))
            history = _finetune(bm, loader, test_loader, cfg, steps, progress, label)
            ranks = bm.ranks()
        finally:
            bm.restore()
        rows.append(
            {
                "method": method,
                "label": label,
                "rank_ratio": ratio,
                "accuracy": history["accuracy"][-1],
                "accuracy_curve": history["accuracy"],
                "train_loss": history["train_loss"],
                "angle_deg": angle,
                "setup_s": setup_s,
                "ranks": ranks,
                **measured,
            }
        )
    bp = next(r for r in rows if r["method"] == "bp")
    for r in rows:
        r["accuracy_delta"] = r["accuracy"] - bp["accuracy"]
        r["layer_memory_ratio"] = r["layer_bytes"] / bp["layer_bytes"]
        r["region_memory_ratio"] = r["region_bytes"] / bp["region_bytes"]
        r["step_time_ratio"] = r["step_s_median"] / bp["step_s_median"]
    return {
        "classes": {"split_a": split_a, "split_b": split_b},
        "pretrain": model.pretrain_record,
        "tokens": int(model.embed.num_tokens),
        "steps_per_epoch": steps,
        "rows": rows,
    }


def run_comparison(
    config: TransformerConfig | Mapping[str, Any],
    *,
    results_dir: str | os.PathLike = "results/transformer",
    root: str | os.PathLike | None = None,
    progress: bool = True,
    force: bool = False,
) -> dict[str, Any]:
    """Fine-tune the last ``k`` ViT blocks with every method; one results JSON per setting.

    Parameters
    ----------
    config
        A :class:`TransformerConfig` or a mapping of its fields.
    results_dir
        Folder of ``transformer-finetune-<key>.json``.
    root
        Data root (:func:`lance_lib.data.data_root`).
    progress
        Show tqdm progress bars.
    force
        Recompute even if the results file exists.

    Returns
    -------
    dict
        ``settings``; ``classes`` (splits A and B); ``pretrain`` (the pretraining
        record: test accuracy on split A, time, checkpoint); ``tokens``;
        ``steps_per_epoch``; ``rows``, one per method variant: ``method``, ``label``,
        ``rank_ratio``, ``accuracy`` (top-1 % on split B's test images after the last
        epoch) and ``accuracy_curve``, ``train_loss``, ``angle_deg`` (angle to BP's
        gradient of all trained parameters on a fixed batch, before training),
        ``ranks``, the measurements of :func:`measure_block_method`, and the ratios
        to BP of the same run: ``accuracy_delta`` (points), ``layer_memory_ratio``,
        ``region_memory_ratio``, ``step_time_ratio`` (method / BP); plus ``path``.

    Notes
    -----
    All variants start from the same weights (pretrained blocks, one seeded new
    classifier), see the same batches, and are measured in the same process, so
    the ratios compare methods, not runs.  The frozen prefix (patch embedding and
    the first blocks) is computed once per image and mirror
    (:class:`lance_lib.prefix_cache.PrefixCache`).
    """
    cfg = config if isinstance(config, TransformerConfig) else TransformerConfig.from_dict(config)
    cfg.validate()
    settings = {**asdict(cfg), "format": 1}
    path = result_path(results_dir, "transformer-finetune", settings)
    result = cached_json(
        path, lambda: {"settings": settings, **_run(cfg, root, progress)}, force=force
    )
    return {**result, "path": str(Path(path))}
