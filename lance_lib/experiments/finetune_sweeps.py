"""The fine-tuning runs each notebook needs, declared once for notebooks and the grid.

Each function turns a notebook's parameters (its parameters cell merged with its profile
section, :func:`lance_lib.profiles.notebook_parameters`) into the list of
:class:`~lance_lib.experiments.finetune_config.FinetuneConfig` it tabulates or plots,
registered with :func:`lance_lib.experiments.sweeps.register_sweep` under the
notebook's name. The notebook calls :func:`lance_lib.experiments.sweeps.sweep` and runs
each config; ``make grid`` computes the same configs beforehand, so the notebook finds
their records in the cache.

Every config starts from the notebook's ``finetune`` settings (the profile's
``common.finetune``), with ``seed`` and, per model, ``weights_by_model`` applied
(:func:`finetune_config`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from lance_lib.experiments.base import register_sweep
from lance_lib.experiments.finetune_config import FinetuneConfig

__all__ = [
    "SMALL_BATCHES",
    "claim_runs",
    "fig3_ablation",
    "fig3_points",
    "finetune_config",
    "table1_split",
    "table2_finetune",
]

#: Batch sizes of Tables 8 and 9 (BP and LANCE only, on the paper's small-batch models).
SMALL_BATCHES: tuple[int, ...] = (4, 8)

#: Weights under which a run is the Table 1 protocol (pretrain on split A, fine-tune on B).
SPLIT_WEIGHTS: tuple[str, ...] = ("reference", "pretrained-split-A")


def finetune_config(params: Mapping[str, Any], **changes: Any) -> FinetuneConfig:
    """One run of a notebook: its ``finetune`` settings, ``seed`` and per-model weights.

    Parameters
    ----------
    params
        The notebook's parameters; reads ``finetune`` (a mapping of
        :class:`FinetuneConfig` fields), ``seed`` and ``weights_by_model`` (optional
        ``{model: weights}``).
    **changes
        The fields this run sets (``model``, ``dataset``, ``method``, ...).

    Returns
    -------
    FinetuneConfig
        Validated.
    """
    settings = {**dict(params.get("finetune") or {}), "seed": params.get("seed", 0), **changes}
    model = settings.get("model", FinetuneConfig.model)
    by_model = params.get("weights_by_model") or {}
    if model in by_model:
        settings["weights"] = by_model[model]
    return FinetuneConfig.from_dict(settings)


@register_sweep("table2_finetune")
def table2_finetune(params: Mapping[str, Any]) -> list[FinetuneConfig]:
    """Table 2 and Fig. 1c (``batch_sizes`` of 128 or others) and Tables 8-9 (batch 4, 8).

    Reads ``models``, ``datasets``, ``methods``, ``layer_counts``, ``batch_sizes`` and,
    for the batch sizes of :data:`SMALL_BATCHES`, ``small_batch_models`` and
    ``small_batch_methods`` instead of ``models`` and ``methods``.
    """
    out = []
    for batch in params["batch_sizes"]:
        small = batch in SMALL_BATCHES
        for model in params["small_batch_models"] if small else params["models"]:
            for dataset in params["datasets"]:
                for method in params["small_batch_methods"] if small else params["methods"]:
                    for layers in params["layer_counts"]:
                        out.append(
                            finetune_config(
                                params,
                                model=model,
                                dataset=dataset,
                                method=method,
                                layers=layers,
                                batch_size=batch,
                            )
                        )
    return out


@register_sweep("table1_split")
def table1_split(params: Mapping[str, Any]) -> list[FinetuneConfig]:
    """Table 1: BP and LANCE from split-A weights, fine-tuned on split B.

    Reads ``models``, ``datasets``, ``methods``, ``layer_counts`` and
    ``finetune_overrides`` (applied over ``finetune``). The weights must be split-A
    weights (:data:`SPLIT_WEIGHTS`): the reference backbones or ``"pretrained-split-A"``.
    """
    overrides = dict(params.get("finetune_overrides") or {})
    base = {**params, "finetune": {**dict(params.get("finetune") or {}), **overrides}}
    out = []
    for model in params["models"]:
        for dataset in params["datasets"]:
            for method in params["methods"]:
                for layers in params["layer_counts"]:
                    cfg = finetune_config(
                        base, model=model, dataset=dataset, method=method, layers=layers
                    )
                    if cfg.weights not in SPLIT_WEIGHTS:
                        raise ValueError(
                            f"Table 1 is the split-A -> split-B protocol: weights must be one "
                            f"of {list(SPLIT_WEIGHTS)}, got weights={cfg.weights!r} for "
                            f"{model}; set finetune.weights (or weights_by_model) accordingly"
                        )
                    out.append(cfg)
    return out


def fig3_points(params: Mapping[str, Any]) -> Iterator[tuple[dict[str, Any], FinetuneConfig]]:
    """Every point of Fig. 3 with its LANCE config and, first per sweep, its BP reference.

    Yields ``(point, config)``: ``point`` holds ``sweep`` (``"eps"`` or
    ``"num_batches"``), ``model``, ``dataset``, ``value`` (``None`` for the BP
    reference) and ``reference`` (the BP config of the same model and dataset).
    Reads ``models``, ``eps_dataset``, ``eps_values``, ``n_dataset``, ``n_eps`` and
    ``num_batches_values``.
    """
    sweeps = (
        ("eps", params["eps_dataset"], params["eps_values"]),
        ("num_batches", params["n_dataset"], params["num_batches_values"]),
    )
    for model in params["models"]:
        for sweep, dataset, values in sweeps:
            bp = finetune_config(params, model=model, dataset=dataset, method="bp")
            yield {"sweep": sweep, "model": model, "dataset": dataset, "value": None}, bp
            for value in values:
                if sweep == "eps":
                    changes = {"eps": value}
                else:
                    changes = {"eps": params["n_eps"], "num_batches": value}
                cfg = finetune_config(
                    params, model=model, dataset=dataset, method="lance", **changes
                )
                point = {"sweep": sweep, "model": model, "dataset": dataset, "value": value}
                yield {**point, "reference": bp}, cfg


@register_sweep("fig3_ablation")
def fig3_ablation(params: Mapping[str, Any]) -> list[FinetuneConfig]:
    """Fig. 3: LANCE against eps and against the calibration batches N, with BP's runs."""
    return list(dict.fromkeys(cfg for _, cfg in fig3_points(params)))


