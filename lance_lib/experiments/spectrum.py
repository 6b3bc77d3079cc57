"""How many channel directions the fine-tuned layers' inputs need: ours against the paper's.

LANCE keeps, per compressed layer, the leading ``r`` eigenvectors of the input's mode
covariance that hold a share ``eps`` of its energy (Eq. 2-3). Two views of that rank:

* :func:`channel_spectrum` - the channel-mode spectrum of the last ``N`` convolutions'
  inputs of *our* backbone (the reference ResNet18 pretrained on CIFAR-10 split A) on
  the fine-tuning images (split B), and the rank each ``eps`` gives;
* :func:`implied_channel_ranks` - the one channel rank per layer that the paper's own
  memory figure (Table 2: 1.11 MB for ResNet18's last 4 convs at 224 px, batch 128)
  implies under the Appendix C count, when only the channel mode is compressed.

A backbone pretrained on 5 classes may keep its features in far fewer directions than
an ImageNet one; then a rank that reaches ``eps`` on our backbone is smaller than the
paper's, and more of the gradient is lost.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import torch

from lance_lib.accounting.memory import published_mb
from lance_lib.calibration import collect_covariances
from lance_lib.data import class_subset, get_dataset, make_loader
from lance_lib.experiments.setup import dataset_num_classes, prepare_finetuning
from lance_lib.hosvd import energy_rank, sorted_eigh
from lance_lib.models import build_model, last_n_convs

__all__ = ["channel_spectrum", "implied_channel_ranks", "layer_input_shapes"]

#: The channel mode of a Conv2d input ``(B, C, H, W)``.
CHANNEL = 1


def layer_input_shapes(
    model: str, layers: int, resolution: int, batch_size: int
) -> dict[str, tuple[int, ...]]:
    """Input shape ``(B, C, H, W)`` of each of the last ``layers`` convolutions of ``model``."""
    net = build_model(model, num_classes=10).eval()
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = [
        module.register_forward_pre_hook(
            lambda _m, args, name=name: shapes.__setitem__(name, tuple(args[0].shape))
        )
        for name, module in last_n_convs(net, layers)
    ]
    try:
        with torch.no_grad():
            net(torch.zeros(1, 3, resolution, resolution))
    finally:
        for h in hooks:
            h.remove()
    return {name: (batch_size, *shape[1:]) for name, shape in shapes.items()}


def implied_channel_ranks(
    paper_mb: float,
    *,
    model: str = "resnet18",
    layers: int = 4,
    resolution: int = 224,
    batch_size: int = 128,
) -> dict[str, Any]:
    """The channel rank per layer that a published LANCE memory implies (channel reading).

    With only the channel mode compressed to rank ``r``, a layer with input
    ``(B, C, H, W)`` keeps ``B r H W + C r`` elements (Appendix C: the core and the one
    factor), 4 bytes each, counted over the fine-tuned convolutions' inputs as the
    paper's tables count (:func:`lance_lib.accounting.memory.published_mb`). One rank
    ``r`` for every layer then solves ``published_mb(sum_l (B H_l W_l + C_l) r) =
    paper_mb``.

    Parameters
    ----------
    paper_mb
        The published memory, e.g. Table 2's 1.11 MB (ResNet18, 4 convs, CIFAR-10).
    model, layers, resolution, batch_size
        The paper's setting (Table 4: 224 px, batch 128).

    Returns
    -------
    dict
        ``rank`` (the real-valued uniform rank), ``ranks`` (per layer, that rank as the
        share of the layer's channels, ``fraction``), ``bp_mb`` (BP's memory for the same
        layers) and ``shapes``.

    Notes
    -----
    Eq. (1) as written also compresses the batch and spatial modes; the memory then
    fixes only a product of ranks and implies no unique rank, so only the channel
    reading is inverted here.
    """
    shapes = layer_input_shapes(model, layers, resolution, batch_size)
    per_rank = sum(math.prod(s) // s[CHANNEL] + s[CHANNEL] for s in shapes.values())
    rank = paper_mb / published_mb(per_rank)
    return {
        "paper_mb": paper_mb,
        "rank": rank,
        "ranks": {name: rank for name in shapes},
        "fraction": {name: rank / s[CHANNEL] for name, s in shapes.items()},
        "bp_mb": published_mb([math.prod(s) for s in shapes.values()]),
        "shapes": {name: list(s) for name, s in shapes.items()},
    }


def channel_spectrum(
    model: str = "resnet18",
    *,
    weights: str | None = "reference",
    dataset: str = "cifar10",
    classes: Sequence[int] | None = None,
    layers: int = 4,
    resolution: int | None = None,
    num_batches: int = 20,
    batch_size: int = 128,
    eps_values: Sequence[float] = (0.7, 0.9, 0.95),
    seed: int = 0,
    root: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Channel-mode spectrum of the last ``layers`` convolutions' inputs on the fine-tuning data.

    The covariance is Eq. (2)'s running estimate over ``num_batches`` training batches
    (no augmentation) of the fine-tuning classes (default: split B for the reference
    weights), taken from the starting weights, before any fine-tuning; ``resolution``
    ``None`` is the weights' own (:func:`lance_lib.experiments.setup.default_resolution`).

    Returns
    -------
    dict
        Per layer (``layers``): ``channels``, ``energy`` (the eigenvalues' shares of the
        total, descending), ``ranks`` ``{eps: rank}`` (Eq. 3) and ``fraction``
        ``{eps: rank / channels}``; plus the settings used.
    """
    prep = prepare_finetuning(
        model,
        weights=weights,
        dataset=dataset,
        classes=classes,
        num_classes=dataset_num_classes(dataset),
        layers=layers,
        split=False,
        resolution=resolution,
        seed=seed,
        root=root,
        device=device,
        progress=False,
    )
    images = class_subset(
        get_dataset(dataset, "train", root=root, resolution=prep.resolution, augment=False),
        prep.classes.finetune,
    )
    loader = make_loader(images, batch_size, train=True, seed=seed, drop_last=True)
    names = list(prep.layers)
    covariances, shapes = collect_covariances(
        prep.model,
        ((x.to(prep.device), y) for x, y in loader),
        names,
        num_batches=num_batches,
        modes=(CHANNEL,),
    )
    out: dict[str, Any] = {}
    for name in names:
        eigenvalues, _ = sorted_eigh(covariances[name][CHANNEL].cov)
        energy = eigenvalues / eigenvalues.sum()
        ranks = {str(eps): energy_rank(eigenvalues, eps) for eps in eps_values}
        channels = shapes[name][CHANNEL]
        out[name] = {
            "channels": channels,
            "input_shape": list(shapes[name]),
            "energy": energy.tolist(),
            "ranks": ranks,
            "fraction": {eps: r / channels for eps, r in ranks.items()},
        }
    return {
        "model": model,
        "weights": weights,
        "dataset": dataset,
        "classes": list(prep.classes.finetune),
        "resolution": prep.resolution,
        "num_batches": num_batches,
        "batch_size": batch_size,
        "layers": out,
    }
