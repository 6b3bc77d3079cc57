"""Core benchmark: one training step of ResNet18's trainable tail, BP against LANCE.

The paper's Table 2 setting: ResNet18 at 224x224 input, the last 4 convs trainable
(``layer4.0.conv2``, ``layer4.0.downsample.0``, ``layer4.1.conv1``, ``layer4.1.conv2``),
batch 128, eps = 0.7.  The tail is fed the real ``128 x 256 x 14 x 14`` activation that
enters ``layer4`` for embedded CIFAR-10 images upsampled to 224, computed once by the
frozen prefix.  Weights come from the offline Table 1 protocol (pretraining on class
split A of the embedded data, cached), or are random with ``--weights random``.

Everything is measured side by side in one process; the ratios are the result.
"""

from __future__ import annotations

import argparse
import math
import statistics
from dataclasses import dataclass

import torch
from torch import nn

from lance_lib import calibrate, compress, restore
from lance_lib.accounting import (
    conv_flops,
    measure_flops,
    measure_saved_tensors,
    published_mb,
    subspace_elements,
    time_step,
)
from lance_lib.data import class_subset, get_dataset, make_loader, two_class_splits
from lance_lib.experiments.pretrain import pretrain
from lance_lib.models import build_model, last_n_convs, replace_classifier


