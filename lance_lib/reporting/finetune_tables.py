"""Fine-tuning records as tables: one row per run, and ours beside the paper (Tables 1, 2, 8, 9).

The notebooks ``table1_split``, ``table2_finetune`` and ``fig3_ablation`` run the
configs of their sweep (:mod:`lance_lib.experiments.finetune_sweeps`) and pass the
records here; nothing in this module computes an experiment. Accuracy is the top-1 test
accuracy after the last epoch (%); ``analytic_mb`` is the published convention of
Appendix C (elements kept for the trained convolutions' weight gradients, 4 bytes
each); ``measured_mb`` what those layers really keep (saved-tensor hooks); ``flops``
those of one training step (``FlopCounterMode``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from lance_lib.experiments.finetune_config import FinetuneConfig
from lance_lib.experiments.finetune_sweeps import SMALL_BATCHES, fig3_points
from lance_lib.reporting.claim_records import record_name, settings_differences
from lance_lib.reporting.comparison import paper_vs_ours
from lance_lib.reporting.intervals import paired_interval
from lance_lib.reporting.paper_numbers import PAPER_DATASET, PAPER_MODEL, paper_table
from lance_lib.reporting.style import method_label

__all__ = [
    "fig3_rows",
    "finetune_rows",
    "paper_comparison",
    "seed_summary",
    "table1_comparison",
]

_KEYS = ["model", "dataset", "method", "layers", "batch_size"]


def finetune_rows(records: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per fine-tuning record.

    Parameters
    ----------
    records
        Records of :func:`lance_lib.experiments.finetune.finetune` (run with
        ``measure=True``).

    Returns
    -------
    DataFrame
        ``model, dataset, method, layers, batch_size, eps, num_batches, modes`` (LANCE's
        compressed modes, else ``None``), ``recalibrate`` (LANCE recalibrated every
        epoch, a diagnostic), ``epochs, lr_schedule, seed, classes, accuracy`` (%),
        ``analytic_mb, analytic_bp_mb, measured_mb, flops, step_s``, ``differs`` (how
        the run departs from the paper's protocol, ``""`` when it does not:
        :func:`~lance_lib.reporting.claim_records.settings_differences`, at the paper's
        batch 128, or the run's own batch for Tables 8-9) and ``results_file`` (relative
        to the repository).
    """
    rows = []
    for r in records:
        s, m = r["settings"], r["measurements"]
        batch = s["batch_size"] if s["batch_size"] in SMALL_BATCHES else 128
        if m is None:
            raise ValueError(f"{r.get('path')}: a table needs measured runs (measure=True)")
        rows.append(
            {
                **{key: s[key] for key in _KEYS},
                "eps": s["eps"],
                "num_batches": s["num_batches"],
                "modes": (s.get("method_settings") or {}).get("modes"),
                "recalibrate": bool(s.get("recalibrate")),
                "epochs": s["epochs"],
                "lr_schedule": s.get("lr_schedule", "constant"),
                "seed": s["seed"],
                "classes": r["classes"],
                "accuracy": 100 * r["final_accuracy"],
                "analytic_mb": m["analytic_mb"],
                "analytic_bp_mb": m["analytic_bp_mb"],
                "measured_mb": m["measured_layer_bytes"] / 2**20,
                "flops": m["flops_measured"],
                "step_s": m["step_s_median"],
                "differs": "; ".join(settings_differences(s, r["classes"], paper_batch=batch)),
                "results_file": record_name(r) if "path" in r else None,
            }
        )
    return pd.DataFrame(rows)


