"""Tests of lance_lib.progress: bars on when someone watches, off when asked."""

from __future__ import annotations

import io
import sys

import pytest

from lance_lib import progress
from lance_lib.progress import PROGRESS_ENV, progress_bar, progress_enabled


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_explicit_choice_wins(monkeypatch):
    monkeypatch.setenv(PROGRESS_ENV, "1")
    assert progress_enabled(False) is False
    monkeypatch.setenv(PROGRESS_ENV, "0")
    assert progress_enabled(True) is True


@pytest.mark.parametrize(("value", "expected"), [("0", False), ("off", False), ("YES", True)])
def test_environment_switch(monkeypatch, value, expected):
    monkeypatch.setattr(sys, "stderr", _Tty())  # would be on without the variable
    monkeypatch.setenv(PROGRESS_ENV, value)
    assert progress_enabled() is expected


def test_environment_typo_is_an_error(monkeypatch):
    monkeypatch.setenv(PROGRESS_ENV, "maybe")
    with pytest.raises(ValueError, match="LANCE_PROGRESS='maybe'.*unset it"):
        progress_enabled()


def test_default_follows_the_terminal_and_the_kernel(monkeypatch):
    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a log file: nobody watches
    assert progress_enabled() is False
    monkeypatch.setattr(sys, "stderr", _Tty())
    assert progress_enabled() is True
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    monkeypatch.setattr(progress, "in_notebook", lambda: True)  # a Jupyter kernel
    assert progress_enabled() is True


def test_bar_draws_only_when_enabled(monkeypatch):
    out = io.StringIO()
    assert list(progress_bar(range(3), progress=False, file=out)) == [0, 1, 2]
    assert out.getvalue() == ""
    with progress_bar(total=3, progress=True, desc="steps", file=out, mininterval=0) as bar:
        bar.update(3)
    assert "steps" in out.getvalue()  # leave=False clears the finished bar
