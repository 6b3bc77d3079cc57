"""The results cache reuses only records that answer the request."""

import json
import os
import stat

import pytest

from lance_lib.experiments.cache import CacheWarning, cached_record, load_record, record_path

SETTINGS = {"eps": 0.7, "method": "lance", "nested": {"a": 1}}


def _compute(calls):
    def compute():
        calls.append(1)
        return {"final_accuracy": 0.5, "accuracy": [0.4, 0.5]}

    return compute


def test_a_matching_record_is_reused(tmp_path):
    calls = []
    path = record_path(tmp_path, "run", SETTINGS)
    first = cached_record(path, SETTINGS, _compute(calls), required=["final_accuracy"])
    second = cached_record(path, SETTINGS, _compute(calls), required=["final_accuracy"])
    assert calls == [1] and first == second
    assert first["settings"] == SETTINGS and "commit" in first["provenance"]


@pytest.mark.parametrize(
    "content, reason",
    [
        ({"settings": {**SETTINGS, "eps": 0.123}, "final_accuracy": 0.99}, "settings differ"),
        ({}, "stores no settings"),
        ([], "JSON object"),
        ({"settings": SETTINGS}, "lacks the fields"),
        ("{not json", "unreadable"),
    ],
)
def test_a_record_that_does_not_answer_the_request_is_recomputed(tmp_path, content, reason):
    path = record_path(tmp_path, "run", SETTINGS)
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    calls = []
    with pytest.warns(CacheWarning, match=reason):
        out = cached_record(path, SETTINGS, _compute(calls), required=["final_accuracy"])
    assert calls == [1] and out["final_accuracy"] == 0.5
    assert load_record(path, SETTINGS, ["final_accuracy"])["final_accuracy"] == 0.5


def test_the_warning_names_the_settings_that_differ(tmp_path):
    path = record_path(tmp_path, "run", SETTINGS)
    path.write_text(json.dumps({"settings": {**SETTINGS, "nested": {"a": 2}}}))
    with pytest.warns(CacheWarning, match=r"nested\.a"):
        assert load_record(path, SETTINGS) is None


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_fails_before_the_work(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
    calls = []
    with pytest.raises(PermissionError, match="results folder"):
        cached_record(folder / "r.json", SETTINGS, _compute(calls))
    assert calls == []


def test_a_folder_below_a_file_fails_before_the_work(tmp_path):
    (tmp_path / "file").write_text("x")
    calls = []
    with pytest.raises(PermissionError, match="a part of it is a file"):
        cached_record(tmp_path / "file" / "sub" / "r.json", SETTINGS, _compute(calls))
    assert calls == []


def test_records_get_the_umask_mode(tmp_path):
    old = os.umask(0o022)
    try:
        path = cached_record(tmp_path / "r.json", SETTINGS, _compute([]))["path"]
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644


def test_provenance_returned_by_the_run_is_merged(tmp_path):
    def compute():
        return {"final_accuracy": 0.5, "provenance": {"weights": {"resnet18": "ab12"}}}

    out = cached_record(tmp_path / "r.json", SETTINGS, compute, provenance_extra={"seeds": [3]})
    assert out["provenance"]["weights"] == {"resnet18": "ab12"}
    assert out["provenance"]["seeds"] == [3] and "provenance" not in out["settings"]
