"""The paper's published numbers (Tables 1, 2, 3, 8 and 9 of LANCE), for side-by-side tables.

The numbers live in one CSV shipped with the package,
``lance_lib/resources/lance-tables.csv``, transcribed from the paper and checked cell by
cell against the paper's text in a second pass.  One row per cell, long format:

``table, model, method, layers, dataset, batch_size, metric, value, source_mark``

* Tables 1, 2: metrics ``Acc`` (%), ``MB`` (activation memory), ``TFLOPs``; batch 128.
* Tables 8, 9: metrics ``Acc``, ``MB``, ``GFLOPs`` at batch sizes 4 and 8.
* Table 3: continual learning, metrics ``ACC``, ``BWT`` (%), ``Mem_MB`` and their
  ``_std``; ``model`` and ``layers`` empty.
* ``source_mark`` is the paper's dagger: ``†`` / ``‡`` mark numbers the paper itself
  copied from other publications.

Model and dataset names are the paper's (``ResNet18``, ``CIFAR10``); :data:`PAPER_MODEL`
and :data:`PAPER_DATASET` map this library's names to them.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from importlib import resources

import pandas as pd

__all__ = [
    "PAPER_DATASET",
    "PAPER_MODEL",
    "paper_table",
    "paper_tables",
    "paper_value",
]

#: Library model name -> the paper's column/row label.
PAPER_MODEL: dict[str, str] = {
    "resnet18": "ResNet18",
    "resnet34": "ResNet34",
    "mobilenet_v2": "MobileNetV2",
    "mcunet": "MCUNet",
}

#: Library dataset name -> the paper's label (Tables 2, 8, 9 and Table 3's benchmarks).
PAPER_DATASET: dict[str, str] = {
    "cifar10": "CIFAR10",
    "cifar100": "CIFAR100",
    "oxford_pets": "Pets",
    "cub200": "CUB200",
    "split_cifar100": "SplitCIFAR100",
    "split_miniimagenet": "SplitMiniImageNet",
    "five_datasets": "5-Datasets",
}

_KEYS = ["table", "model", "method", "layers", "dataset", "batch_size"]


@functools.cache
def _load() -> pd.DataFrame:
    with resources.files("lance_lib").joinpath("resources/lance-tables.csv").open() as fh:
        df = pd.read_csv(
            fh, dtype={"model": str, "method": str, "dataset": str}, keep_default_na=False
        )
    df["layers"] = pd.to_numeric(df["layers"], errors="coerce").astype("Int64")
    df["value"] = pd.to_numeric(df["value"], errors="raise").astype(float)
    return df


def paper_tables() -> pd.DataFrame:
    """All published cells, long format (a copy; see the module docstring for columns)."""
    return _load().copy()


def paper_table(
    table: int, *, metrics: Sequence[str] | None = None, **filters: object
) -> pd.DataFrame:
    """One of the paper's tables in wide form: one row per setting, one column per metric.

    Parameters
    ----------
    table
        1, 2, 3, 8 or 9.
    metrics
        Metric columns to keep (default: all of the table's metrics).
    **filters
        Column equalities, e.g. ``model="ResNet18", layers=4``; a list/tuple value
        keeps any of its entries.

    Returns
    -------
    DataFrame
        Columns ``model, method, layers, dataset, batch_size`` then the metrics; the
        ``source_mark`` of each row is kept as a column.

    Raises
    ------
    KeyError
        Unknown table, filter column or metric.
    """
    df = _load()
    if table not in set(df["table"]):
        raise KeyError(
            f"the paper has no table {table} in the CSV; tables: {sorted(set(df['table']))}"
        )
    df = df[df["table"] == table]
    for column, value in filters.items():
        if column not in df.columns:
            raise KeyError(f"no column {column!r}; columns: {list(df.columns)}")
        wanted = list(value) if isinstance(value, (list, tuple, set)) else [value]
        df = df[df[column].isin(wanted)]
    known = list(dict.fromkeys(df["metric"]))
    if metrics is not None:
        unknown = [m for m in metrics if m not in known]
        if unknown:
            raise KeyError(f"table {table} has no metrics {unknown}; it has {known}")
        df = df[df["metric"].isin(metrics)]
        known = list(metrics)
    keys = _KEYS[1:] + ["source_mark"]
    order = df[keys].drop_duplicates()
    wide = df.set_index(keys + ["metric"])["value"].unstack("metric")
    wide = order.merge(wide.reset_index(), on=keys, how="left")
    wide.columns.name = None
    return wide[keys + [m for m in known if m in wide.columns]]


def paper_value(table: int, metric: str, **keys: object) -> float:
    """One published number, e.g. ``paper_value(1, "MB", model="ResNet18", method="BP", layers=4)``.

    Raises
    ------
    KeyError
        If the keys select no cell or several.
    """
    df = _load()
    df = df[(df["table"] == table) & (df["metric"] == metric)]
    for column, value in keys.items():
        df = df[df[column] == value]
    if len(df) != 1:
        raise KeyError(f"table {table}, {metric}, {keys} selects {len(df)} published cells, not 1")
    return float(df["value"].iloc[0])
