"""Section ``gpu``: the paper profile's code path on CUDA, and peak GPU memory per method.

For a GPU machine (under 5 minutes on one current GPU): every method fine-tunes the
paper's ResNet18 setting (batch 128, the last 4 convs, at ``--resolution``: by default
the weights' own) for ``--gpu-steps`` steps through the fine-tuning experiment with the
paper profile's settings (:func:`lance_lib.experiments.finetune.finetune`,
``profiles/paper.yaml``'s ``common.finetune``, reduced to one short epoch on the
embedded CIFAR-10 subset and the ``--weights`` starting point, since ImageNet weights
need a network), recording each method's ``torch.cuda.max_memory_allocated`` while
measuring one step and while training; then the whole-region experiment on CUDA gives
the peak of one training step of BP, LANCE and lean LANCE
(:mod:`lance_lib.experiments.region_memory`). Without CUDA the section says so and
measures nothing.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from bench.region import region_config
from bench.sections import register_section, weights_option
from lance_lib.experiments.finetune import FinetuneConfig, finetune
from lance_lib.experiments.region_memory import region_memory
from lance_lib.profiles import load_profile

__all__ = ["gpu", "paper_finetune_config"]

#: The profile whose fine-tuning settings the section runs.
PROFILE = "paper"


def paper_finetune_config(args: argparse.Namespace, method: str) -> FinetuneConfig:
    """The paper profile's fine-tuning settings, cut to ``--gpu-steps`` steps on CUDA."""
    settings = dict(load_profile(PROFILE)["common"]["finetune"])
    settings.update(
        model=args.model,
        dataset="cifar10_mini",
        weights=weights_option(args.weights),
        resolution=args.resolution,
        batch_size=args.batch_size,
        layers=args.layers,
        eps=args.eps,
        num_batches=args.calib_batches,
        method=method,
        method_options={"rank_ratio": args.rank_ratio} if method == "loract" else {},
        epochs=1,
        max_steps_per_epoch=args.gpu_steps,
        measure_repeats=2,
        seed=args.seed,
        device=args.device or "cuda",
    )
    return FinetuneConfig.from_dict(settings)


@register_section("gpu", "the paper profile's path on CUDA, peak GPU memory per method", order=4)
def gpu(args: argparse.Namespace) -> dict[str, Any]:
    """Fine-tune every method a few steps on CUDA; peak allocated bytes of each."""
    if not torch.cuda.is_available():
        message = "no CUDA device: section gpu measures nothing here (run it on a GPU machine)"
        print(f"[bench] gpu: {message}", flush=True)
        return {"skipped": message}
    folder = Path(args.results_dir) / "gpu"
    methods = {}
    for method in dict.fromkeys(["bp", "lance", *args.methods]):
        record = finetune(
            paper_finetune_config(args, method),
            results_dir=folder,
            progress=args.progress,
            force=not args.reuse,
        )
        measured = record["measurements"] or {}
        methods[method] = {
            "step_cuda_peak_bytes": measured.get("cuda_peak_bytes"),
            "step_cuda_baseline_bytes": measured.get("cuda_baseline_bytes"),
            "training_cuda_max_memory_allocated": record["cuda_max_memory_allocated"],
            "step_s_median": measured.get("step_s_median"),
            "train_steps": record["steps_per_epoch"],
            "final_accuracy": record["final_accuracy"],
            "record": record["path"],
        }
    region = region_memory(
        region_config(args, args.device or "cuda"),
        results_dir=folder,
        progress=args.progress,
        force=not args.reuse,
    )
    peaks = region["cuda_peak_bytes"]
    return {
        "device": torch.cuda.get_device_name(),
        "profile": PROFILE,
        "methods": methods,
        "region_step_cuda_peak_bytes": peaks,
        "region_step_cuda_baseline_bytes": region["cuda_baseline_bytes"],
        "ratios": {
            "gpu_bp_peak_over_lance_peak": peaks["bp"] / peaks["lance"],
            "gpu_bp_peak_over_lean_peak": peaks["bp"] / peaks["lean"],
        },
    }
