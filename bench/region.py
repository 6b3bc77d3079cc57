"""Section ``region``: what the whole trainable region keeps for backward, BP / LANCE / lean.

Appendix C counts only the fine-tuned convolutions' inputs; autograd also keeps BatchNorm
inputs, ReLU outputs and the classifier input. One
:class:`lance_lib.experiments.region_memory.RegionMemoryConfig` at the ``methods``
section's setting (ResNet18's last 4 convs at the weights' resolution, batch 128,
eps 0.7): every byte kept per module under BP, LANCE and lean LANCE, lean LANCE's
gradients against LANCE's on the same batch, and on CUDA the peak allocated memory of
one step of each.
"""

from __future__ import annotations

import argparse
from typing import Any

from bench.sections import register_section, weights_option
from lance_lib.experiments.region_memory import RegionMemoryConfig, region_memory

__all__ = ["region", "region_config"]


def region_config(args: argparse.Namespace, device: str | None) -> RegionMemoryConfig:
    """The whole-region measurement at the command line's setting, on ``device``."""
    return RegionMemoryConfig(
        model=args.model,
        weights=weights_option(args.weights),
        resolution=args.resolution,
        batch_size=args.batch_size,
        layers=args.layers,
        eps=args.eps,
        num_batches=args.calib_batches,
        seed=args.seed,
        device=device,
    )


@register_section("region", "whole-region memory of BP, LANCE and lean LANCE", order=3)
def region(args: argparse.Namespace) -> dict[str, Any]:
    """Measure the region; ratios of BP's bytes to LANCE's and lean LANCE's."""
    record = region_memory(
        region_config(args, args.device),
        results_dir=args.results_dir,
        progress=args.progress,
        force=not args.reuse,
    )
    total = record["region_bytes"]
    ratios = {
        "bp_region_mem_over_lance_region_mem": total["bp"] / total["lance"],
        "bp_region_mem_over_lean_region_mem": total["bp"] / total["lean"],
    }
    peaks = record["cuda_peak_bytes"]
    if peaks:
        ratios["bp_cuda_peak_over_lance_cuda_peak"] = peaks["bp"] / peaks["lance"]
        ratios["bp_cuda_peak_over_lean_cuda_peak"] = peaks["bp"] / peaks["lean"]
    keys = (
        "region_bytes",
        "activation_bytes",
        "factor_bytes",
        "layers",
        "tail_input",
        "ranks",
        "lean_gradient_max_rel_diff",
        "cuda_peak_bytes",
        "cuda_baseline_bytes",
        "device",
    )
    return {
        "setting": {**record["settings"], "record": record["path"]},
        **{key: record[key] for key in keys},
        "by_module": record["rows"],
        "ratios": ratios,
    }
