"""Step latency (and memory, FLOPs) of every method against the number of trained layers.

Fig. 5 of LANCE: "End-to-end fine-tuning latency on a Raspberry Pi 3B+ (MCUNet on
CIFAR-10, batch size 128) ... across 1-10 trainable layers"; relative to LANCE the
paper reports BP 3-9 % slower, ASI 19-76 % and the per-step HOSVD 2.1-4.4x. Here, for
each count ``N`` of :attr:`LatencyConfig.layer_counts`, the network prepared for
fine-tuning its last ``N`` convolutions (:mod:`lance_lib.experiments.setup`) has every
method of :attr:`LatencyConfig.methods` applied to its trainable tail in turn
(:func:`lance_lib.methods.apply_method`) and measured on the same batch by the same
code (:func:`lance_lib.methods.measure_methods`: forward, backward and step time,
FLOPs, saved-tensor memory and, on CUDA, ``torch.cuda.max_memory_allocated``). The
frozen prefix is the same for every method, computed once per ``N`` and not timed.

One record holds the whole sweep: its steps are measured in one process, the methods
interleaved step by step (each method on its own copy of the tail;
:func:`lance_lib.methods.measure_methods`), so that the ratios between methods compare
like with like (times measured on different machines or at different loads would not);
medians and interquartile ranges over ``repeats`` steps after ``warmup`` steps.  With
BP and LANCE both measured, each layer count also records LANCE's speed floor
(:func:`lance_lib.methods.speed_floor`): BP's step minus the weight-gradient work LANCE
replaces plus its projection. With one layer count
the same experiment is the benchmark's method comparison at the paper's Table 2
setting (ResNet18, 224 px, batch 128, last 4 convs).
"""

from __future__ import annotations

import copy
import os
import statistics
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from lance_lib.experiments.base import register_experiment, register_sweep
from lance_lib.experiments.probe import TailProbeConfig, TailRecord, run_cached, tail_inputs
from lance_lib.experiments.setup import pretrain_settings, select_tail
from lance_lib.methods import METHODS, apply_method, measure_methods, method_settings, speed_floor
from lance_lib.progress import progress_bar
from lance_lib.validation import check_choice, check_int

__all__ = [
    "LatencyConfig",
    "LatencyRecord",
    "fig5_latency",
    "latency",
    "latency_floor",
    "latency_ratios",
]


@dataclass(frozen=True)
class LatencyRecord(TailRecord):
    """The fields of a stored latency record (besides ``settings`` and ``provenance``).

    Attributes
    ----------
    model_label, stand_in, resolution, classes, weights, device
        What was measured (:class:`lance_lib.experiments.probe.TailRecord`).
    rows
        One per ``(layers, method)``, in measurement order: ``layers`` (``N``),
        ``method``, ``trained`` (the layers' names in the model), ``tail_input``
        (shape of the tail's input) and every field of
        :class:`lance_lib.methods.MethodMeasurement` (``forward_s_median``,
        ``backward_s_median``, ``step_s_median``, ``measured_layer_bytes``,
        ``analytic_mb``, ``flops_measured``, ``cuda_peak_bytes``, ``ranks`` ...).
    floors
        One per layer count when BP and LANCE are both measured: ``layers`` and
        :func:`lance_lib.methods.speed_floor`'s fields, with ``floor_over_bp``.
    timed
        What the times cover.
    """

    rows: list[dict[str, Any]]
    floors: list[dict[str, Any]] = field(default_factory=list)
    timed: str = (
        "one training step (forward + backward, no optimizer step) of the trainable tail; "
        "the frozen prefix, the same for every method, is computed once and not timed"
    )


