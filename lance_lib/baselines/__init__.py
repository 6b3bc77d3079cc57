"""Baselines LANCE is compared with, one file each.

* :mod:`.hosvd_step` - per-step HOSVD (a fresh decomposition every step), and the
  :class:`PerStepLayer` plumbing the other per-step baselines share;
* :mod:`.asi` - ASI, one warm-started subspace-iteration step per mode and step;
* :mod:`.loract` - LoRAct, an online sampled-row sketch of the flattened input;
* :mod:`.loract_prenorm` - LoRAct's pre-norm trick for transformer blocks: one
  sketched LayerNorm output serves the norm's and its projection's backward;
* :mod:`.checkpointing` - recomputation of the trainable region.

Plain backpropagation needs no module.  Choose any method by name through
:func:`lance_lib.methods.apply_method` (the pre-norm trick, which replaces a LayerNorm
and its projection together, through :func:`lance_lib.transformer.apply_block_method`).
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
from .loract_prenorm import LoRActPreNorm, layer_norm_backward, prenorm_linear

__all__ = [
    "AsiConv2d",
    "AsiLinear",
    "Checkpointed",
    "HosvdStepConv2d",
    "HosvdStepLinear",
    "LoRActConv2d",
    "LoRActLinear",
    "LoRActPreNorm",
    "PerStepLayer",
    "checkpoint_region",
    "layer_norm_backward",
    "loract_rank",
    "mode_subspace",
    "prenorm_linear",
    "row_sketch",
    "step_factors",
    "subspace_iteration_step",
    "tucker_elements",
]
