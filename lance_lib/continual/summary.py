"""Table rows from continual-learning records (what the Table 3 notebook tabulates).

:func:`record_row` gives one run's ACC, BWT, memory in both conventions and how many
layers each task froze; :func:`layer_rank_rows` gives, per task, each layer's
input-feature (mode-``d``) rank and whether it was frozen. Both read only the record
(:mod:`lance_lib.experiments.continual`), so a notebook plots what the grid computed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lance_lib.continual.memory import NULL_SPACE_RULES
from lance_lib.continual.strategies import STRATEGIES

__all__ = ["feature_rank", "layer_rank_rows", "record_row", "variant"]


def variant(record: Mapping[str, Any]) -> str:
    """The method's name, with the settings that tell its variants apart: ``"lance/eq5"``."""
    spec = record["settings"]["spec"]
    keys = STRATEGIES[record["method"]].variant_settings
    return "/".join([record["method"], *(str(spec[k]) for k in keys)])


def feature_rank(ranks: list[int]) -> int:
    """The input-feature (mode-``d``) rank in a layer's ranks (channels for a 4-mode input)."""
    return ranks[1] if len(ranks) == 4 else ranks[-1]


def record_row(record: Mapping[str, Any]) -> dict[str, Any]:
    """One run as a table row.

    Returns
    -------
    dict
        ``benchmark``, ``method``, ``variant``, ``rule`` (the null-space rank rule's
        label for LANCE, else ``None``), ``seed``, ``ACC``, ``BWT``, ``Mem_MB`` (as stored, with
        ``memory_definition``), ``Mem_MB_projection`` (GPM: the ``n x n`` projection
        matrices its code keeps, the convention of the paper's GPM row; others: as
        stored), ``frozen_per_task`` (how many backbone layers each task froze) and
        ``label``.
    """
    memory = record["memory"]
    spec = record["settings"]["spec"]
    reads_rule = "memory_rule" in STRATEGIES[record["method"]].variant_settings
    rule = NULL_SPACE_RULES[spec["memory_rule"]].label if reads_rule else None
    return {
        "benchmark": record["benchmark"],
        "method": record["method"],
        "variant": variant(record),
        "rule": rule,
        "seed": record["settings"]["seed"],
        "ACC": record["ACC"],
        "BWT": record["BWT"],
        "Mem_MB": memory["mb"],
        "Mem_MB_projection": memory.get("projection_matrices_mb", memory["mb"]),
        "frozen_per_task": [len(f) for f in record["frozen_layers"]],
        "memory_definition": memory["definition"],
        "label": record["label"],
    }


def layer_rank_rows(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per task and layer: the mode-``d`` rank, its full size, and whether it was frozen."""
    rows = []
    first = record["layer_ranks"][0]
    for task, (ranks, frozen) in enumerate(
        zip(record["layer_ranks"], record["frozen_layers"], strict=True), start=1
    ):
        for layer, r in ranks.items():
            rows.append(
                {
                    "benchmark": record["benchmark"],
                    "variant": variant(record),
                    "seed": record["settings"]["seed"],
                    "task": task,
                    "layer": layer.removeprefix("backbone."),
                    "rank_d": feature_rank(r),
                    "size_d": feature_rank(first[layer]),
                    "frozen": layer in frozen,
                }
            )
    return rows
