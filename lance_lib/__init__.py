"""lance_lib: reference implementation of LANCE (arXiv:2509.21617).

One-shot HOSVD calibration of per-mode activation subspaces (Phase I), compressed
Conv2d/Linear layers that keep only the core tensor for backward (Phase II), and the
continual-learning memory of Phase III, with the paper's baselines and accounting.
"""

from .calibration import calibrate
from .layers import LanceConv2d, LanceLinear, compress, compressed, restore
from .subspaces import LayerSubspace, Subspaces

__all__ = [
    "LanceConv2d",
    "LanceLinear",
    "LayerSubspace",
    "Subspaces",
    "calibrate",
    "compress",
    "compressed",
    "restore",
]
__version__ = "0.1.0"
