"""Continual-learning metrics: the accuracy matrix, ACC and BWT (Eq. 6 of LANCE).

The primary record of a task-incremental run is the accuracy matrix ``A[j, i]``, the
test accuracy on task ``i`` after training task ``j`` (0-based here, ``i <= j``; entries
above the diagonal are zero). ACC and BWT are computed from it as GPM computes them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["accuracy_matrix", "average_accuracy", "backward_transfer"]

Matrix = Sequence[Sequence[float]] | torch.Tensor


def accuracy_matrix(values: Matrix) -> torch.Tensor:
    """``values`` as a float64 ``T x T`` tensor, or a ``ValueError`` saying what is wrong.

    Parameters
    ----------
    values
        ``A[j, i]``: accuracy on task ``i`` after training task ``j``.

    Returns
    -------
    torch.Tensor
        The square matrix.
    """
    a = torch.as_tensor(values, dtype=torch.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] == 0:
        raise ValueError(
            "the accuracy matrix must be square T x T (A[j, i]: accuracy on task i after "
            f"training task j), got shape {tuple(a.shape)}"
        )
    return a


def average_accuracy(acc_matrix: Matrix) -> float:
    """ACC of Eq. (6): the mean over tasks ``i`` of ``A[T, i]`` (the last row).

    Parameters
    ----------
    acc_matrix
        ``T x T`` matrix (see :func:`accuracy_matrix`).

    Returns
    -------
    float
        In the matrix's units (percent in this project's records).
    """
    return float(accuracy_matrix(acc_matrix)[-1].mean())


def backward_transfer(acc_matrix: Matrix) -> float | None:
    """BWT of Eq. (6): the mean over ``i < T`` of ``A[T, i] - A[i, i]``.

    Parameters
    ----------
    acc_matrix
        ``T x T`` matrix (see :func:`accuracy_matrix`).

    Returns
    -------
    float or None
        Negative when earlier tasks were forgotten; ``None`` for a single task (there
        is no earlier task to forget).
    """
    a = accuracy_matrix(acc_matrix)
    if a.shape[0] == 1:
        return None
    return float((a[-1, :-1] - a.diagonal()[:-1]).mean())
