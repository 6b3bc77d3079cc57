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
from lance_lib.reporting.claims import VERDICTS, Records
from lance_lib.reporting.provenance import record_sources

__all__ = ["EVIDENCE_NOTEBOOKS", "evidence_provenance", "gather_records", "write_scorecard"]


def write_scorecard(
    claims: Sequence[Mapping[str, Any]], directory: str | Path, *, provenance: Mapping[str, Any]
) -> tuple[Path, Path]:
    """Write ``claims.json`` (the list, with provenance) and ``claims.md`` (a table)."""
    directory = Path(directory)
    json_path = write_json_atomic(
        directory / "claims.json", {"claims": list(claims), "provenance": dict(provenance)}
    )
    lines = [
        "| id | claim | source | paper | ours | rule | like for like | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in claims:
        note = f" ({c['reason']})" if c.get("reason") else ""
        cells = [c["id"], c["claim"], c["source"], c["paper"], c["ours"] + note, c["rule"],
                 "yes" if c["like_for_like"] else "no", f"**{c['verdict']}**"]  # fmt: skip
        lines.append("| " + " | ".join(str(x).replace("|", "/") for x in cells) + " |")
    counts = {v: sum(c["verdict"] == v for c in claims) for v in VERDICTS}
    lines += ["", ", ".join(f"{n} {v}" for v, n in counts.items()), "",
              "Protocols: " + "; ".join(f"{c['id']}: {c['protocol']}" for c in claims)]  # fmt: skip
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
    """The records of each notebook's sweep under ``profile`` (from the results cache).

    Each notebook's experiments are asked for exactly as the notebook asks
    (:func:`lance_lib.experiments.sweeps.sweep` on its profile parameters) and run with
    :func:`lance_lib.experiments.base.run_experiment`, which returns the stored record
    when the figure notebooks (or ``make grid``) computed it already. A notebook the
    profile has no section for contributes no records (its claims are ``not measured``).
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
    return out


def evidence_provenance(records: Records) -> dict[str, Any]:
    """Seeds and weight hashes of every record the scorecard read."""
    sources = record_sources(r for group in records.values() for r in group)
    return {"seeds": sources["seeds"], "weights": sources["weights"]}
