"""What the claims read from fine-tuning records: readings, seed pairs, file names, protocol.

Pure functions over stored records (:mod:`lance_lib.experiments.finetune`), shared by the
rules of :mod:`lance_lib.reporting.claims`:

* :func:`reading`: which reading of LANCE a record ran, Eq. 1 as written (``modes="all"``)
  or the channel-only default, told by its stored ``method_settings``;
* :func:`seed_pairs`: BP and a method's record of the same seed and settings, one pair
  per seed (the paired differences of :func:`lance_lib.reporting.intervals.paired_interval`);
* :func:`record_name`: a record's file relative to the repository (``results/...``);
* :func:`protocol` and :func:`like_for_like`: what ran, and whether it is the paper's.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lance_lib.paths import repo_root

__all__ = [
    "CONVERGED_SWEEP",
    "PAPER_FINETUNE",
    "READINGS",
    "Record",
    "bp_partner",
    "finetune_pool",
    "like_for_like",
    "protocol",
    "reading",
    "record_name",
    "record_names",
    "seed_pairs",
    "settings_differences",
]

Record = Mapping[str, Any]

#: The grid-only sweep of the converged fine-tunes the claims rest on (the profile's
#: section of that name; :func:`lance_lib.experiments.finetune_sweeps.claim_runs`).
CONVERGED_SWEEP = "claim_runs"

#: The readings of LANCE judged for claims b, c and j: ``{modes: label}``. ``"all"`` is
#: Eq. 1 as written (every mode of the input, the batch mode included), the paper's text;
#: ``"channel"`` the library's default (only the mode the weights act on, Theorem 1's scope).
READINGS: dict[str, str] = {
    "all": "Eq. 1 as written (modes='all')",
    "channel": "channel-only (modes='channel', the library default)",
}

#: The paper's fine-tuning protocol (Appendix A.1, Table 4) besides the dataset, which
#: must be one the paper fine-tunes on, with all its classes: what "like for like" means.
PAPER_FINETUNE: dict[str, Any] = {
    "resolution": 224,
    "weights": "IMAGENET1K_V1",
    "epochs": 50,
    "batch_size": 128,
}

#: Starting weights whose default fine-tuning classes are a split, not every class.
_SPLIT_WEIGHTS = ("reference", "pretrained-split-A")

#: Settings that tell the compared runs apart; every other setting must match for a pair.
#: ``energy_batches`` only measures (LANCE's captured input energy per epoch): a run
#: with it trains as one without and pairs with BP's.
_COMPARED = frozenset(
    {"method", "method_options", "method_settings", "eps", "num_batches", "energy_batches"}
)


def _settings(record: Record) -> Mapping[str, Any]:
    return record["settings"]


def reading(record: Record, *, recalibrated: bool = False) -> str | None:
    """The reading of LANCE a record ran (a key of :data:`READINGS`), else ``None``.

    ``None`` for other methods, for other mode selections (``"no_batch"``), for LANCE
    runs with other method options, and for runs recalibrated every epoch (a diagnostic
    beyond the paper, not LANCE) unless ``recalibrated``, which asks for those only.
    """
    s = _settings(record)
    if s.get("method") != "lance" or set(s.get("method_options") or {}) - {"modes"}:
        return None
    if bool(s.get("recalibrate")) != recalibrated:
        return None
    modes = (s.get("method_settings") or {}).get("modes")
    modes = "all" if modes is None else modes
    return modes if modes in READINGS else None


def _key(record: Record, *, drop: Iterable[str] = ()) -> str:
    """The settings that must match between compared runs, as canonical JSON."""
    skip = _COMPARED | set(drop)
    kept = {k: v for k, v in _settings(record).items() if k not in skip}
    return json.dumps(kept, sort_keys=True, default=str)


def finetune_pool(records: Mapping[str, Sequence[Record | None]]) -> list[Record]:
    """Every fine-tuning record of every notebook, once (BP partners are looked up here)."""
    seen, out = set(), []
    for group in records.values():
        for r in group:
            if r is None or _settings(r).get("kind", "finetune") != "finetune":
                continue
            ident = r.get("path") or id(r)
            if ident not in seen:
                seen.add(ident)
                out.append(r)
    return out


def bp_partner(record: Record, pool: Sequence[Record]) -> Record | None:
    """BP's record with the same settings (seed included) as ``record``, if any."""
    key = _key(record)
    return next((r for r in pool if _settings(r)["method"] == "bp" and _key(r) == key), None)