@dataclass(frozen=True)
class LatencyConfig(TailProbeConfig):
    """One latency sweep (Fig. 5); the shared settings are those of :class:`TailProbeConfig`.

    Attributes
    ----------
    layer_counts
        The numbers ``N`` of trained convolutions (the last ``N``, Sec. 3.1); the
        paper's Fig. 5 sweeps 1..10.
    methods
        Methods of :data:`lance_lib.methods.METHODS`, measured in this order for every
        ``N``.
    repeats, warmup
        Timed and untimed steps per method and ``N``, the methods interleaved step by
        step (the paper averages five trials; the record keeps every repeat, their
        median and quartiles).
    method_options
        Further :func:`lance_lib.methods.apply_method` options shared by the methods
        (``rank_ratio`` of LoRAct, ``region`` of checkpointing, ``modes`` ...); ``eps``
        and ``num_batches`` come from their own fields.
    """

    record_type: ClassVar[type] = LatencyRecord
    kind: ClassVar[str] = "latency"
    # 2: methods timed interleaved, 41 + 5 steps, quartiles and the speed floor;
    #    LANCE leaves depthwise convs uncompressed (LanceSettings.keep_unprofitable)
    record_format: ClassVar[int] = 2

    model: str = "mcunet"
    layer_counts: tuple[int, ...] = tuple(range(1, 11))
    methods: tuple[str, ...] = METHODS
    repeats: int = 41
    warmup: int = 5
    method_options: Mapping[str, Any] = field(default_factory=dict)

    def __hash__(self) -> int:
        return hash(self.key())

    def validate(self) -> None:
        """The shared checks, then the sweep's: counts, methods and their options."""
        super().validate()
        if isinstance(self.layer_counts, int):
            self._set("layer_counts", (self.layer_counts,))
        counts = tuple(check_int("layer_counts", n, minimum=1) for n in self.layer_counts)
        if not counts or len(set(counts)) != len(counts):
            raise ValueError(
                f"layer_counts must list distinct numbers of layers, got {self.layer_counts!r}; "
                f"e.g. layer_counts=(1, 2, 3, 4)"
            )
        self._set("layer_counts", counts)
        methods = (self.methods,) if isinstance(self.methods, str) else tuple(self.methods)
        for method in methods:
            check_choice("methods", method, METHODS)
        if not methods or len(set(methods)) != len(methods):
            raise ValueError(f"methods must list distinct methods, got {self.methods!r}")
        self._set("methods", methods)
        self._set("repeats", check_int("repeats", self.repeats, minimum=1))
        self._set("warmup", check_int("warmup", self.warmup, minimum=0))
        if not isinstance(self.method_options, Mapping):
            raise TypeError(
                f"method_options must be a mapping of apply_method options, got "
                f"{self.method_options!r}; e.g. method_options={{'rank_ratio': 0.25}}"
            )
        self._set("method_options", dict(self.method_options))
        self.method_settings()  # each method checks the options it uses

    def method_options_for_all(self) -> dict[str, Any]:
        """The one bag of options every method receives (each keeps its own)."""
        return {
            "eps": self.eps,
            "num_batches": self.num_batches,
            "seed": self.seed,
            **self.method_options,
        }

    def method_settings(self) -> dict[str, dict[str, Any]]:
        """``{method: its settings}`` (:func:`lance_lib.methods.method_settings`)."""
        bag = self.method_options_for_all()
        return {method: method_settings(method, **bag) for method in self.methods}

    def settings(self) -> dict[str, Any]:
        """The shared key plus every method's resolved settings."""
        return {**super().settings(), "method_settings": self.method_settings()}


def _sweep(
    cfg: LatencyConfig, root: str | os.PathLike | None, progress: bool | None
) -> dict[str, Any]:
    """Measure every method for every layer count: the fields of a :class:`LatencyRecord`."""
    prep = cfg.prepare(max(cfg.layer_counts), root=root, progress=progress)
    images = cfg.probe_batches(prep, root=root)
    bag = cfg.method_options_for_all()
    rows, floors = [], []
    with progress_bar(
        total=len(cfg.layer_counts), desc=f"latency {cfg.model}", progress=progress
    ) as bar:
        for n in cfg.layer_counts:
            bar.set_postfix(layers=n)
            names, prefix, tail, tail_layers = select_tail(prep.model, n)
            batch, *calibration = tail_inputs(prefix, images, prep.device)
            handles = {}
            try:
                for method in cfg.methods:
                    handles[method] = apply_method(
                        copy.deepcopy(tail),
                        method,
                        list(tail_layers),
                        calib_loader=calibration,
                        **bag,
                    )
                measured = measure_methods(handles, batch, repeats=cfg.repeats, warmup=cfg.warmup)
                if "bp" in handles and "lance" in handles:
                    bp_step = measured["bp"].step_s_median
                    floor = speed_floor(handles["bp"], handles["lance"], batch, bp_step)
                    floors.append({"layers": n, **floor})
            finally:
                for handle in handles.values():
                    handle.restore()
            rows.extend(
                {
                    "layers": n,
                    "method": method,
                    "trained": list(names),
                    "tail_input": list(batch[0].shape),
                    **measured[method].to_dict(),
                }
                for method in cfg.methods
            )
            bar.update()
    record = LatencyRecord(rows=rows, floors=floors, **TailRecord.describe(cfg.model, prep))
    return {**asdict(record), "provenance": TailRecord.provenance(cfg.model, prep)}


