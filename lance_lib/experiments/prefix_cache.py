"""Cached outputs of the frozen prefix, so that only the trainable tail runs per step.

Fine-tuning the last layers (Appendix A.1 of LANCE) leaves a frozen prefix whose
output, with BatchNorm in evaluation mode, depends only on the image.  The only
augmentation of the paper is a random horizontal flip, so every training input the
tail can see is the prefix output of one of ``2 N`` images: each image and its mirror.
:class:`PrefixCache` computes both once and serves them as a dataset that draws the
flip per sample (probability 1/2, from torch's global generator, exactly as
:class:`lance_lib.data.ImageTransform` does); training then runs the tail alone.
:func:`step_speedup` measures what this buys.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

__all__ = ["PrefixCache", "step_speedup"]


class PrefixCache(Dataset):
    """Prefix outputs of every image of a dataset (and of its horizontal mirror).

    Parameters
    ----------
    prefix
        The frozen part of the network (its BatchNorms in evaluation mode; it is run
        under ``torch.no_grad()`` in ``eval()`` mode).
    dataset
        Items ``(image, label)`` **without** random augmentation (``augment=False``)
        and with ``.targets``.
    flips
        Also cache the mirrored images and serve one of the two at random
        (training); ``False`` serves the images as they are (evaluation).
    batch_size
        Images per prefix forward while building the cache.
    progress
        Show a tqdm bar while building.

    Attributes
    ----------
    features, mirrored
        ``(N, ...)`` prefix outputs of the images and of their mirrors (``None``
        without ``flips``), on the prefix's device.
    targets
        Labels.
    build_seconds
        Wall-clock time of building the cache.

    Notes
    -----
    A horizontal flip commutes with the per-channel normalisation of the data
    transform, so mirroring the normalised image equals the transform's flip.  Memory
    is ``N x prod(prefix output shape) x 4`` bytes, doubled with ``flips``.
    """

    def __init__(
        self,
        prefix: nn.Module,
        dataset: Dataset,
        *,
        flips: bool = True,
        batch_size: int = 128,
        progress: bool = True,
    ) -> None:
        start = time.perf_counter()
        device = next((p.device for p in prefix.parameters()), torch.device("cpu"))
        flags = {m: m.training for m in prefix.modules()}
        prefix.eval()
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
        feats, mirrored, targets = [], [], []
        try:
            with torch.no_grad():
                for images, labels in tqdm(loader, desc="prefix cache", disable=not progress):
                    images = images.to(device)
                    feats.append(prefix(images))
                    if flips:
                        mirrored.append(prefix(images.flip(-1)))
                    targets.append(torch.as_tensor(labels))
        finally:
            for m, flag in flags.items():
                m.training = flag
        if not feats:
            raise ValueError("the dataset is empty; nothing to cache")
        self.features = torch.cat(feats)
        self.mirrored = torch.cat(mirrored) if flips else None
        self.targets = torch.cat(targets).tolist()
        self.classes = list(getattr(dataset, "classes", []))
        self.build_seconds = time.perf_counter() - start

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if self.mirrored is not None and torch.rand(1) < 0.5:
            return self.mirrored[index], self.targets[index]
        return self.features[index], self.targets[index]

    def nbytes(self) -> int:
        """Bytes held by the cached features."""
        held = [self.features] + ([self.mirrored] if self.mirrored is not None else [])
        return sum(t.untyped_storage().nbytes() for t in held)


def step_speedup(
    uncached: Iterable[Any],
    cached: Iterable[Any],
    run_uncached: Callable[[Any], object],
    run_cached: Callable[[Any], object],
    num_batches: int = 3,
) -> dict[str, float]:
    """Seconds per training batch with and without the prefix cache, and their ratio.

    Each pipeline is timed end to end (loading and transforming the batch, then
    ``run_*``: forward and backward) over ``num_batches`` batches after one untimed
    batch.  Returns ``uncached_s_per_batch``, ``cached_s_per_batch`` and
    ``speedup`` (uncached over cached).
    """

    def per_batch(batches: Iterable[Any], run: Callable[[Any], object]) -> float:
        it = iter(batches)
        run(next(it))
        start = time.perf_counter()
        done = 0
        for batch in it:
            run(batch)
            done += 1
            if done == num_batches:
                break
        if done == 0:
            raise ValueError("the loader has too few batches to time")
        return (time.perf_counter() - start) / done

    slow = per_batch(uncached, run_uncached)
    fast = per_batch(cached, run_cached)
    return {"uncached_s_per_batch": slow, "cached_s_per_batch": fast, "speedup": slow / fast}
