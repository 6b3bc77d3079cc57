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
(:mod:`lance_lib.experiments.region_memory`).  Last, :func:`tail_224` measures the
paper's setting itself (ResNet18 at 224 px, batch 128, its last 4 convs): peak
``torch.cuda.max_memory_allocated`` of one step of BP, LANCE, lean LANCE and LANCE with
int8 cores, and their step times with and without autocast (fp16 with
``torch.amp.GradScaler``, bf16), the methods interleaved step by step; it is written
as JSON beside the CPU report (``gpu.json`` next to ``--out``).  Without CUDA the
section says so and measures nothing.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

import torch

from bench.region import region_config
from bench.sections import register_section, weights_option
from lance_lib.accounting import cuda_peak_bytes
from lance_lib.experiments.finetune import FinetuneConfig, finetune
from lance_lib.experiments.latency import LatencyConfig
from lance_lib.experiments.probe import tail_inputs
from lance_lib.experiments.region_memory import region_memory
from lance_lib.experiments.setup import select_tail
from lance_lib.io import write_json_atomic
from lance_lib.lean import make_lean
from lance_lib.methods import apply_method, measure_methods
from lance_lib.profiles import load_profile

__all__ = ["TAIL_VARIANTS", "gpu", "paper_finetune_config", "tail_224"]

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
    tail = tail_224(args)
    write_json_atomic(Path(args.out).with_name("gpu.json"), tail)
    return {
        "tail_224": tail,
        "device": torch.cuda.get_device_name(),
        "profile": PROFILE,
        "methods": methods,
        "region_step_cuda_peak_bytes": peaks,
        "region_step_cuda_baseline_bytes": region["cuda_baseline_bytes"],
        "ratios": {
            "gpu_bp_peak_over_lance_peak": peaks["bp"] / peaks["lance"],
            "gpu_bp_peak_over_lean_peak": peaks["bp"] / peaks["lean"],
            "gpu_224_bp_peak_over_lance_int8_peak": tail["peak_bytes"]["bp"]
            / tail["peak_bytes"]["lance_int8"],
        },
    }


#: The variants :func:`tail_224` measures: method and its options, lean or not.
TAIL_VARIANTS: dict[str, tuple[str, dict[str, Any], bool]] = {
    "bp": ("bp", {}, False),
    "lance": ("lance", {}, False),
    "lean_lance": ("lance", {}, True),
    "lance_int8": ("lance", {"core_dtype": "int8"}, False),
}


def tail_224(args: argparse.Namespace) -> dict[str, Any]:
    """ResNet18 at 224 px, batch 128, last 4 convs on CUDA: peak memory and step times.

    Every variant of :data:`TAIL_VARIANTS` is applied to its own copy of the tail;
    ``peak_bytes`` is :func:`lance_lib.accounting.cuda_peak_bytes` of one step,
    ``step_s`` the median (and quartiles) of ``--repeats`` steps after ``--warmup``,
    interleaved (:func:`lance_lib.methods.measure_methods`), in float32 and under
    ``torch.autocast`` with fp16 (and a ``GradScaler``) and bf16.
    """
    device = torch.device(args.device or "cuda")
    cfg = LatencyConfig(
        model="resnet18",
        weights=weights_option(args.weights),
        resolution=224,
        batch_size=128,
        layer_counts=(4,),
        methods=("bp",),
        eps=args.eps,
        num_batches=args.calib_batches,
        seed=args.seed,
        device=str(device),
    )
    prep = cfg.prepare(4, root=None, progress=args.progress)
    _, prefix, tail, layers = select_tail(prep.model, 4)
    batch, *calibration = tail_inputs(prefix, cfg.probe_batches(prep, root=None), device)
    handles = {}
    for name, (method, options, lean) in TAIL_VARIANTS.items():
        handle = apply_method(
            copy.deepcopy(tail), method, list(layers), calib_loader=calibration,
            eps=args.eps, num_batches=args.calib_batches, **options,
        )  # fmt: skip
        if lean:
            make_lean(handle.model)
        handles[name] = handle
    peaks = {}
    for name, handle in handles.items():
        peaks[name] = cuda_peak_bytes(device, lambda h=handle: _step(h, batch, None))[1]
    times = {}
    for label, dtype in (("float32", None), ("autocast_fp16", torch.float16),
                         ("autocast_bf16", torch.bfloat16)):  # fmt: skip
        measured = measure_methods(
            handles, batch, repeats=args.repeats, warmup=args.warmup,
            forward=lambda m, b, dtype=dtype: _autocast_forward(m, b, dtype),
        )  # fmt: skip
        times[label] = {
            name: {"step_s_median": m.step_s_median, "step_s_iqr": m.step_s_iqr}
            for name, m in measured.items()
        }
    scaler_ok = _scaler_step(handles["lance"], batch)
    for handle in handles.values():
        handle.restore()
    return {
        "device": torch.cuda.get_device_name(device),
        "setting": {"model": "resnet18", "resolution": 224, "batch_size": 128, "layers": 4},
        "peak_bytes": peaks,
        "step_s": times,
        "grad_scaler_step_finite": scaler_ok,
    }


def _autocast_forward(
    model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor], dtype: torch.dtype | None
) -> torch.Tensor:
    with torch.autocast("cuda", dtype=dtype or torch.float16, enabled=dtype is not None):
        return model(batch[0]).float()


def _step(handle: Any, batch: tuple[torch.Tensor, torch.Tensor], dtype: torch.dtype | None) -> None:
    for p in handle.model.parameters():
        p.grad = None
    out = _autocast_forward(handle.model, batch, dtype)
    torch.nn.functional.cross_entropy(out, batch[1]).backward()


def _scaler_step(handle: Any, batch: tuple[torch.Tensor, torch.Tensor]) -> bool:
    """One fp16 step with ``torch.amp.GradScaler`` and SGD; whether the gradients were finite."""
    params = [p for p in handle.model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.0)
    scaler = torch.amp.GradScaler("cuda")
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(
        _autocast_forward(handle.model, batch, torch.float16), batch[1]
    )
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    finite = all(torch.isfinite(p.grad).all() for p in params if p.grad is not None)
    scaler.step(opt)
    scaler.update()
    return bool(finite)
