"""The claims scorecard: verdicts follow the fixed rules, missing evidence is "not measured"."""

from __future__ import annotations

import json

import pytest

from lance_lib.experiments.theorem1 import theorem1_max_relative_error
from lance_lib.reporting.claims import CLAIMS, VERDICTS, evaluate_claims
from lance_lib.reporting.scorecard import evidence_provenance, write_scorecard

KEYS = {"id", "claim", "source", "paper", "ours", "protocol", "like_for_like", "rule", "verdict"}


def _fig2_record(angles: list[float], seed: int = 0) -> dict:
    settings = {
        "model": "resnet18", "dataset": "cifar10_mini", "layers": 4, "method": "lance",
        "method_options": {}, "method_settings": {"modes": "channel"}, "resolution": 64,
        "weights": "reference", "epochs": len(angles), "batch_size": 32, "seed": seed,
    }  # fmt: skip
    return {
        "settings": settings,
        "angle_deg": angles,
        "provenance": {"seeds": [seed], "weights": {"resnet18": "ab" * 32}},
    }


def test_theorem1_holds_to_float64_precision():
    assert theorem1_max_relative_error() < 1e-10


def test_without_records_every_claim_but_theorem1_is_not_measured_with_a_reason():
    claims = evaluate_claims({})
    assert [c["id"] for c in claims] == list("abcdefghij") == [c.id for c in CLAIMS]
    for c in claims:
        assert KEYS <= set(c) and c["verdict"] in VERDICTS
        if c["id"] == "a":
            assert c["verdict"] == "reproduced"
        else:
            assert c["verdict"] == "not measured" and c["reason"]


@pytest.mark.parametrize(("angles", "verdict"), [([40.0, 60.0], "reproduced"),
                                                 ([65.0, 80.0], "not reproduced")])  # fmt: skip
def test_fig2_verdict_follows_the_70_degree_rule(angles, verdict):
    claims = {c["id"]: c for c in evaluate_claims({"fig2_angle": [_fig2_record(angles)]})}
    assert claims["b"]["verdict"] == verdict
    assert f"{sum(angles) / 2:.1f} deg" in claims["b"]["ours"]
    assert claims["b"]["like_for_like"] is False  # our backbones are not ImageNet at 224 px


def test_a_broken_record_makes_its_claim_not_measured_not_the_others():
    broken = {"settings": {"method": "lance"}}  # no angles, no model
    claims = {c["id"]: c for c in evaluate_claims({"fig2_angle": [broken]})}
    assert claims["b"]["verdict"] == "not measured" and "failed" in claims["b"]["reason"]
    assert claims["a"]["verdict"] == "reproduced"


def test_scorecard_files_hold_every_claim_and_the_evidence_provenance(tmp_path):
    records = {"fig2_angle": [_fig2_record([30.0], seed=1), _fig2_record([35.0], seed=2)]}
    source = evidence_provenance(records)
    assert source == {"seeds": [1, 2], "weights": {"resnet18": "ab" * 32}}
    json_path, md_path = write_scorecard(evaluate_claims(records), tmp_path, provenance=source)
    stored = json.loads(json_path.read_text())
    assert len(stored["claims"]) == 10 and stored["provenance"]["seeds"] == [1, 2]
    assert all(KEYS <= set(c) for c in stored["claims"])
    text = md_path.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and "| id |" not in line]
    assert len(rows) == 10 and "**reproduced**" in text and "not measured" in text
