"""What the whole trainable region keeps for backward under BP, LANCE and lean LANCE.

Appendix C of LANCE counts only the fine-tuned convolutions' inputs; autograd also keeps
BatchNorm inputs, ReLU outputs and the classifier input. For the trainable tail of a
network prepared for fine-tuning its last ``N`` convolutions
(:mod:`lance_lib.experiments.setup`), this experiment calibrates LANCE once (Eq. 2-3 on
``num_batches`` batches) and measures, per module and on the same batch, every byte
autograd keeps (:func:`lance_lib.accounting.region_memory_table`, saved-tensor hooks)
three times: plain BP, LANCE (the ``N`` convolutions keep only the core of Eq. 1) and
lean LANCE (:mod:`lance_lib.lean`: 1-bit ReLU / ReLU6 / dropout masks, frozen
BatchNorm as a per-channel scale). It also checks that lean LANCE's weight gradients
equal plain LANCE's on that batch and, on CUDA, records the peak
``torch.cuda.max_memory_allocated`` of one training step of each.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from lance_lib.accounting import cuda_peak_bytes, region_memory_table
from lance_lib.calibration import calibrate
from lance_lib.experiments.base import register_experiment, register_sweep
from lance_lib.experiments.probe import TailProbeConfig, TailRecord, run_cached, tail_inputs
from lance_lib.experiments.setup import pretrain_settings
from lance_lib.layers import compress, restore
from lance_lib.modes import canonical_modes
from lance_lib.progress import progress_bar
from lance_lib.validation import check_int

__all__ = [
    "REGION_METHODS",
    "RegionMemoryConfig",
    "RegionMemoryRecord",
    "memory_breakdown",
    "region_memory",
]

#: The three ways of training the region, as named in the record.
REGION_METHODS: tuple[str, ...] = ("bp", "lance", "lean")


@dataclass(frozen=True)
class RegionMemoryRecord(TailRecord):
    """The fields of a stored region-memory record (besides ``settings``, ``provenance``).

    Attributes
    ----------
    rows
        :func:`lance_lib.accounting.region_memory_table` as records: ``module``,
        ``kind``, ``operation``, ``bp_bytes``, ``lance_bytes``, ``lean_bytes``; the
        rows of kind ``"total"`` give the activations (each storage once), the factors
        and the region total.
    region_bytes, activation_bytes, factor_bytes
        ``{"bp", "lance", "lean"}`` bytes of those three total rows.
    layers
        The trained convolutions' names in the model.
    tail_input
        Shape of the measured batch entering the tail.
    ranks
        LANCE's ranks per layer, in the order of the input's modes.
    lean_gradient_max_rel_diff
        Largest ``max|g_lean - g_lance| / max|g_lance|`` over the trained parameters on
        the measured batch (lean LANCE is exact: it should be at rounding level).
    cuda_peak_bytes
        On CUDA, ``{"bp", "lance", "lean"}``: ``torch.cuda.max_memory_allocated``
        during one training step minus what was allocated before it (bytes); ``None``
        on other devices.
    cuda_baseline_bytes
        On CUDA, what was allocated before each step (weights, inputs, gradients).
    model_label, stand_in, resolution, classes, weights, device
        What was measured (:class:`lance_lib.experiments.probe.TailRecord`).
    """

    rows: list[dict[str, Any]]
    region_bytes: dict[str, int]
    activation_bytes: dict[str, int]
    factor_bytes: dict[str, int]
    layers: list[str]
    tail_input: list[int]
    ranks: dict[str, list[int]]
    lean_gradient_max_rel_diff: float
    cuda_peak_bytes: dict[str, int] | None
    cuda_baseline_bytes: dict[str, int] | None


@dataclass(frozen=True)
class RegionMemoryConfig(TailProbeConfig):
    """One region-memory measurement; shared settings as in :class:`TailProbeConfig`.

    Attributes
    ----------
    layers
        ``N``: the last ``N`` convolutions are trained (and compressed).
    modes
        Input modes LANCE compresses (:func:`lance_lib.calibration.calibrate`):
        ``"channel"`` (the fine-tuning default, Theorem 1's scope), ``"no_batch"``,
        ``"all"`` (Eq. 1 as written) or indices.
    """

    record_type: ClassVar[type] = RegionMemoryRecord
    kind: ClassVar[str] = "region_memory"
    # 2: depthwise convs (the MCU stand-in's) stay uncompressed by default
    record_format: ClassVar[int] = 2

    layers: int = 4
    modes: Any = "channel"

    def __hash__(self) -> int:
        return hash(self.key())

    def validate(self) -> None:
        """The shared checks, then ``layers`` and ``modes``."""
        super().validate()
        self._set("layers", check_int("layers", self.layers, minimum=1))
        self._set("modes", canonical_modes(self.modes))


def _step(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> Callable[[], None]:
    """One training step's forward and backward (gradients cleared first)."""

    def step() -> None:
        for p in model.parameters():
            p.grad = None
        nn.functional.cross_entropy(model(batch[0]), batch[1]).backward()

    return step


def _as(model: nn.Module, subspaces: Mapping[str, Any], method: str) -> None:
    """Put the region in the state of ``method`` (one of :data:`REGION_METHODS`)."""
    restore(model)
    if method != "bp":
        compress(model, subspaces, lean=method == "lean")


def _gradients(model: nn.Module, step: Callable[[], None]) -> list[torch.Tensor]:
    step()
    return [p.grad.detach().clone() for p in model.parameters() if p.requires_grad]


def _measure(
    cfg: RegionMemoryConfig, root: str | os.PathLike | None, progress: bool | None
) -> dict[str, Any]:
    """Calibrate once, then measure BP, LANCE and lean LANCE on the same batch."""
    prep = cfg.prepare(cfg.layers, root=root, progress=progress)
    batch, *calibration = tail_inputs(prep.prefix, cfg.probe_batches(prep, root=root), prep.device)
    tail = prep.tail
    subspaces = calibrate(
        tail,
        calibration,
        list(prep.tail_layers),
        eps=cfg.eps,
        num_batches=cfg.num_batches,
        modes=cfg.modes,
    )
    step = _step(tail, batch)
    with progress_bar(total=3, desc=f"region memory {cfg.model}", progress=progress) as bar:
        table = region_memory_table(
            tail, lambda: nn.functional.cross_entropy(tail(batch[0]), batch[1]), subspaces
        )
        bar.update()
        grads = {}
        for method in ("lance", "lean"):
            _as(tail, subspaces, method)
            grads[method] = _gradients(tail, step)
        bar.update()
        peaks = baselines = None
        if prep.device.type == "cuda":
            peaks, baselines = {}, {}
            for method in REGION_METHODS:
                _as(tail, subspaces, method)
                step()  # gradients and workspaces allocated before the measured step
                baselines[method], peak = cuda_peak_bytes(prep.device, step)
                peaks[method] = peak - baselines[method]
        restore(tail)
        bar.update()
    for p in tail.parameters():
        p.grad = None
    diff = max(
        float((lean - plain).abs().max() / plain.abs().max().clamp_min(1e-30))
        for plain, lean in zip(grads["lance"], grads["lean"], strict=True)
    )
    totals = {row["operation"]: row for row in table.to_dict("records") if row["kind"] == "total"}

    def total(operation: str) -> dict[str, int]:
        return {m: int(totals[operation][f"{m}_bytes"]) for m in REGION_METHODS}

    record = RegionMemoryRecord(
        rows=table.to_dict("records"),
        region_bytes=total("region total"),
        activation_bytes=total("activations (distinct storages)"),
        factor_bytes=total("factors (buffers)"),
        layers=list(prep.layers),
        tail_input=list(batch[0].shape),
        ranks={prep.layers[i]: list(subspaces[n].ranks) for i, n in enumerate(prep.tail_layers)},
        lean_gradient_max_rel_diff=diff,
        cuda_peak_bytes=peaks,
        cuda_baseline_bytes=baselines,
        **TailRecord.describe(cfg.model, prep),
    )
    return {**asdict(record), "provenance": TailRecord.provenance(cfg.model, prep)}


@register_experiment(RegionMemoryConfig)
def region_memory(
    config: RegionMemoryConfig | Mapping[str, Any],
    *,
    results_dir: str | os.PathLike | None = None,
    root: str | os.PathLike | None = None,
    progress: bool | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Run (or reuse) one region-memory measurement; one cached record per setting.

    Parameters
    ----------
    config
        A :class:`RegionMemoryConfig` or a mapping of its fields (validated first).
    results_dir
        Folder of the records ``region_memory-<model>-<key>.json``; default
        :func:`lance_lib.paths.results_dir` ``("region_memory")``.
    root, progress, force
        Data root, progress bar, recompute even if a matching record exists.

    Returns
    -------
    dict
        Every field of :class:`RegionMemoryRecord`, ``settings``, ``provenance`` and
        ``path``.
    """
    cfg = RegionMemoryConfig.from_dict(config)
    return run_cached(
        cfg,
        lambda: _measure(cfg, root, progress),
        results_dir=results_dir,
        force=force,
    )


@register_sweep("memory_breakdown")
def memory_breakdown(params: Mapping[str, Any]) -> list[RegionMemoryConfig]:
    """The sweep of ``notebooks/memory_breakdown.ipynb``: one config per model.

    Reads ``models``, ``dataset``, ``batch_size``, ``resolution``, ``layers``, ``eps``,
    ``num_batches`` and ``seed``; optionally ``modes``, ``device``,
    ``weights_by_model`` and ``finetune`` (``weights``, ``pretrain_epochs``,
    ``pretrain_resolution``).
    """
    finetune = dict(params.get("finetune") or {})
    pretrain = pretrain_settings(finetune)
    by_model = params.get("weights_by_model") or {}
    return [
        RegionMemoryConfig(
            model=model,
            dataset=params["dataset"],
            weights=by_model.get(model, finetune.get("weights")),
            resolution=params["resolution"],
            batch_size=params["batch_size"],
            layers=params["layers"],
            eps=params["eps"],
            num_batches=params["num_batches"],
            modes=params.get("modes", "channel"),
            seed=params["seed"],
            device=params.get("device"),
            **pretrain,
        )
        for model in params["models"]
    ]
