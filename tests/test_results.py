"""Result files are keyed by settings, atomic, and recomputed when corrupt."""

from __future__ import annotations

import json

import pytest

from lance_lib.results import cached_json, read_json, result_path, settings_key, write_json_atomic


def test_settings_key_is_order_independent_and_sensitive():
    assert settings_key({"a": 1, "b": [1, 2]}) == settings_key({"b": [1, 2], "a": 1})
    assert settings_key({"a": 1}) != settings_key({"a": 2})
    assert result_path("r", "run", {"a": 1}).name.startswith("run-")


def test_round_trip_and_no_temporary_left(tmp_path):
    path = write_json_atomic(tmp_path / "x" / "r.json", {"acc": [0.5, 0.6], "name": "lance"})
    assert read_json(path) == {"acc": [0.5, 0.6], "name": "lance"}
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]


def test_failed_write_keeps_previous_file(tmp_path):
    path = write_json_atomic(tmp_path / "r.json", {"v": 1})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"v": object()})
    assert read_json(path) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_cached_json_skips_existing_and_recomputes_corrupt(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"n": len(calls)}

    path = tmp_path / "r.json"
    assert cached_json(path, compute) == {"n": 1}
    assert cached_json(path, compute) == {"n": 1}
    path.write_text('{"n": ')  # a half-written file from some other tool
    with pytest.warns(UserWarning, match="unreadable"):
        assert cached_json(path, compute) == {"n": 2}
    assert json.loads(path.read_text()) == {"n": 2}
