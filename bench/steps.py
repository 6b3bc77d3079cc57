"""Sections ``methods`` and ``fig5``: one training step of every method, side by side.

``methods``: BP, LANCE, per-step HOSVD, ASI, LoRAct and checkpointing on the same batch
of the same trainable tail, at the paper's Table 2 setting by default (ResNet18, batch
128, the last 4 convs, eps 0.7; images of the embedded CIFAR-10 subset's class split B)
at the starting weights' own resolution (64 px for the reference ResNet18: at the
paper's 224 px a backbone pretrained at 64 px sees unfamiliar scales and its layer4
channel rank collapses to 1): one :class:`lance_lib.experiments.latency.LatencyConfig`
with one layer count.
Reported: each method's :class:`lance_lib.methods.MethodMeasurement`, ratios against
LANCE and BP (step time, measured and analytic memory of the trained layers, FLOPs), and
the ranks LANCE calibrated (with the median channel rank of ``layer4``).

``fig5``: the Fig. 5 latency sweep (the MCU-class stand-in, 1..L trained layers, batch
128, the reference weights' resolution), summarised as each method's total step time over
LANCE's.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

from bench.sections import register_section, weights_option
from lance_lib.experiments.latency import LatencyConfig, latency, latency_ratios

__all__ = ["channel_ranks", "fig5", "lance_over_bp", "methods"]

#: What ``methods`` keeps per method in its summary table.
SUMMARY_KEYS = (
    "forward_s_median",
    "backward_s_median",
    "step_s_median",
    "step_s_iqr",
    "measured_layer_bytes",
    "measured_region_bytes",
    "analytic_mb",
    "analytic_bp_mb",
    "flops_measured",
    "cuda_peak_bytes",
)


def _sweep(args: argparse.Namespace, **settings: Any) -> dict[str, Any]:
    """Run one latency config with the shared options (measured again unless ``--reuse``)."""
    config = LatencyConfig(
        weights=weights_option(args.weights),
        eps=args.eps,
        num_batches=args.calib_batches,
        repeats=args.repeats,
        warmup=args.warmup,
        methods=tuple(dict.fromkeys(["lance", *args.methods])),
        method_options={"rank_ratio": args.rank_ratio},
        seed=args.seed,
        device=args.device,
        **settings,
    )
    return latency(
        config, results_dir=args.results_dir, progress=args.progress, force=not args.reuse
    )


def channel_ranks(row: dict[str, Any]) -> dict[str, int]:
    """``{layer: channel rank}`` of a measured row (mode 1 of a ``(B, C, H, W)`` input)."""
    ranks = row["ranks"] or {}
    return {name: int(r[1]) for name, r in zip(row["trained"], ranks.values(), strict=True) if r}


@register_section("methods", "every method on one batch of the Table 2 setting", order=1)
def methods(args: argparse.Namespace) -> dict[str, Any]:
    """Measure every method on the tail of the last ``--layers`` convs; ratios and ranks."""
    record = _sweep(
        args,
        model=args.model,
        resolution=args.resolution,
        batch_size=args.batch_size,
        layer_counts=(args.layers,),
    )
    rows = {row["method"]: row for row in record["rows"]}
    lance = rows["lance"]
    ratios: dict[str, float] = {}
    for method, row in rows.items():
        if method != "lance":
            ratios[f"{method}_step_over_lance"] = row["step_s_median"] / lance["step_s_median"]
            ratios[f"{method}_mem_over_lance"] = (
                row["measured_layer_bytes"] / lance["measured_layer_bytes"]
            )
            ratios[f"{method}_mem_over_lance_analytic"] = row["analytic_mb"] / lance["analytic_mb"]
    if "bp" in rows:
        bp = rows["bp"]
        ratios["lance_step_over_bp"] = lance["step_s_median"] / bp["step_s_median"]
        ratios["bp_flops_over_lance_flops_measured"] = (
            bp["flops_measured"] / lance["flops_measured"]
        )
        ratios["measured_over_analytic_mem_ratio"] = (
            ratios["bp_mem_over_lance"] / ratios["bp_mem_over_lance_analytic"]
        )
    floor = record["floors"][0] if record["floors"] else None
    if floor:
        ratios["lance_floor_over_bp"] = floor["floor_over_bp"]
    channel = channel_ranks(lance)
    layer4 = [r for name, r in channel.items() if name.startswith("layer4")]
    others = [r["measured_layer_bytes"] for m, r in rows.items() if m != "lance"]
    return {
        "setting": {
            **record["settings"],
            "record": record["path"],
            "model_label": record["model_label"],
            "tail_input": lance["tail_input"],
            "trained": lance["trained"],
            "classes": record["classes"],
            "weights": record["weights"]["name"],
            "weights_sha256": record["weights"]["sha256"],
        },
        "ranks": {
            "eps": args.eps,
            "per_layer": dict(zip(lance["trained"], lance["ranks"].values(), strict=True)),
            "channel": channel,
            "median_channel_rank": statistics.median(channel.values()) if channel else None,
            "median_layer4_channel_rank": statistics.median(layer4) if layer4 else None,
        },
        "measurements": rows,
        "summary": {m: {k: r[k] for k in SUMMARY_KEYS} for m, r in rows.items()},
        "lance_lowest_measured_layer_memory": bool(
            others and lance["measured_layer_bytes"] < min(others)
        ),
        "floor": floor,
        "ratios": ratios,
    }


def lance_over_bp(record: dict[str, Any]) -> list[dict[str, Any]]:
    """Per layer count: LANCE's and BP's median steps (with quartiles), their ratio and the
    floor (:func:`lance_lib.methods.speed_floor`) over BP's step."""
    steps = {(r["layers"], r["method"]): r for r in record["rows"]}
    floors = {f["layers"]: f for f in record["floors"]}
    out = []
    for n in sorted({layers for layers, _ in steps}):
        if (n, "bp") not in steps or (n, "lance") not in steps:
            continue
        bp, lance = steps[n, "bp"], steps[n, "lance"]
        out.append(
            {
                "layers": n,
                "bp_step_s_median": bp["step_s_median"],
                "bp_step_s_iqr": bp["step_s_iqr"],
                "lance_step_s_median": lance["step_s_median"],
                "lance_step_s_iqr": lance["step_s_iqr"],
                "lance_over_bp": lance["step_s_median"] / bp["step_s_median"],
                "floor_over_bp": floors[n]["floor_over_bp"] if n in floors else None,
            }
        )
    return out


