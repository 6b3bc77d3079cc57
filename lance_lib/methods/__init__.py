"""Training methods: one table, one registry, one harness, one file per method.

==================  =============================================================
``registry``        :data:`METHOD_TABLE` (name, label, colour, paper name) and
                    :func:`register_method`
``harness``         :func:`apply_method`, :class:`MethodHandle`,
                    :func:`measure_method` (a :class:`MethodMeasurement`),
                    :func:`angle_to_bp`, :func:`method_settings`
``lance``           ``bp`` and ``lance`` (Algorithm 1)
``hosvd_step``      ``hosvd``: a fresh HOSVD every step (ref. [31]); the per-step
                    layer plumbing
``asi``             ``asi``: warm-started subspace iteration (ref. [30])
``loract``          ``loract``: LoRAct's sampled-column QB sketch, layer by layer
``loract_prenorm``  ``loract_prenorm`` and ``loract_prenorm_linear``: LoRAct for
                    pre-norm transformer blocks, its pre-norm mode and the
                    LayerNorm + first projection variant
``checkpointing``   ``checkpoint``: recomputation of the region in N segments
``seeding``         per-layer random streams
==================  =============================================================

Importing the package registers every method; :data:`METHODS` lists the layer
methods, :data:`BLOCK_METHODS` those compared on transformer blocks. Both kinds run
through the same :func:`apply_method`, :func:`measure_method` and :func:`angle_to_bp`.
"""

from .asi import AsiConv2d, AsiLinear, AsiSettings, random_range_finder, subspace_iteration_step
from .checkpointing import Checkpointed, CheckpointSettings, checkpoint_region
from .harness import (
    MethodHandle,
    MethodMeasurement,
    angle_to_bp,
    apply_method,
    measure_method,
    measure_methods,
    method_settings,
    speed_floor,
)
from .hosvd_step import (
    HosvdSettings,
    HosvdStepConv2d,
    HosvdStepLinear,
    PerLayerSettings,
    PerStepLayer,
    mode_subspace,
    step_factors,
    tucker_elements,
)
from .lance import BpSettings, LanceSettings
from .loract import LoRActConv2d, LoRActLinear, LoRActSettings, loract_rank, qb_sketch, row_sketch
from .loract_prenorm import LoRActPreNormBlockSettings, LoRActPreNormLinearSettings
from .registry import (
    METHOD_TABLE,
    Applied,
    MethodInfo,
    MethodSettings,
    method_color,
    method_info,
    method_label,
    register_method,
    registered_methods,
)

#: The registered layer methods, in display order (``bp``, ``lance``, ``hosvd``, ...).
METHODS: tuple[str, ...] = tuple(
    n for n, info in METHOD_TABLE.items() if n in registered_methods() and info.kind == "layer"
)
#: The methods compared on the blocks of a pre-norm transformer, in display order: the
#: layer methods that treat every block Linear on its own, then the block methods.
BLOCK_METHODS: tuple[str, ...] = (
    "bp",
    "lance",
    "loract",
    "loract_prenorm",
    "loract_prenorm_linear",
)

__all__ = [
    "BLOCK_METHODS",
    "METHODS",
    "METHOD_TABLE",
    "Applied",
    "AsiConv2d",
    "AsiLinear",
    "AsiSettings",
    "BpSettings",
    "CheckpointSettings",
    "Checkpointed",
    "HosvdSettings",
    "HosvdStepConv2d",
    "HosvdStepLinear",
    "LanceSettings",
    "LoRActConv2d",
    "LoRActLinear",
    "LoRActPreNormBlockSettings",
    "LoRActPreNormLinearSettings",
    "LoRActSettings",
    "MethodHandle",
    "MethodInfo",
    "MethodMeasurement",
    "MethodSettings",
    "PerLayerSettings",
    "PerStepLayer",
    "angle_to_bp",
    "apply_method",
    "checkpoint_region",
    "loract_rank",
    "measure_method",
    "measure_methods",
    "speed_floor",
    "method_color",
    "method_info",
    "method_label",
    "method_settings",
    "mode_subspace",
    "qb_sketch",
    "random_range_finder",
    "register_method",
    "registered_methods",
    "row_sketch",
    "step_factors",
    "subspace_iteration_step",
    "tucker_elements",
]
