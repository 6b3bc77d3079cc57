"""The runs behind Fig. 2 and Fig. 4/6: gradient angle and memory against modes and eps.

Fig. 2 of LANCE plots the angle between BP's and LANCE's weight gradients across
epochs; Fig. 4 (and Fig. 6) the angle over the last epochs, the memory ratio and the
accuracy against the energy threshold ``eps``.  Both notebooks also show the **modes
ablation**: the same runs with every mode compressed (``"all"``, Eq. 1 as written),
every mode but the batch mode (``"no_batch"``) and the channel mode only
(``"channel"``, the fine-tuning default, the case Theorem 1 covers), so that a reader
sees, side by side, what compressing the batch and spatial modes saves in memory and
costs in gradient direction.

The sweeps registered here (``fig2_angle``, ``fig4_eps_gradient``) turn a notebook's
parameters into :class:`~lance_lib.experiments.finetune_config.FinetuneConfig` runs;
:func:`angle_rows` and :func:`fidelity_rows` turn their records into the tables the
notebooks plot.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lance_lib.experiments.base import register_sweep
from lance_lib.experiments.finetune_config import FinetuneConfig
from lance_lib.experiments.finetune_sweeps import finetune_config
from lance_lib.methods.registry import settings_class

if TYPE_CHECKING:  # pandas is imported when a table is built
    import pandas as pd

__all__ = ["MODES_ABLATION", "angle_rows", "fidelity_rows", "fig2_angle", "fig4_eps_gradient"]

#: The mode selections of the ablation, from most to least compressed.
MODES_ABLATION: tuple[str, ...] = ("all", "no_batch", "channel")

#: Methods whose settings include the compressed modes.
_WITH_MODES = ("lance", "hosvd", "asi")


def _runs(
    params: Mapping[str, Any], methods: Sequence[str], **changes: Any
) -> list[FinetuneConfig]:
    """BP, then each method (once per ``modes_values`` entry when it has modes)."""
    out = [finetune_config(params, method="bp", **changes)]
    for method in methods:
        if method == "bp":
            continue
        if method in _WITH_MODES:
            default = settings_class(method)().modes
            for modes in params.get("modes_values") or MODES_ABLATION:
                # the default's run is the one the other notebooks make: share its record
                options = {} if modes == default else {"modes": modes}
                out.append(
                    finetune_config(params, method=method, method_options=options, **changes)
                )
        else:
            out.append(finetune_config(params, method=method, **changes))
    return out


@register_sweep("fig2_angle")
def fig2_angle(params: Mapping[str, Any]) -> list[FinetuneConfig]:
    """Fig. 2: per model, dataset and layer count, BP and each method per modes setting.

    Reads ``models``, ``datasets``, ``layer_counts``, ``methods`` (default
    ``["lance"]``) and ``modes_values`` (default :data:`MODES_ABLATION`).
    """
    out = []
    for model in params["models"]:
        for dataset in params["datasets"]:
            for layers in params["layer_counts"]:
                methods = params.get("methods") or ["lance"]
                out += _runs(params, methods, model=model, dataset=dataset, layers=layers)
    return out


@register_sweep("fig4_eps_gradient")
def fig4_eps_gradient(params: Mapping[str, Any]) -> list[FinetuneConfig]:
    """Fig. 4/6: per model and dataset, BP and LANCE at every ``eps`` and modes setting.

    Reads ``models``, ``datasets``, ``eps_values`` and ``modes_values`` (default
    :data:`MODES_ABLATION`).
    """
    out = []
    for model in params["models"]:
        for dataset in params["datasets"]:
            out.append(finetune_config(params, method="bp", model=model, dataset=dataset))
            for eps in params["eps_values"]:
                out += _runs(params, ["lance"], model=model, dataset=dataset, eps=eps)[1:]
    return out


def _modes(record: Mapping[str, Any]) -> str | None:
    """The record's compressed modes as text (``None`` for methods without modes)."""
    modes = record["settings"]["method_settings"].get("modes")
    return modes if modes is None or isinstance(modes, str) else str(modes)


def _setting(record: Mapping[str, Any]) -> tuple:
    s = record["settings"]
    return s["model"], s["dataset"], s["layers"], s["batch_size"], s["resolution"]


def angle_rows(records: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per record and epoch: the angle to BP at the epoch's start and the accuracy.

    Columns ``model, dataset, method, modes, layers, epoch, angle_deg, accuracy`` (%);
    BP's records are left out (their angle is 0).
    """
    import pandas as pd

    rows = []
    for r in records:
        s = r["settings"]
        if s["method"] == "bp":
            continue
        for epoch, angle in enumerate(r["angle_deg"], start=1):
            rows.append(
                {
                    "model": s["model"],
                    "dataset": s["dataset"],
                    "method": s["method"],
                    "modes": _modes(r),
                    "layers": s["layers"],
                    "epoch": epoch,
                    "angle_deg": angle,
                    "accuracy": 100 * r["accuracy"][epoch - 1],
                }
            )
    return pd.DataFrame(rows)


def fidelity_rows(
    records: Sequence[Mapping[str, Any]], *, last_epochs: int | None = None
) -> pd.DataFrame:
    """One row per non-BP record: angle, memory and accuracy beside BP of the same setting.

    Parameters
    ----------
    records
        Fine-tuning records, BP's among them (one per model, dataset, layer count,
        batch size and resolution).
    last_epochs
        Average the angle over this many final epochs (Fig. 4); ``None``: all.

    Returns
    -------
    pandas.DataFrame
        ``model, dataset, layers, method, eps, modes``; ``angle_first`` (before
        training), ``angle_mean``, ``angle_std`` (over the last epochs),
        ``epochs_averaged``; ``memory_ratio`` (Appendix C, method / BP, the treated
        layers), ``measured_memory_ratio`` (saved-tensor bytes of the treated layers,
        method / BP's record); ``accuracy`` and ``bp_accuracy`` (%); ``results_file``.
    """
    import numpy as np
    import pandas as pd

    bp = {_setting(r): r for r in records if r["settings"]["method"] == "bp"}
    rows = []
    for r in records:
        s = r["settings"]
        if s["method"] == "bp":
            continue
        ref = bp.get(_setting(r))
        if ref is None:
            raise ValueError(
                f"no BP record for {_setting(r)} among the records; include the BP run of "
                "the same model, dataset, layers, batch size and resolution"
            )
        angles = np.asarray(r["angle_deg"][-last_epochs:] if last_epochs else r["angle_deg"])
        m = r["measurements"]
        rows.append(
            {
                "model": s["model"],
                "dataset": s["dataset"],
                "layers": s["layers"],
                "method": s["method"],
                "eps": s["eps"],
                "modes": _modes(r),
                "angle_first": float(r["angle_deg"][0]),
                "angle_mean": float(angles.mean()),
                "angle_std": float(angles.std()),
                "epochs_averaged": int(len(angles)),
                "memory_ratio": m["analytic_mb"] / m["analytic_bp_mb"],
                "measured_memory_ratio": m["measured_layer_bytes"]
                / ref["measurements"]["measured_layer_bytes"],
                "accuracy": 100 * r["final_accuracy"],
                "bp_accuracy": 100 * ref["final_accuracy"],
                "results_file": Path(r["path"]).name,
            }
        )
    return pd.DataFrame(rows)
