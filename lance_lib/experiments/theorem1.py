"""Theorem 1 checked numerically: LANCE's weight gradient is that of the projected input.

Theorem 1 of LANCE states that the weight gradient computed from the stored core (Eq. 4)
equals the gradient of the layer applied to the input reconstructed from its core
(Eq. 1). :func:`theorem1_max_relative_error` measures the largest relative deviation
over Conv2d and Linear cases and every mode setting; the claims scorecard
(:mod:`lance_lib.reporting.claims`, claim a) compares it with 1e-10.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["theorem1_max_relative_error"]


def theorem1_max_relative_error(seed: int = 0) -> float:
    """Largest relative error between LANCE's weight gradient and that of the projected input.

    Float64, random orthonormal factors, every mode setting (all, no batch, channel
    only) on Conv2d cases (stride, padding, dilation, groups with the channel mode
    compressed below ``C / groups``, depthwise) and Linear on 2-D and 3-D inputs; the
    reference is ``torch.nn.grad.conv2d_weight`` (or ``delta^T x``) of the input
    reconstructed from its core (Eq. 1, Eq. 4).
    """
    from lance_lib.hosvd import project, reconstruct
    from lance_lib.layers import lance_conv2d, lance_linear

    g = torch.Generator().manual_seed(seed)

    def orth(n: int, r: int) -> torch.Tensor:
        q, _ = torch.linalg.qr(torch.randn(n, r, dtype=torch.float64, generator=g))
        return q

    def factors(shape: Sequence[int], ranks: Sequence[int], keep: Sequence[bool]) -> list:
        return [orth(n, r) if k else None for n, r, k in zip(shape, ranks, keep, strict=True)]

    modes = {
        "all": (True, True, True, True),
        "no_batch": (False, True, True, True),
        "channel": (False, True, False, False),
    }
    conv_cases = [
        dict(c=8, o=6, k=3, stride=1, padding=1, dilation=1, groups=1, ranks=(3, 4, 5, 4)),
        dict(c=8, o=6, k=3, stride=2, padding=0, dilation=1, groups=1, ranks=(4, 3, 4, 5)),
        dict(c=8, o=6, k=3, stride=1, padding=2, dilation=2, groups=1, ranks=(3, 5, 6, 4)),
        dict(c=8, o=8, k=3, stride=1, padding=1, dilation=1, groups=2, ranks=(3, 3, 5, 5)),
        dict(c=6, o=6, k=3, stride=1, padding=1, dilation=1, groups=6, ranks=(4, 6, 5, 5)),
    ]
    worst = 0.0
    for case in conv_cases:
        for keep in modes.values():
            shape = (5, case["c"], 9, 8)
            x = torch.randn(*shape, dtype=torch.float64, generator=g)
            w = torch.randn(
                case["o"], case["c"] // case["groups"], case["k"], case["k"],
                dtype=torch.float64, generator=g, requires_grad=True,
            )  # fmt: skip
            fs = factors(shape, case["ranks"], keep)
            conf = dict(stride=case["stride"], padding=case["padding"],
                        dilation=case["dilation"], groups=case["groups"])  # fmt: skip
            out = lance_conv2d(
                x, w, None, fs, (case["stride"],) * 2, (case["padding"],) * 2,
                (case["dilation"],) * 2, case["groups"],
            )  # fmt: skip
            delta = torch.randn(out.shape, dtype=torch.float64, generator=g)
            out.backward(delta)
            projected = reconstruct(project(x, fs), fs)
            expected = torch.nn.grad.conv2d_weight(projected, w.shape, delta, **conf)
            worst = max(worst, float((w.grad - expected).norm() / expected.norm()))
    for shape in ((12, 10), (4, 6, 10)):
        for full in (True, False):
            x = torch.randn(*shape, dtype=torch.float64, generator=g)
            w = torch.randn(5, 10, dtype=torch.float64, generator=g, requires_grad=True)
            ranks = [max(1, n - 3) for n in shape]
            keep = [full] * (len(shape) - 1) + [True]
            fs = factors(shape, ranks, keep)
            out = lance_linear(x, w, None, fs)
            delta = torch.randn(out.shape, dtype=torch.float64, generator=g)
            out.backward(delta)
            projected = reconstruct(project(x, fs), fs)
            expected = delta.reshape(-1, 5).T @ projected.reshape(-1, 10)
            worst = max(worst, float((w.grad - expected).norm() / expected.norm()))
    return worst
