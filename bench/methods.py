"""Every training method on the core benchmark's batch, and the paper's Fig. 5 sweep.

``methods``: BP, LANCE, per-step HOSVD, ASI, LoRAct and checkpointing, each applied
through :func:`lance_lib.methods.apply_method` to the same ResNet18 tail, the same
batch and the same calibration batches as the core benchmark (bench/core.py: 224x224,
last 4 convs, batch 128, eps 0.7), and measured by the same
:func:`lance_lib.methods.measure_method`: forward, backward and step time, measured and
analytic activation memory of the trained layers, FLOPs; ratios against LANCE.

``fig5``: forward, backward and total latency of one training step for 1 to 10
trainable layers of the MCU-class model (the MobileNetV2-0.35 stand-in for MCUNet) at
batch 128 and its native 128x128 input, for every method, on the CPU.  The frozen
prefix (identical for every method) is computed once and not timed; the times are
those of the trainable tail.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import torch
from core import core_setting
from torch import nn

from lance_lib.data import class_subset, get_dataset, make_loader, two_class_splits
from lance_lib.experiments.pretrain import pretrain
from lance_lib.methods import METHODS, apply_method, measure_method
from lance_lib.models import MODEL_INFO, build_model, last_n_convs, replace_classifier, split_at

SUMMARY_KEYS = (
    "forward_s_median",
    "backward_s_median",
    "step_s_median",
    "measured_layer_bytes",
    "measured_region_bytes",
    "analytic_mb",
    "flops_measured",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--methods", nargs="*", choices=METHODS, default=list(METHODS))
    parser.add_argument("--rank-ratio", type=float, default=0.25, help="LoRAct rank ratio")
    parser.add_argument("--fig5-max-layers", type=int, default=10)
    parser.add_argument("--fig5-batch-size", type=int, default=128)


def _measure_all(
    model: nn.Module,
    layers: list[str],
    batch: tuple[torch.Tensor, torch.Tensor],
    calib: list[torch.Tensor],
    methods: list[str],
    args: argparse.Namespace,
    repeats: int,
) -> dict[str, dict[str, Any]]:
    """Apply, measure and restore each method in turn on the same model and batch."""
    out = {}
    for method in methods:
        handle = apply_method(
            model,
            method,
            layers,
            calib_loader=calib,
            eps=args.eps,
            num_batches=len(calib),
            rank_ratio=args.rank_ratio,
            seed=args.seed,
            region="whole",
        )
        try:
            out[method] = measure_method(handle, batch, repeats=repeats)
        finally:
            handle.restore()
    return out


def _methods_section(report: dict, args: argparse.Namespace) -> None:
    s = core_setting(args)
    methods = list(dict.fromkeys(["lance", *args.methods]))
    results = _measure_all(s.tail, s.layers, (s.x, s.y), s.calib, methods, args, args.repeats)
    report["methods"] = results
    lance = results["lance"]
    ratios = report.setdefault("ratios", {})
    for method, r in results.items():
        if method == "lance":
            continue
        ratios[f"{method}_step_over_lance"] = r["step_s_median"] / lance["step_s_median"]
        ratios[f"{method}_mem_over_lance"] = (
            r["measured_layer_bytes"] / lance["measured_layer_bytes"]
        )
        ratios[f"{method}_mem_over_lance_analytic"] = r["analytic_mb"] / lance["analytic_mb"]
    if "bp" in results:
        ratios["lance_step_over_bp_methods_section"] = (
            lance["step_s_median"] / results["bp"]["step_s_median"]
        )
    others = [r["measured_layer_bytes"] for m, r in results.items() if m != "lance"]
    report["methods_summary"] = {
        "lance_lowest_measured_layer_memory": bool(
            others and lance["measured_layer_bytes"] < min(others)
        ),
        "table": {m: {k: r[k] for k in SUMMARY_KEYS} for m, r in results.items()},
    }


def _fig5_section(report: dict, args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    resolution = MODEL_INFO["mcunet"].native_resolution
    split_a, split_b = two_class_splits(10, seed=args.seed)
    if args.weights == "pretrained":
        model = pretrain("mcunet", "cifar10_mini", split_a, seed=args.seed, progress=False)
    else:
        model = build_model("mcunet", len(split_a))
    replace_classifier(model, len(split_b))
    model.eval().requires_grad_(False)
    data = class_subset(
        get_dataset("cifar10_mini", "train", resolution=resolution, augment=False), split_b
    )
    loader = make_loader(data, args.fig5_batch_size, train=True, seed=args.seed, drop_last=True)
    batches = [b for _, b in zip(range(3), loader, strict=False)]
    methods = list(dict.fromkeys(["lance", *args.methods]))
    rows = []
    for n in range(1, args.fig5_max_layers + 1):
        names = [name for name, _ in last_n_convs(model, n)]
        prefix, tail = split_at(model, names[0])
        where = {id(m): name for name, m in tail.named_modules()}
        tail_layers = [where[id(model.get_submodule(name))] for name in names]
        for name in names:
            model.get_submodule(name).weight.requires_grad_(True)
        with torch.no_grad():
            feats = [(prefix(x), y) for x, y in batches]
        x, y = feats[0]
        results = _measure_all(
            tail, tail_layers, (x, y), [f for f, _ in feats[1:]], methods, args, args.repeats
        )
        for method, r in results.items():
            rows.append(
                {
                    "layers": n,
                    "method": method,
                    "forward_s": r["forward_s_median"],
                    "backward_s": r["backward_s_median"],
                    "total_s": r["step_s_median"],
                    "measured_layer_bytes": r["measured_layer_bytes"],
                    "analytic_mb": r["analytic_mb"],
                }
            )
        for name in names:
            model.get_submodule(name).weight.requires_grad_(False)
    slower = {
        m: [
            next(r["total_s"] for r in rows if r["layers"] == n and r["method"] == m)
            / next(r["total_s"] for r in rows if r["layers"] == n and r["method"] == "lance")
            for n in range(1, args.fig5_max_layers + 1)
        ]
        for m in methods
        if m != "lance"
    }
    report["fig5"] = {
        "model": model.stand_in,
        "resolution": resolution,
        "batch_size": args.fig5_batch_size,
        "weights": args.weights,
        "timed": "trainable tail only (the frozen prefix is the same for every method)",
        "rows": rows,
        "total_over_lance_range": {m: [min(v), max(v)] for m, v in slower.items()},
        "total_over_lance_median": {m: statistics.median(v) for m, v in slower.items()},
    }


def run(report: dict, args: argparse.Namespace) -> None:
    """Add ``methods``, ``methods_summary``, ratios against LANCE and ``fig5`` to ``report``."""
    if args.quick:
        args.fig5_max_layers = min(args.fig5_max_layers, 4)
    _methods_section(report, args)
    _fig5_section(report, args)
