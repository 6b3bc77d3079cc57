"""The gradient angle of Sec. 3.1 (Q1) and Fig. 2, 4: how far a method's gradient turns."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["gradient_angle"]


def gradient_angle(reference: Sequence[torch.Tensor], other: Sequence[torch.Tensor]) -> float:
    """Angle in degrees between two gradients given as lists of tensors (Sec. 3.1, Fig. 2).

    Both are flattened and concatenated (in float64); the angle is
    ``arccos(<g_ref, g> / (|g_ref| |g|))``.  Returns 90 when either gradient is zero.
    Above 90 degrees the method's gradient points away from the reference (a
    negative inner product), which Theorem 1 excludes only when the feature mode
    alone is compressed (:mod:`lance_lib.layers`).
    """
    a = torch.cat([t.detach().reshape(-1).to(torch.float64).cpu() for t in reference])
    b = torch.cat([t.detach().reshape(-1).to(torch.float64).cpu() for t in other])
    if a.shape != b.shape:
        raise ValueError("gradients have different numbers of elements")
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return 90.0
    cos = torch.clamp(a @ b / (na * nb), -1.0, 1.0)
    return float(torch.rad2deg(torch.arccos(cos)))