@register_experiment(LatencyConfig)
def latency(
    config: LatencyConfig | Mapping[str, Any],
    *,
    results_dir: str | os.PathLike | None = None,
    root: str | os.PathLike | None = None,
    progress: bool | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Run (or reuse) one latency sweep; one cached record per setting.

    Parameters
    ----------
    config
        A :class:`LatencyConfig` or a mapping of its fields (validated first).
    results_dir
        Folder of the records ``latency-<model>-<key>.json``; default
        :func:`lance_lib.paths.results_dir` ``("latency")``.
    root
        Data root (:func:`lance_lib.data.data_root`).
    progress
        Show a tqdm bar over the ``(layers, method)`` steps.
    force
        Measure again even if a matching record exists.

    Returns
    -------
    dict
        Every field of :class:`LatencyRecord`, ``settings``, ``provenance`` and ``path``.
    """
    cfg = LatencyConfig.from_dict(config)
    return run_cached(
        cfg,
        lambda: _sweep(cfg, root, progress),
        results_dir=results_dir,
        force=force,
    )


def latency_ratios(
    record: Mapping[str, Any], *, reference: str = "lance", key: str = "step_s_median"
) -> dict[str, dict[str, float]]:
    """Each method's ``key`` over the reference method's, summarised over layer counts.

    Parameters
    ----------
    record
        A latency record.
    reference
        The method every other is divided by (Fig. 5 compares to LANCE).
    key
        A measured quantity of the rows (``step_s_median``, ``forward_s_median``,
        ``measured_layer_bytes`` ...).

    Returns
    -------
    dict
        ``{method: {"min", "median", "max"}}`` of the per-``N`` ratios, for every method
        but the reference (> 1: larger than the reference's).
    """
    base = {r["layers"]: r[key] for r in record["rows"] if r["method"] == reference}
    per_method: dict[str, list[float]] = {}
    for row in record["rows"]:
        if row["method"] != reference:
            per_method.setdefault(row["method"], []).append(row[key] / base[row["layers"]])
    return {
        method: {"min": min(v), "median": statistics.median(v), "max": max(v)}
        for method, v in per_method.items()
    }


def latency_floor(record: Mapping[str, Any]) -> dict[str, float] | None:
    """LANCE's speed floor over BP's step, summarised over layer counts (``None``: none).

    ``{"min", "median", "max"}`` of the records' ``floors`` (``floor_over_bp``, see
    :func:`lance_lib.methods.speed_floor`), next to which LANCE's own step over BP's
    shows how much of the possible saving the implementation reaches.
    """
    values = [f["floor_over_bp"] for f in record.get("floors", [])]
    if not values:
        return None
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


@register_sweep("fig5_latency")
def fig5_latency(params: Mapping[str, Any]) -> list[LatencyConfig]:
    """The sweep of ``notebooks/fig5_latency.ipynb``: one :class:`LatencyConfig`.

    Reads ``model_name``, ``dataset``, ``batch_size``, ``resolution``, ``max_layers``
    (layer counts ``1..max_layers``), ``methods``, ``repeats``, ``eps``,
    ``num_batches``, ``rank_ratio`` and ``seed``; optionally ``device``,
    ``weights_by_model`` (``{model: weights}``) and ``finetune`` (the profile's
    fine-tuning settings: ``weights``, ``pretrain_epochs``, ``pretrain_resolution``).
    """
    finetune = dict(params.get("finetune") or {})
    model = params["model_name"]
    weights = (params.get("weights_by_model") or {}).get(model, finetune.get("weights"))
    pretrain = pretrain_settings(finetune)
    config = LatencyConfig(
        model=model,
        dataset=params["dataset"],
        weights=weights,
        resolution=params["resolution"],
        batch_size=params["batch_size"],
        layer_counts=tuple(range(1, check_int("max_layers", params["max_layers"], minimum=1) + 1)),
        methods=tuple(params["methods"]),
        repeats=params["repeats"],
        eps=params["eps"],
        num_batches=params["num_batches"],
        method_options={"rank_ratio": params["rank_ratio"]},
        seed=params["seed"],
        device=params.get("device"),
        **pretrain,
    )
    return [config]
