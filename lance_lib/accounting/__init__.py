"""Accounting: activation memory (analytic and measured), FLOPs, timing, gradient angle.

==========  ==============================================================================
``memory``  Appendix C's elements, the published MB convention, measured saved tensors
            (:func:`measure_saved_tensors`, :class:`SavedBytesCounter`), CUDA peaks
``region``  :func:`region_memory_table`: what the whole trainable region keeps per module
``flops``   Appendix C's FLOPs (Eq. 7-9), measured FLOPs
``timing``  device-synchronised step timing
``angle``   the gradient angle of Sec. 3.1 and Fig. 2
==========  ==============================================================================

Two analytic memory conventions are kept apart: :func:`subspace_elements` (LANCE's
Appendix C: ``prod_i r_i + sum_i n_i r_i`` elements against ``prod_i n_i``) and
:func:`published_mb` (the published baselines' and the paper's tables' convention:
the fine-tuned convolutions' inputs only, ``elements x 4 / 2**20``, which gives the
paper's 61.25 MB for ResNet18's last 4 convs at batch 128 and 224 px).
"""

from .angle import gradient_angle
from .flops import measure_flops, paper_flops
from .memory import (
    MIB,
    SavedBytesCounter,
    SavedTensorReport,
    cuda_peak_bytes,
    measure_saved_tensors,
    module_kind,
    published_mb,
    subspace_elements,
)
from .region import region_memory_table
from .timing import synchronizer, time_step

__all__ = [
    "MIB",
    "SavedBytesCounter",
    "SavedTensorReport",
    "cuda_peak_bytes",
    "gradient_angle",
    "measure_flops",
    "measure_saved_tensors",
    "module_kind",
    "paper_flops",
    "published_mb",
    "region_memory_table",
    "subspace_elements",
    "synchronizer",
    "time_step",
]
