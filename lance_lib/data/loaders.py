"""Seeded DataLoaders: a seed fixes the order of every epoch."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

__all__ = ["make_loader"]


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    train: bool,
    seed: int = 0,
    drop_last: bool | None = None,
    num_workers: int = 0,
) -> DataLoader:
    """Return a DataLoader whose order is fixed by ``seed``.

    Parameters
    ----------
    dataset : Dataset
        The dataset.
    batch_size : int
        Samples per batch.
    train : bool
        Shuffle (with a ``torch.Generator`` seeded by ``seed``) when True; keep the
        order otherwise.
    seed : int
        Seed of the shuffle (and of the workers' seeds when ``num_workers > 0``).
    drop_last : bool, optional
        Drop the last incomplete batch; default ``train`` (unless the dataset is smaller
        than one batch, which would leave no batch at all).
    num_workers : int
        Worker processes.

    Returns
    -------
    torch.utils.data.DataLoader
        The loader; iterating it twice gives a different order each epoch, the same
        sequence of orders for the same ``seed``.

    Notes
    -----
    With ``num_workers=0`` the random flips draw from torch's global generator, so set
    ``torch.manual_seed`` as well to fix the augmentation.
    """
    if drop_last is None:
        drop_last = train and len(dataset) >= batch_size
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train,
        drop_last=drop_last,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
    )
