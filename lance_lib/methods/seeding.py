"""Per-layer random streams: reproducible, and independent from layer to layer.

The per-step baselines draw random numbers in every training step (LoRAct's sampled
columns, ASI's step-1 test matrices).  Each treated layer gets its own CPU generator,
seeded from the run's seed *and the layer's name*, so that a run is reproducible while
two layers of the same size never draw the same samples (which one shared seed would
make them do), and every step draws fresh ones.
"""

from __future__ import annotations

import zlib

import torch

__all__ = ["layer_generator", "layer_seed"]


def layer_seed(seed: int, name: str) -> int:
    """A 63-bit seed from the run's ``seed`` and a layer ``name`` (CRC-32 of the name)."""
    return (int(seed) * 0x9E3779B1 + zlib.crc32(name.encode())) % (2**63)


def layer_generator(seed: int, name: str) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded by :func:`layer_seed`."""
    return torch.Generator().manual_seed(layer_seed(seed, name))