class Layer4Tail(nn.Module):
    """ResNet's ``layer4 -> avgpool -> fc``, keeping the full model's module names."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.layer4 = model.layer4
        self.avgpool = model.avgpool
        self.fc = model.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(self.layer4(x)), 1))


@dataclass
class CoreSetting:
    """What every method of the benchmark is run on."""

    tail: Layer4Tail
    layers: list[str]
    x: torch.Tensor
    y: torch.Tensor
    calib: list[torch.Tensor]
    args: argparse.Namespace


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--layers", type=int, default=4, help="last n convs trainable")
    parser.add_argument("--eps", type=float, default=0.7)
    parser.add_argument("--calib-batches", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--weights", choices=["pretrained", "random"], default="pretrained")
    parser.add_argument("--pretrain-epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)


_SETTING: CoreSetting | None = None


def core_setting(args: argparse.Namespace) -> CoreSetting:
    """Build (once per process) the model tail, the batch and the calibration batches."""
    global _SETTING
    if _SETTING is not None:
        return _SETTING
    torch.manual_seed(args.seed)
    split_a, split_b = two_class_splits(10, seed=args.seed)
    if args.weights == "pretrained":
        model = pretrain(
            "resnet18",
            "cifar10_mini",
            split_a,
            epochs=args.pretrain_epochs,
            seed=args.seed,
            progress=False,
        )
    else:
        model = build_model("resnet18", len(split_a))
    replace_classifier(model, len(split_b))
    model.eval()
    model.requires_grad_(False)
    layers = [name for name, _ in last_n_convs(model, args.layers)]
    data = class_subset(
        get_dataset("cifar10_mini", "train", resolution=args.resolution, augment=False), split_b
    )
    loader = make_loader(data, args.batch_size, train=True, seed=args.seed, drop_last=True)
    prefix = nn.Sequential(
        model.conv1, model.bn1, model.relu, model.maxpool, model.layer1, model.layer2, model.layer3
    )
    batches = []
    with torch.no_grad():
        for i, (images, labels) in enumerate(loader):
            if i > args.calib_batches:
                break
            batches.append((prefix(images), labels))
    x, y = batches[0]
    tail = Layer4Tail(model)
    for name in layers:
        tail.get_submodule(name).weight.requires_grad_(True)
    _SETTING = CoreSetting(tail, layers, x, y, [b for b, _ in batches[1:]], args)
    return _SETTING


def training_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """Forward, cross-entropy, backward; gradients are cleared first."""
    for p in model.parameters():
        p.grad = None
    nn.functional.cross_entropy(model(x), y).backward()


def _median(xs: list[float]) -> float:
    return statistics.median(xs)


def run(report: dict, args: argparse.Namespace) -> None:
    """Add the core BP-vs-LANCE results to ``report``."""
    s = core_setting(args)
    subspaces = calibrate(s.tail, s.calib, s.layers, eps=args.eps, num_batches=len(s.calib))
    shapes = {n: subspaces[n].input_shape for n in s.layers}
    convs = {n: s.tail.get_submodule(n) for n in s.layers}

    def step() -> None:
        training_step(s.tail, s.x, s.y)

    bp_mem = measure_saved_tensors(s.tail, lambda: nn.functional.cross_entropy(s.tail(s.x), s.y))
    bp_flops = measure_flops(step)
    compress(s.tail, subspaces)
    lance_mem = measure_saved_tensors(s.tail, lambda: nn.functional.cross_entropy(s.tail(s.x), s.y))
    lance_flops = measure_flops(step)
    restore(s.tail)

    # interleave BP and LANCE repeats so that machine drift hits both alike
    bp_times: list[float] = []
    lance_times: list[float] = []
    for _ in range(args.repeats):
        bp_times += time_step(step, repeats=1, warmup=1)
        with torch.no_grad():
            compress(s.tail, subspaces)
        lance_times += time_step(step, repeats=1, warmup=1)
        restore(s.tail)

    bp_layer_bytes = bp_mem.bytes_of(s.layers)
    lance_core_bytes = lance_mem.bytes_of(s.layers)
    lance_factor_bytes = lance_mem.buffer_bytes_of(s.layers)
    lance_layer_bytes = lance_core_bytes + lance_factor_bytes  # cores + their factors
    bp_elems = [math.prod(shapes[n]) for n in s.layers]
    lance_elems = [subspace_elements(subspaces[n])[1] for n in s.layers]
    analytic_bp_mb = published_mb(bp_elems)
    analytic_lance_mb = published_mb(lance_elems)
    report["setting"] = {
        "model": "resnet18",
        "weights": args.weights,
        "resolution": args.resolution,
        "batch_size": args.batch_size,
        "layers": s.layers,
        "tail_input": list(s.x.shape),
        "eps": args.eps,
        "calibration_batches": len(s.calib),
        "data": "cifar10_mini (embedded CIFAR-10 subset), class split B, upsampled",
        "torch_threads": torch.get_num_threads(),
    }
    report["core"] = {
        "ranks": {n: subspaces[n].ranks for n in s.layers},
        "input_shapes": {n: list(shapes[n]) for n in s.layers},
        "bp": {
            "step_s_median": _median(bp_times),
            "step_s": bp_times,
            "measured_layer_bytes": bp_layer_bytes,
            "measured_region_bytes": bp_mem.activation_bytes,
            "measured_by_kind": bp_mem.by_kind,
            "analytic_mb_published": analytic_bp_mb,
            "flops_measured": bp_flops,
            "flops_analytic": sum(conv_flops(shapes[n], convs[n])["total"] for n in s.layers),
        },
        "lance": {
            "step_s_median": _median(lance_times),
            "step_s": lance_times,
            "measured_core_bytes": lance_core_bytes,
            "measured_factor_bytes": lance_factor_bytes,
            "measured_layer_bytes": lance_layer_bytes,
            "measured_region_bytes": lance_mem.activation_bytes + lance_mem.buffer_bytes,
            "measured_by_kind": lance_mem.by_kind,
            "analytic_mb_appendix_c": analytic_lance_mb,
            "flops_measured": lance_flops,
            "flops_analytic": sum(
                conv_flops(shapes[n], convs[n], subspaces[n].ranks)["total"] for n in s.layers
            ),
        },
    }
    ratios = report.setdefault("ratios", {})
    ratios["lance_step_over_bp"] = _median(lance_times) / _median(bp_times)
    ratios["bp_mem_over_lance_mem"] = bp_layer_bytes / lance_layer_bytes
    ratios["bp_mem_over_lance_mem_analytic"] = analytic_bp_mb / analytic_lance_mb
    ratios["measured_over_analytic_mem_ratio"] = (
        ratios["bp_mem_over_lance_mem"] / ratios["bp_mem_over_lance_mem_analytic"]
    )
    ratios["bp_flops_over_lance_flops_measured"] = bp_flops / lance_flops
