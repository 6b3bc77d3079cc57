"""Continual learning with LANCE (Sec. 2.3): Phase III memory, strategies, benchmarks.

==============  ==================================================================
``metrics``     the accuracy matrix ``A[j, i]``, ACC and BWT (Eq. 6)
``memory``      Phase III (Eq. 5), null-space calibration and its rank rules,
                the interference bound
``strategies``  the strategy registry; LANCE, sequential fine-tuning, multitask
``gpm``         the GPM baseline
``training``    the task-incremental protocol (Table 7's schedule) on the one loop
``specs``       plain data: :class:`BenchmarkSpec`, :class:`ContinualTask`,
                :class:`TaskLayers`, GPM's sample counts
``benchmarks``  the benchmark registry, task loading
``summary``     table rows from records (ACC, BWT, memory, ranks, frozen layers)
==============  ==================================================================

Importing the package registers its strategies and benchmarks. The continual
experiment (its config, cached record and the Table 3 sweep) is
:mod:`lance_lib.experiments.continual`: ``run_benchmark("cifar10_mini", "lance")`` there
runs LANCE on the embedded 5-task CIFAR-10 subset.

References
----------
Apolinario & Roy, "LANCE: Low Rank Activation Compression for Efficient On-Device
Continual Learning", arXiv:2509.21617, Sec. 2.3, Algorithm 1, Eq. (5)-(6),
Appendix A.2 (Tables 5-7).
"""

from lance_lib.continual.benchmarks import (
    BENCHMARKS,
    build_benchmark_model,
    load_benchmark,
    register_benchmark,
)
from lance_lib.continual.gpm import (
    GPM,
    project_gradients,
    representation_matrices,
    update_bases,
)
from lance_lib.continual.memory import (
    DEFAULT_NULL_SPACE_RULE,
    NULL_SPACE_RULES,
    MemoryUpdate,
    NullSpaceRule,
    SaturationWarning,
    frozen_layers,
    interference,
    null_space_calibration,
    update_memory,
)
from lance_lib.continual.metrics import accuracy_matrix, average_accuracy, backward_transfer
from lance_lib.continual.specs import REFERENCE_SAMPLES, BenchmarkSpec, ContinualTask, TaskLayers
from lance_lib.continual.strategies import (
    STRATEGIES,
    ContinualStrategy,
    FineTune,
    LanceCL,
    Multitask,
    SequentialStrategy,
    backbone_layers,
    build_strategy,
    register_strategy,
)
from lance_lib.continual.summary import layer_rank_rows, record_row
from lance_lib.continual.training import (
    PlateauSchedule,
    layer_input_shapes,
    run_continual,
    task_accuracy,
    train_multitask,
    validation_loss,
)

__all__ = [
    "BENCHMARKS",
    "DEFAULT_NULL_SPACE_RULE",
    "GPM",
    "NULL_SPACE_RULES",
    "REFERENCE_SAMPLES",
    "STRATEGIES",
    "BenchmarkSpec",
    "ContinualStrategy",
    "ContinualTask",
    "FineTune",
    "LanceCL",
    "MemoryUpdate",
    "Multitask",
    "NullSpaceRule",
    "PlateauSchedule",
    "SaturationWarning",
    "SequentialStrategy",
    "TaskLayers",
    "accuracy_matrix",
    "average_accuracy",
    "backbone_layers",
    "backward_transfer",
    "build_benchmark_model",
    "build_strategy",
    "frozen_layers",
    "interference",
    "layer_input_shapes",
    "layer_rank_rows",
    "load_benchmark",
    "null_space_calibration",
    "project_gradients",
    "record_row",
    "register_benchmark",
    "register_strategy",
    "representation_matrices",
    "run_continual",
    "task_accuracy",
    "train_multitask",
    "update_bases",
    "update_memory",
    "validation_loss",
]
