"""Baselines LANCE is compared with, one file each.

* :mod:`.hosvd_step` - per-step HOSVD (a fresh decomposition every step), and the
  :class:`PerStepLayer` plumbing the other per-step baselines share;
* :mod:`.asi` - ASI, one warm-started subspace-iteration step per mode and step;
* :mod:`.loract` - LoRAct, an online sampled-row sketch of the flattened input;
* :mod:`.checkpointing` - recomputation of the trainable region.

Plain backpropagation needs no module.  Choose any method by name through
:func:`lance_lib.methods.apply_method`.
"""

from .asi import AsiConv2d, AsiLinear, subspace_iteration_step
from .checkpointing import Checkpointed, checkpoint_region
from .hosvd_step import (
    HosvdStepConv2d,
    HosvdStepLinear,
    PerStepLayer,
    mode_subspace,
    step_factors,
    tucker_elements,
)
from .loract import LoRActConv2d, LoRActLinear, loract_rank, row_sketch

__all__ = [
    "AsiConv2d",
    "AsiLinear",
    "Checkpointed",
    "HosvdStepConv2d",
    "HosvdStepLinear",
    "LoRActConv2d",
    "LoRActLinear",
    "PerStepLayer",
    "checkpoint_region",
    "loract_rank",
    "mode_subspace",
    "row_sketch",
    "step_factors",
    "subspace_iteration_step",
    "tucker_elements",
]
