"""The whole trainable region's memory, per module, under BP, LANCE and lean LANCE.

Appendix C counts only the compressed layers' inputs; autograd also keeps BatchNorm
inputs, activation-function outputs, pooling indices and the loss's inputs.
:func:`region_memory_table` measures all of it, per module, three ways.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from torch import nn

from ..subspaces import LayerSubspace
from .memory import measure_saved_tensors, module_kind

if TYPE_CHECKING:  # pandas is imported lazily by region_memory_table
    import pandas as pd

__all__ = ["region_memory_table"]

_OPERATION = {
    "conv": "conv input (LANCE: core)",
    "linear": "linear / classifier input (LANCE: core)",
    "batchnorm": "BatchNorm input (lean: per-channel scale)",
    "activation_fn": "activation output (lean: 1-bit mask)",
    "dropout": "dropout mask (lean: 1-bit mask)",
    "pooling": "pooling input / indices",
    "top_level": "model's own functional ops and the loss",
}


def region_memory_table(
    model: nn.Module,
    run: Callable[[], object],
    subspaces: Mapping[str, LayerSubspace],
    region: Sequence[str] | None = None,
) -> pd.DataFrame:
    """What the trainable region keeps for backward, per module, under BP, LANCE and lean LANCE.

    ``run()`` performs a training forward pass of ``model`` (and the loss) and is
    measured three times with :func:`measure_saved_tensors`: as the model is (BP, every
    module uncompressed), with the layers of ``subspaces`` compressed
    (:func:`lance_lib.layers.compress`, Eq. 1), and compressed with ``lean=True``
    (:mod:`lance_lib.lean`: 1-bit ReLU / ReLU6 / dropout masks, frozen BatchNorm as a
    per-channel scale).  The model is left restored (uncompressed).

    Parameters
    ----------
    model
        The model, uncompressed; parameters not being trained should have
        ``requires_grad=False`` (a frozen prefix then keeps nothing).
    run
        Training forward pass, e.g. ``lambda: F.cross_entropy(model(x), y)``.
    subspaces
        Calibrated subspaces of the compressed layers.
    region
        Module names; modules at or under them get their own rows, all other modules
        are summed into one row ``"(outside region)"``.  Default: every module.

    Returns
    -------
    pandas.DataFrame
        Columns ``module, kind, operation, bp_bytes, lance_bytes, lean_bytes``.  One
        row per module that kept something (the model's own functional operations and
        the loss, outside any submodule, are the row ``"(top level)"``); a module's row
        counts every storage it saved, so a ReLU output that is also the next conv's
        input appears in both rows.  Three rows of
        kind ``"total"`` follow: ``"activations (distinct storages)"`` (each storage
        once, what the region really keeps), ``"factors (buffers)"`` (LANCE's ``U_i``
        and the lean BatchNorm factors, if any) and ``"region total"`` (their sum;
        parameters excluded).  Appendix C counts only the ``conv`` rows' inputs.
    """
    import pandas as pd

    from ..layers import compress, restore

    restore(model)
    reports = {}
    try:
        reports["bp"] = measure_saved_tensors(model, run)
        compress(model, subspaces)
        reports["lance"] = measure_saved_tensors(model, run)
        compress(model, subspaces, lean=True)
        reports["lean"] = measure_saved_tensors(model, run)
    finally:
        restore(model)
    modules = dict(model.named_modules())

    def inside(name: str) -> bool:
        return region is None or any(name == r or name.startswith(r + ".") for r in region)

    rows: dict[str, dict[str, object]] = {}
    for method, report in reports.items():
        for name, nbytes in report.by_module.items():
            if name == "":
                key, kind = "(top level)", "top_level"
            elif inside(name):
                key, kind = name, module_kind(modules.get(name))
            else:
                key, kind = "(outside region)", "other"
            empty = {"bp_bytes": 0, "lance_bytes": 0, "lean_bytes": 0}
            row = rows.setdefault(
                key, {"module": key, "kind": kind, "operation": _OPERATION.get(kind, kind), **empty}
            )
            row[f"{method}_bytes"] += nbytes
    order = {n: i for i, n in enumerate(modules)}
    body = sorted(rows.values(), key=lambda r: order.get(r["module"], len(order)))
    totals = [
        ("activations (distinct storages)", {m: r.activation_bytes for m, r in reports.items()}),
        ("factors (buffers)", {m: r.buffer_bytes for m, r in reports.items()}),
        ("region total", {m: r.activation_bytes + r.buffer_bytes for m, r in reports.items()}),
    ]
    for label, values in totals:
        per_method = {f"{m}_bytes": v for m, v in values.items()}
        body.append({"module": label, "kind": "total", "operation": label, **per_method})
    columns = ["module", "kind", "operation", "bp_bytes", "lance_bytes", "lean_bytes"]
    return pd.DataFrame(body, columns=columns)