def seed_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Accuracy over seeds per setting, and each method's paired gap to BP.

    Parameters
    ----------
    df
        Rows of :func:`finetune_rows` (one per record, several seeds per setting).

    Returns
    -------
    DataFrame
        One row per ``model, dataset, method, modes, recalibrate, layers, batch_size,
        eps, num_batches, epochs, lr_schedule``: ``seeds`` (list), ``acc mean``,
        ``acc std`` (``NaN`` for one seed), and for methods other than BP ``gap to BP``
        (mean per-seed difference, points), ``gap std``, ``gap 95% CI low`` and ``high``
        (paired t-interval over the seeds both ran; ``NaN`` for one seed: no interval)
        and ``paired seeds``.
    """
    import numpy as np

    keys = ["model", "dataset", "method", "modes", "recalibrate", "layers", "batch_size", "eps",
            "num_batches", "epochs", "lr_schedule"]  # fmt: skip
    pair = ["model", "dataset", "layers", "batch_size", "epochs", "lr_schedule", "seed"]
    bp = df[df.method == "bp"].set_index(pair)["accuracy"]
    bp = bp[~bp.index.duplicated()]
    rows = []
    for values, group in df.groupby(keys, dropna=False, sort=False):
        row = dict(zip(keys, values, strict=True))
        acc = group.sort_values("seed")
        row.update(seeds=acc.seed.tolist(), **{"acc mean": acc.accuracy.mean(),
                   "acc std": acc.accuracy.std() if len(acc) > 1 else np.nan})  # fmt: skip
        gaps = []
        for r in acc.itertuples() if row["method"] != "bp" else ():
            key = tuple(getattr(r, c) for c in pair)
            if key in bp.index:
                gaps.append((int(r.seed), r.accuracy - bp[key]))
        if gaps:
            iv = paired_interval([g for _, g in gaps], [s for s, _ in gaps])
            row.update({"gap to BP": iv.mean, "gap std": iv.std, "gap 95% CI low": iv.low,
                        "gap 95% CI high": iv.high, "paired seeds": list(iv.seeds)})  # fmt: skip
        rows.append(row)
    return pd.DataFrame(rows)


def paper_comparison(
    df: pd.DataFrame,
    tables: Sequence[int],
    flops_metric: str,
    flops_scale: float,
    *,
    paper_batch: int | None = None,
    paper_reference: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """Ours beside the paper's Table 2 (or 8-9): accuracy, memory (MB) and FLOPs.

    Parameters
    ----------
    df
        Rows of :func:`finetune_rows`.
    tables
        The paper's tables to compare with (``[2]`` or ``[8, 9]``).
    flops_metric, flops_scale
        The paper's FLOPs column (``"TFLOPs"``, ``"GFLOPs"``) and its unit in FLOPs.
    paper_batch
        Compare every row with the paper's rows at this batch size (Table 2: 128);
        ``None`` matches our batch size.
    paper_reference
        ``{our dataset: the paper's dataset}`` for datasets the paper does not report
        (e.g. the embedded ``cifar10_mini`` beside CIFAR-10).

    Returns
    -------
    DataFrame
        ``ours on`` (dataset, batch), the keys (``paper on``: the paper's dataset,
        ``paper batch``), ``paper mark`` (the paper's source marks), ``like for like``
        (dataset, classes, resolution, weights, epochs and batch all the paper's),
        ``differs`` (what is not), then per metric paper / ours / difference, and
        ``MB (measured, ours)``.
    """
    reference = dict(paper_reference or {})

    def paper_dataset(name: str) -> str:
        return PAPER_DATASET.get(name) or reference.get(name, name)

    ours = pd.DataFrame(
        {
            "model": df.model.map(lambda m: PAPER_MODEL.get(m, m)),
            "dataset": df.dataset.map(paper_dataset),
            "method": df.method.map(method_label),
            "layers": df.layers,
            "batch_size": df.batch_size if paper_batch is None else paper_batch,
            "Acc": df.accuracy,
            "MB": df.analytic_mb,
            "FLOPs": df.flops / flops_scale,
        }
    )
    paper = pd.concat([paper_table(t) for t in tables], ignore_index=True)
    paper = paper.rename(columns={flops_metric: "FLOPs"})
    table = paper_vs_ours(ours, paper, _KEYS, ["Acc", "MB", "FLOPs"])
    marks = ours[_KEYS].merge(paper[_KEYS + ["source_mark"]], on=_KEYS, how="left")
    table.insert(len(_KEYS), "paper mark", marks["source_mark"].fillna("").to_numpy())
    table.insert(
        0, "ours on", [f"{x}, batch {b}" for x, b in zip(df.dataset, df.batch_size, strict=True)]
    )
    table = table.rename(columns={"dataset": "paper on", "batch_size": "paper batch"})
    table.insert(len(_KEYS) + 2, "like for like", (df.differs == "").to_numpy())
    table.insert(len(_KEYS) + 3, "differs", df.differs.to_numpy())
    table["MB (measured, ours)"] = df.measured_mb.to_numpy()
    return table.rename(columns=lambda c: c.replace("FLOPs", flops_metric))


def table1_comparison(df: pd.DataFrame) -> pd.DataFrame:
    """Ours beside the paper's Table 1 (ImageNet split B): accuracy, MB and TFLOPs.

    Parameters
    ----------
    df
        Rows of :func:`finetune_rows`.

    Returns
    -------
    DataFrame
        ``ours on (split B)`` (our dataset), ``paper on`` (ImageNet split B), model,
        method, layers, then per metric paper / ours / difference.
    """
    ours = pd.DataFrame(
        {
            "model": df.model.map(lambda m: PAPER_MODEL.get(m, m)),
            "method": df.method.map(method_label),
            "layers": df.layers,
            "Acc": df.accuracy,
            "MB": df.analytic_mb,
            "TFLOPs": df.flops / 1e12,
        }
    )
    keys = ["model", "method", "layers"]
    table = paper_vs_ours(ours, paper_table(1), keys, ["Acc", "MB", "TFLOPs"])
    table.insert(0, "ours on (split B)", df.dataset.to_numpy())
    table.insert(1, "paper on", "ImageNet split B")
    return table


def fig3_rows(
    params: Mapping[str, Any], records: Mapping[FinetuneConfig, Mapping[str, Any]]
) -> pd.DataFrame:
    """Fig. 3's points: LANCE accuracy and memory per eps and per N, with BP's.

    Parameters
    ----------
    params
        The notebook's parameters (as given to the ``fig3_ablation`` sweep).
    records
        ``{config: record}`` for every config of the sweep.

    Returns
    -------
    DataFrame
        ``sweep`` (``"eps"``, ``"num_batches"``), ``model, dataset, value, accuracy``
        (%), ``memory_mb`` (analytic, Appendix C), ``bp_memory_mb, bp_accuracy`` and
        ``results_file``.
    """
    rows = []
    for point, cfg in fig3_points(params):
        if point["value"] is None:
            continue
        r, bp = records[cfg], records[point.pop("reference")]
        rows.append(
            {
                **point,
                "accuracy": 100 * r["final_accuracy"],
                "memory_mb": r["measurements"]["analytic_mb"],
                "bp_memory_mb": bp["measurements"]["analytic_mb"],
                "bp_accuracy": 100 * bp["final_accuracy"],
                "results_file": record_name(r) if "path" in r else None,
            }
        )
    return pd.DataFrame(rows)
