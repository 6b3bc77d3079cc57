"""The claims scorecard on disk: gather the records, write ``claims.json`` and ``claims.md``.

:func:`gather_records` asks for every evidence notebook's experiments exactly as the
notebook does (its sweep on the profile's parameters) and reads them from the results
cache; :func:`lance_lib.reporting.claims.evaluate_claims` turns them into verdicts;
:func:`write_scorecard` writes the list (with provenance) atomically.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lance_lib.io import write_json_atomic, write_text_atomic
from lance_lib.reporting.claim_records import READINGS
from lance_lib.reporting.claims import VERDICTS, Records
from lance_lib.reporting.converged import CONVERGED_SWEEP, converged_records
from lance_lib.reporting.provenance import record_sources

__all__ = [
    "EVIDENCE_NOTEBOOKS",
    "counts",
    "evidence_provenance",
    "gather_records",
    "reading_summary",
    "write_scorecard",
]


def _verdict_cell(claim: Mapping[str, Any]) -> str:
    """The verdict, with each reading's beside it (b, c, j) or the claim it goes with (g)."""
    cell = f"**{claim['verdict']}**"
    readings = claim.get("readings") or {}
    if readings:
        cell += " (" + "; ".join(f"{r['label']}: {r['verdict']}" for r in readings.values()) + ")"
    if claim.get("reported_with"):
        cell += f", reported with {claim['reported_with']}, not counted"
    return cell


def counts(claims: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """How many counted claims (not those reported with another) got each verdict."""
    counted = [c for c in claims if c.get("counted", True)]
    return {v: sum(c["verdict"] == v for c in counted) for v in VERDICTS}


def reading_summary(claims: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, list[str]]]:
    """``{reading: {verdict: [claim ids]}}`` over the claims judged per reading (b, c, j)."""
    out: dict[str, dict[str, list[str]]] = {}
    for c in claims:
        for name, r in (c.get("readings") or {}).items():
            out.setdefault(name, {v: [] for v in VERDICTS})[r["verdict"]].append(c["id"])
    return out


def write_scorecard(
    claims: Sequence[Mapping[str, Any]], directory: str | Path, *, provenance: Mapping[str, Any]
) -> tuple[Path, Path]:
    """Write ``claims.json`` and ``claims.md`` (a table, the totals, the readings, the records).

    ``claims.json`` holds ``claims`` (:func:`~lance_lib.reporting.claims.evaluate_claims`:
    per claim its rule, records, seeds and interval), ``counts`` (:func:`counts`),
    ``readings`` (:func:`reading_summary`) and ``provenance``.
    """
    directory = Path(directory)
    readings = reading_summary(claims)
    json_path = write_json_atomic(
        directory / "claims.json",
        {"claims": list(claims), "counts": counts(claims), "readings": readings,
         "provenance": dict(provenance)},
    )  # fmt: skip
    lines = [
        "| id | claim | source | paper | ours | rule | like for like | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in claims:
        note = f" ({c['reason']})" if c.get("reason") else ""
        cells = [c["id"], c["claim"], c["source"], c["paper"], c["ours"] + note, c["rule"],
                 "yes" if c["like_for_like"] else "no", _verdict_cell(c)]  # fmt: skip
        lines.append("| " + " | ".join(str(x).replace("|", "/") for x in cells) + " |")
    uncounted = [c["id"] for c in claims if not c.get("counted", True)]
    lines += ["", ", ".join(f"{n} {v}" for v, n in counts(claims).items())
              + (f" (not counted: {', '.join(uncounted)})" if uncounted else ""), ""]  # fmt: skip
    for name, by_verdict in readings.items():
        parts = [", ".join(by_verdict["reproduced"]) or "none"]
        parts += [f"{v}: {', '.join(ids)}" for v, ids in by_verdict.items()
                  if ids and v != "reproduced"]  # fmt: skip
        lines.append(f"- {READINGS[name]} reproduces: " + "; ".join(parts))
    protocols = [f"{c['id']}: {c['protocol']}"
                 + (f" (evidence: {c['evidence']})" if c.get("evidence") else "")
                 for c in claims]  # fmt: skip
    lines += ["", "Protocols: " + "; ".join(protocols), "",
              "Records (relative to the repository):", ""]  # fmt: skip
    for c in claims:
        if c.get("records"):
            lines.append(f"- {c['id']}: " + ", ".join(f"`{n}`" for n in c["records"]))
    md_path = write_text_atomic(directory / "claims.md", "\n".join(lines) + "\n")
    return json_path, md_path


#: The notebooks whose records the claims read.
EVIDENCE_NOTEBOOKS = (
    "fig2_angle",
    "table2_finetune",
    "fig3_ablation",
    "fig5_latency",
    "table3_continual",
    "table1_split",
    "transformer_finetune",
    "fig4_eps_gradient",
)


def gather_records(
    profile: str, notebooks: Sequence[str] = EVIDENCE_NOTEBOOKS
) -> dict[str, list[dict[str, Any]]]:
    """The records of each notebook's sweep under ``profile``, and of its converged runs.

    Each notebook's experiments are asked for exactly as the notebook asks
    (:func:`lance_lib.experiments.sweeps.sweep` on its profile parameters) and run with
    :func:`lance_lib.experiments.base.run_experiment`, which returns the stored record
    when the figure notebooks (or ``make grid``) computed it already. A notebook the
    profile has no section for contributes no records (its claims are ``not measured``).

    When the profile has a ``claim_runs`` section, its converged runs are added under
    ``"claim_runs"``: looked up in the cache only, never computed (hours of work that
    ``make grid`` does; :func:`lance_lib.reporting.converged.converged_records`), a run
    not computed yet is ``None``. The claims read them in preference to the notebooks'.
    """
    from lance_lib.continual import SaturationWarning
    from lance_lib.experiments.base import run_experiment
    from lance_lib.experiments.sweeps import sweep
    from lance_lib.profiles import profile_parameters

    out: dict[str, list[dict[str, Any]]] = {}
    for notebook in notebooks:
        try:
            params = profile_parameters(notebook, profile)
        except KeyError:
            continue
        with warnings.catch_warnings():  # as the Table 3 notebook: its tables list them all
            warnings.simplefilter("ignore", SaturationWarning)
            out[notebook] = [run_experiment(config) for config in sweep(notebook, params)]
    converged = converged_records(profile)
    if converged is not None:
        out[CONVERGED_SWEEP] = converged
    return out


def evidence_provenance(records: Records) -> dict[str, Any]:
    """Seeds and weight hashes of every record the scorecard read."""
    sources = record_sources(r for group in records.values() for r in group)
    return {"seeds": sources["seeds"], "weights": sources["weights"]}
