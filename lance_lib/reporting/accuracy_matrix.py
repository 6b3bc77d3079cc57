"""The continual-learning accuracy matrix ``A[j, i]`` as a heatmap."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.axes
import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns

__all__ = ["plot_accuracy_matrix"]


def plot_accuracy_matrix(
    acc_matrix: Sequence[Sequence[float]] | np.ndarray,
    ax: matplotlib.axes.Axes | None = None,
    *,
    title: str | None = None,
    percent: bool | None = None,
    colorbar: bool = True,
) -> matplotlib.axes.Axes:
    """Heatmap of the continual-learning accuracy matrix ``A[j, i]``.

    Row ``j`` is "after training task j", column ``i`` "accuracy on task i".  Only the
    lower triangle (``i <= j``, tasks already seen) is drawn.  ACC is the mean of the
    last row and BWT the mean of ``A[T, i] - A[i, i]`` over ``i < T`` (GPM style).

    Parameters
    ----------
    acc_matrix
        Square ``(T, T)`` array; fractions in [0, 1] or percentages.
    ax
        Axes to draw on; a new figure when ``None``.
    title
        Axes title.
    percent
        Whether values are percentages; guessed (any value > 1) when ``None``.
    colorbar
        Draw the colour bar beside the matrix (several matrices share one:
        :func:`lance_lib.reporting.paper_figures.plot_accuracy_matrices`).

    Returns
    -------
    Axes

    Raises
    ------
    ValueError
        ``acc_matrix`` is not a non-empty square matrix.
    """
    a = np.asarray(acc_matrix, dtype=float)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] == 0:
        raise ValueError(f"acc_matrix must be a non-empty square matrix, got shape {a.shape}")
    if percent is None:
        percent = bool(np.nanmax(a) > 1.0)
    values = a if percent else 100.0 * a
    mask = np.triu(np.ones_like(values, dtype=bool), k=1)
    if ax is None:
        size = 1.2 + 0.45 * a.shape[0]
        _, ax = plt.subplots(figsize=(size + 1.0, size))
    sns.heatmap(
        values,
        mask=mask,
        ax=ax,
        vmin=0.0,
        vmax=100.0,
        cmap="viridis",
        annot=a.shape[0] <= 12,
        fmt=".0f",
        square=True,
        cbar=colorbar,
        cbar_kws={"label": "accuracy (%)"} if colorbar else None,
        xticklabels=range(1, a.shape[0] + 1),
        yticklabels=range(1, a.shape[0] + 1),
    )
    ax.set_xlabel("evaluated on task i")
    ax.set_ylabel("after training task j")
    if title:
        ax.set_title(title)
    return ax
