"""Whole-region memory: what the trainable tail keeps under BP, LANCE and lean LANCE.

Appendix C counts only the fine-tuned convolutions' inputs; autograd also keeps
BatchNorm inputs, ReLU outputs and the classifier input.  On the core benchmark's
setting (bench/core.py: ResNet18 layer4 tail, the real ``128 x 256 x 14 x 14`` input,
eps 0.7, the same calibration batches) this section measures, per module, every byte
autograd keeps (:func:`lance_lib.accounting.region_memory_table`), checks that lean
LANCE's gradients equal plain LANCE's on the benchmark batch, measures the CUDA peak
of a training step when a GPU is present, and fine-tunes plain and lean LANCE side by
side on the embedded task (class split B of ``cifar10_mini``, starting from the split-A
pretrained ResNet18) to compare their accuracy.
"""

from __future__ import annotations

import argparse
import copy

import torch
from core import core_setting, training_step
from torch import nn

from lance_lib import calibrate, compress, restore
from lance_lib.accounting import region_memory_table
from lance_lib.data import class_subset, get_dataset, make_loader, two_class_splits
from lance_lib.experiments.pretrain import pretrain
from lance_lib.models import freeze_for_finetuning, last_n_convs, replace_classifier, split_at


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lean-epochs", type=int, default=3, help="fine-tuning epochs")
    parser.add_argument(
        "--lean-resolution", type=int, default=32, help="fine-tuning input side (pretraining: 32)"
    )


def _gradients(tail: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    training_step(tail, x, y)
    return [p.grad.clone() for p in tail.parameters() if p.requires_grad]


def _cuda_peaks(tail: nn.Module, x: torch.Tensor, y: torch.Tensor, subspaces) -> dict:
    """Peak CUDA memory of one training step above what is allocated before it, bytes."""
    tail = copy.deepcopy(tail).cuda()
    x, y = x.cuda(), y.cuda()
    peaks = {}
    for method in ("bp", "lance", "lean"):
        restore(tail)
        if method != "bp":
            compress(tail, subspaces, lean=method == "lean")
        training_step(tail, x, y)  # warm-up: gradients and workspaces allocated
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        training_step(tail, x, y)
        torch.cuda.synchronize()
        peaks[method] = torch.cuda.max_memory_allocated() - base
    restore(tail)
    return peaks


def _accuracy(model: nn.Module, loader) -> float:
    correct = total = 0
    with torch.no_grad():
        for feats, labels in loader:
            correct += int((model(feats).argmax(1) == labels).sum())
            total += len(labels)
    return 100.0 * correct / total


def _finetune(args: argparse.Namespace) -> dict:
    """Fine-tune the last ``args.layers`` convs and the classifier with plain and lean LANCE.

    Both runs start from the same weights, see the same batches in the same order and
    use the same subspaces (calibrated once on the first batches, eps ``args.eps``);
    evaluation uses the uncompressed layers.
    """
    split_a, split_b = two_class_splits(10, seed=args.seed)
    base = pretrain("resnet18", "cifar10_mini", split_a, seed=args.seed, progress=False)
    torch.manual_seed(args.seed)
    replace_classifier(base, len(split_b))
    layers = [name for name, _ in last_n_convs(base, args.layers)]
    freeze_for_finetuning(base, layers)
    prefix, tail = split_at(base, layers[0])
    tail_layers = [name for name, _ in last_n_convs(tail, args.layers)]

    def features(split: str) -> torch.utils.data.TensorDataset:
        data = class_subset(
            get_dataset("cifar10_mini", split, resolution=args.lean_resolution, augment=False),
            split_b,
        )
        loader = make_loader(data, 256, train=False)
        prefix.eval()
        with torch.no_grad():
            parts = [(prefix(images), labels) for images, labels in loader]
        return torch.utils.data.TensorDataset(
            torch.cat([p for p, _ in parts]), torch.cat([t for _, t in parts])
        )

    train, test = features("train"), features("test")
    calib = make_loader(train, args.batch_size, train=True, seed=args.seed, drop_last=True)
    subspaces = calibrate(tail, calib, tail_layers, eps=args.eps, num_batches=args.calib_batches)
    test_loader = make_loader(test, 256, train=False)
    out = {}
    for method in ("lance", "lean"):
        model = copy.deepcopy(tail)
        optimiser = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
        accuracy = []
        for epoch in range(args.lean_epochs):
            compress(model, subspaces, lean=method == "lean")
            model.train()
            loader = make_loader(
                train, args.batch_size, train=True, seed=args.seed + epoch, drop_last=True
            )
            for feats, labels in loader:
                optimiser.zero_grad()
                nn.functional.cross_entropy(model(feats), labels).backward()
                optimiser.step()
            restore(model)
            model.eval()
            accuracy.append(_accuracy(model, test_loader))
        out[method] = {"test_accuracy_per_epoch": accuracy, "test_accuracy": accuracy[-1]}
    out["settings"] = {
        "model": "resnet18 pretrained on cifar10_mini split A",
        "classes": split_b,
        "layers": tail_layers,
        "resolution": args.lean_resolution,
        "epochs": args.lean_epochs,
        "lr": 0.05,
        "batch_size": args.batch_size,
        "eps": args.eps,
        "calibration_batches": args.calib_batches,
        "train_samples": len(train),
        "test_samples": len(test),
    }
    return out


def run(report: dict, args: argparse.Namespace) -> None:
    """Add the ``lean`` results and the whole-region memory ratios to ``report``."""
    s = core_setting(args)
    subspaces = calibrate(s.tail, s.calib, s.layers, eps=args.eps, num_batches=len(s.calib))

    def loss() -> torch.Tensor:
        return nn.functional.cross_entropy(s.tail(s.x), s.y)

    table = region_memory_table(s.tail, loss, subspaces)
    rows = table.set_index("module")
    total = rows.loc["region total"]

    compress(s.tail, subspaces)
    lance_grads = _gradients(s.tail, s.x, s.y)
    compress(s.tail, subspaces, lean=True)
    lean_grads = _gradients(s.tail, s.x, s.y)
    restore(s.tail)
    grad_diff = max(
        float((a - b).abs().max() / a.abs().max())
        for a, b in zip(lance_grads, lean_grads, strict=True)
    )

    lean: dict = {
        "region_bytes": {m: int(total[f"{m}_bytes"]) for m in ("bp", "lance", "lean")},
        "activation_bytes": {
            m: int(rows.loc["activations (distinct storages)", f"{m}_bytes"])
            for m in ("bp", "lance", "lean")
        },
        "factor_bytes": {
            m: int(rows.loc["factors (buffers)", f"{m}_bytes"]) for m in ("bp", "lance", "lean")
        },
        "by_module": table.to_dict(orient="records"),
        "max_relative_grad_diff_lean_vs_lance": grad_diff,
        "finetune": _finetune(args),
    }
    if torch.cuda.is_available():
        lean["cuda_peak_step_bytes"] = _cuda_peaks(s.tail, s.x, s.y, subspaces)
    acc = lean["finetune"]
    lean["finetune"]["lean_minus_lance_points"] = (
        acc["lean"]["test_accuracy"] - acc["lance"]["test_accuracy"]
    )
    report["lean"] = lean
    ratios = report.setdefault("ratios", {})
    ratios["bp_region_mem_over_lean_region_mem"] = total["bp_bytes"] / total["lean_bytes"]
    ratios["bp_region_mem_over_lance_region_mem"] = total["bp_bytes"] / total["lance_bytes"]