@register_section("fig5", "the Fig. 5 latency sweep over 1..L trained layers", order=2)
def fig5(args: argparse.Namespace) -> dict[str, Any]:
    """The latency sweep; each method's total step time over LANCE's, per layer count."""
    record = _sweep(
        args,
        model=args.fig5_model,
        resolution=args.fig5_resolution,
        batch_size=args.fig5_batch_size,
        layer_counts=tuple(range(1, args.fig5_max_layers + 1)),
    )
    over_lance = latency_ratios(record)
    per_count = lance_over_bp(record)
    return {
        "setting": {**record["settings"], "record": record["path"]},
        "model": record["stand_in"] or record["model_label"],
        "resolution": record["resolution"],
        "timed": record["timed"],
        "rows": [
            {
                key: row[key]
                for key in (
                    "layers",
                    "method",
                    "forward_s_median",
                    "backward_s_median",
                    "step_s_median",
                    "step_s_iqr",
                    "measured_layer_bytes",
                    "analytic_mb",
                    "cuda_peak_bytes",
                )
            }
            for row in record["rows"]
        ],
        "floors": record["floors"],
        "lance_over_bp": per_count,
        "total_over_lance": over_lance,
        "ratios": {
            **{f"fig5_{m}_total_over_lance_median": r["median"] for m, r in over_lance.items()},
            **(
                {
                    "fig5_lance_over_bp_max": max(r["lance_over_bp"] for r in per_count),
                    "fig5_floor_over_bp_max": max(
                        r["floor_over_bp"] for r in per_count if r["floor_over_bp"] is not None
                    ),
                }
                if per_count
                else {}
            ),
        },
    }