@register_sweep("claim_runs")
def claim_runs(params: Mapping[str, Any]) -> list[FinetuneConfig]:
    """The converged fine-tunes the claims rest on (issue 24), with LANCE's diagnostics.

    One model on one dataset (``model``, ``dataset``; the reference profile: ResNet18 on
    CIFAR-10 split B), every run on the section's ``finetune`` settings (the converged
    protocol) and once per seed of ``seeds``:

    * ``methods`` x ``layer_counts`` at the ``finetune`` eps and N, LANCE once per entry
      of ``lance_modes`` (``"channel"``, the default reading, and ``"all"``, Eq. 1 as
      written): claims b, c, j and the ResNet18 rows of Tables 1 and 2;
    * LANCE (default modes, the largest layer count) at every ``eps_values`` (the gap
      against eps, claim d's eps sweep at the profile's N) and at every ``n_values`` at
      eps ``n_eps`` (claim d's N sweep);
    * the diagnostic beyond the paper: LANCE recalibrated after every epoch
      (``recalibrate``: ``eps``, ``seeds``, ``layer_counts``).

    Every LANCE run records the captured input energy on ``energy_batches`` fixed
    batches per epoch. A grid-only sweep while no notebook plots it: ``make grid``
    computes it from the profile's ``claim_runs`` section.
    """
    model, dataset = params["model"], params["dataset"]
    seeds = list(params["seeds"])
    layer_counts = list(params["layer_counts"])
    energy = {"energy_batches": params.get("energy_batches", 0)}

    def run(method: str, seed: int, **changes: Any) -> FinetuneConfig:
        extra = energy if method == "lance" else {}
        return finetune_config(
            {**params, "seed": seed},
            model=model,
            dataset=dataset,
            method=method,
            **extra,
            **changes,
        )

    out = []
    for seed in seeds:
        for layers in layer_counts:
            for method in params["methods"]:
                if method != "lance":
                    out.append(run(method, seed, layers=layers))
                    continue
                for modes in params.get("lance_modes") or ["channel"]:
                    options = {} if modes == "channel" else {"modes": modes}
                    out.append(run(method, seed, layers=layers, method_options=options))
        for eps in params.get("eps_values") or []:
            out.append(run("lance", seed, layers=max(layer_counts), eps=eps))
        for n in params.get("n_values") or []:
            out.append(
                run("lance", seed, layers=max(layer_counts), eps=params["n_eps"], num_batches=n)
            )
    recal = params.get("recalibrate") or {}
    for seed in recal.get("seeds", []):
        for layers in recal.get("layer_counts", []):
            for eps in recal.get("eps", []):
                out.append(run("lance", seed, layers=layers, eps=eps, recalibrate=True))
    return list(dict.fromkeys(out))
