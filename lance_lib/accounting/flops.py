"""FLOPs: Appendix C's estimate and measured counts.

* :func:`paper_flops` - Eq. (7)-(9) of LANCE for a 3-mode activation, with the one
  self-consistent reading of Eq. (8) (see its notes);
* :func:`measure_flops` - ``torch.utils.flop_counter.FlopCounterMode`` around a call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch.utils.flop_counter import FlopCounterMode

__all__ = ["measure_flops", "paper_flops"]


def paper_flops(n: Sequence[int], n_hat: int, r: Sequence[int] | None = None) -> dict[str, float]:
    """Multiply-accumulates of Appendix C, Eq. (7)-(9), for a 3-mode activation.

    The layer maps the last mode ``n_3`` of ``X`` (``(n_1, n_2, n_3)``) to ``n_hat``
    (a Linear layer on a ``(batch, tokens, features)`` input, or an unfolded
    convolution).  Without ``r`` the BP counts of Eq. (9) are returned; with ``r`` those
    of LANCE, Eq. (7)-(8).  As in the paper, only the weight gradient counts in the
    backward pass (Eq. 9 gives BP's backward as ``n_hat prod_i n_i``).

    Returns
    -------
    dict
        ``{"forward", "backward", "total"}``.

    Notes
    -----
    Eq. (8) is printed as

    ``FLOPs_BW = prod_i n_i r_i + prod_i r_i n_2 + r_1 n_2 r_3 n_3 + r_1 n_2 n_3 n_hat``,

    whose first term, ``n_1 r_1 n_2 r_2 n_3 r_3``, exceeds BP's whole backward
    ``n_hat n_1 n_2 n_3`` as soon as ``r_1 r_2 r_3 > n_hat``, so that LANCE's backward
    would cost more than BP's at any useful rank, contradicting the ~1.5x saving the
    appendix derives from it.  The other three terms describe one computation of the
    weight gradient from the core: expand mode 2 (``G x_2 U_2``: ``r_1 r_2 r_3 n_2``),
    expand mode 3 (``r_1 n_2 r_3 n_3``), and contract with the output gradient
    projected on the batch factor (``r_1 n_2 n_3 n_hat``).  That projection,
    ``delta x_1 U_1^T``, costs ``n_1 r_1 n_2 n_hat``, and it is missing from the printed
    sum; we read the first term as that cost (the mirror of Eq. (7)'s first
    projection term):

    ``FLOPs_BW = n_1 r_1 n_2 n_hat + r_1 r_2 r_3 n_2 + r_1 n_2 r_3 n_3 + r_1 n_2 n_3 n_hat``.

    For small ranks (the appendix's ``r_i << n_i``) it is far below BP's backward;
    ``tests/test_accounting.py`` counts the four operations with ``FlopCounterMode``.
    """
    n1, n2, n3 = n
    if r is None:
        fw = bw = n_hat * n1 * n2 * n3
    else:
        r1, r2, r3 = r
        fw = n_hat * n1 * n2 * n3 + n1 * r1 * n2 * n3 + r1 * n2 * r2 * n3 + r1 * r2 * n3 * r3
        bw = n1 * r1 * n2 * n_hat + r1 * r2 * r3 * n2 + r1 * n2 * r3 * n3 + r1 * n2 * n3 * n_hat
    return {"forward": float(fw), "backward": float(bw), "total": float(fw + bw)}


def measure_flops(run: Callable[[], object]) -> int:
    """FLOPs counted by ``torch.utils.flop_counter.FlopCounterMode`` while ``run()`` runs.

    Include the backward call in ``run`` to count a whole training step.  Matrix
    products and convolutions are counted (2 per multiply-accumulate); QR, SVD and
    eigen-decompositions are not.
    """
    counter = FlopCounterMode(display=False)
    with counter:
        run()
    return int(counter.get_total_flops())