def seed_pairs(
    reference: Sequence[Record], compared: Sequence[Record], *, vary: Iterable[str] = ()
) -> list[tuple[int, Record, Record]]:
    """``(seed, reference record, compared record)`` of the same settings, sorted by seed.

    Two records pair when every setting but the compared ones (method, its options,
    ``eps``, ``num_batches``) and those named in ``vary`` is equal, the seed included.
    A seed with several candidates keeps the first of each.
    """
    vary = tuple(vary)
    by_key: dict[str, Record] = {}
    for r in reference:
        by_key.setdefault(_key(r, drop=vary), r)
    pairs: dict[int, tuple[int, Record, Record]] = {}
    for r in compared:
        ref = by_key.get(_key(r, drop=vary))
        seed = int(_settings(r)["seed"])
        if ref is not None and seed not in pairs:
            pairs[seed] = (seed, ref, r)
    return [pairs[s] for s in sorted(pairs)]


def record_name(record: Record, root: str | Path | None = None) -> str:
    """The record's file relative to the repository (``results/<profile>/finetune/...``).

    The path the results cache returned with the record; outside ``root`` (default:
    the repository) it stays absolute; ``"(not stored)"`` for a record without one.
    """
    path = record.get("path")
    if not path:
        return "(not stored)"
    path = Path(path).resolve()
    base = Path(root or repo_root()).resolve()
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return path.as_posix()


def record_names(records: Iterable[Record | None]) -> tuple[str, ...]:
    """Sorted, distinct :func:`record_name` of ``records``."""
    return tuple(sorted({record_name(r) for r in records if r is not None}))


def protocol(records: Sequence[Record]) -> str:
    """What ran, in a few words: model, data, resolution, weights, schedule, seeds."""
    s = _settings(records[0])
    seeds = sorted({_settings(r)["seed"] for r in records})
    return (
        f"{s['model']} on {s['dataset']} at {s['resolution']} px, weights {s['weights']}, "
        f"{s['epochs']} epochs, batch {s['batch_size']}, lr {s.get('lr')} "
        f"{s.get('lr_schedule', 'constant')}, momentum {s.get('momentum')}, seeds {seeds}"
    )


def settings_differences(
    settings: Mapping[str, Any],
    classes: Sequence[int] | None = None,
    *,
    paper_batch: int = PAPER_FINETUNE["batch_size"],
) -> list[str]:
    """How a fine-tuning run differs from the paper's protocol (empty: like for like).

    Parameters
    ----------
    settings
        The record's ``settings``.
    classes
        The classes the run fine-tuned on (the record's ``classes``); ``None``: told by
        the settings (every class unless the weights default to a class split).
    paper_batch
        The paper's batch size for this comparison (Table 2: 128; Tables 8-9: 4 or 8).

    Returns
    -------
    list of str
        One ``"<setting> <ours> (paper <theirs>)"`` per difference: a dataset the paper
        does not fine-tune on, a class subset, resolution, weights, epochs, batch size,
        a subset of images (``max_samples``) or cut epochs (``max_steps_per_epoch``).
    """
    from lance_lib.experiments.setup import dataset_num_classes
    from lance_lib.reporting.paper_numbers import PAPER_DATASET

    dataset = settings.get("dataset")
    out = [] if dataset in PAPER_DATASET else [f"dataset {dataset} (not one the paper uses)"]
    wanted = {**PAPER_FINETUNE, "batch_size": paper_batch}
    for name, paper in wanted.items():
        if settings.get(name) != paper:
            out.append(f"{name} {settings.get(name)} (paper {paper})")
    used = classes if classes is not None else settings.get("classes")
    total = dataset_num_classes(dataset) if isinstance(dataset, str) else None
    if used is None:
        every = settings.get("weights") not in _SPLIT_WEIGHTS
    else:
        every = total is not None and sorted(int(c) for c in used) == list(range(total))
    if not every:
        shown = "the weights' split B" if used is None else f"{len(used)} of {total}"
        out.append(f"classes {shown} (paper: all)")
    if settings.get("max_samples"):
        out.append(f"max_samples {settings['max_samples']} (paper: every image)")
    if settings.get("max_steps_per_epoch"):
        out.append(f"max_steps_per_epoch {settings['max_steps_per_epoch']} (paper: full epochs)")
    return out


def like_for_like(records: Sequence[Record]) -> bool:
    """Whether every record ran the paper's protocol (:func:`settings_differences` empty)."""
    return bool(records) and not any(
        settings_differences(_settings(r), r.get("classes")) for r in records
    )
