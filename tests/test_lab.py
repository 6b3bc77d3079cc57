"""The browser check (``make check-lab``): what a reader of ``make lab`` sees in JupyterLab.

Starts JupyterLab through ``make lab`` on 127.0.0.1 (so the check covers the target's
kernel environment and the project's Lab settings, not a copy of them), opens the
teaching notebook in the system's chromium driven by playwright, runs every cell and
reads the page: rendered images, typeset equations, the widget slider, no error or
stderr output anywhere, no news prompt, and the exercises' answers still closed after
*Run All* (an HTML ``<details>`` in a Markdown cell, which running cannot open).

It runs only under ``make check-lab`` (``LANCE_CHECK_LAB=1``) and is skipped with the
reason otherwise: no chromium at ``/usr/bin/chromium`` (``$LANCE_CHROMIUM``), or no
``playwright`` package. The notebook runs from a copy in a temporary folder served as
the Lab root (``LAB_ROOT``), with its outputs and results redirected there
(``LANCE_LAB``, ``LANCE_RESULTS``), so the repository's notebook stays as it is (the
records of a previous run are copied there first, so cached experiments are not
recomputed).
Screenshots of the rendered figures and ``summary.json`` (what the check saw, the run
time) go to ``build/check-lab/``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = "00_lowrank_in_ten_minutes.ipynb"
CHROMIUM = Path(os.environ.get("LANCE_CHROMIUM", "/usr/bin/chromium"))
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: Lab user settings for the check: no autosave, every cell kept in the page (no
#: windowing). The news prompt is off by the project's own settings (``make lab``).
SETTINGS = {
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
}
RUN_TIMEOUT_S = 900
OUT = ROOT / "build" / "check-lab"


def _skip_reason() -> str | None:
    if os.environ.get("LANCE_CHECK_LAB") != "1":
        return "the browser check runs with `make check-lab`"
    if not CHROMIUM.is_file():
        return (
            f"no chromium at {CHROMIUM}: install Debian's (`apt-get install -y chromium`) "
            "or point LANCE_CHROMIUM at one"
        )
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is missing: `pip install -e '.[browser]'`"
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """``make lab`` serving a copy of the teaching notebook; yields (url, token, folder)."""
    base = tmp_path_factory.mktemp("lab")
    folder = base / "notebooks"
    folder.mkdir()
    shutil.copy(ROOT / "notebooks" / NOTEBOOK, folder / NOTEBOOK)
    settings = base / "settings"
    for name, values in SETTINGS.items():
        path = settings / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    cached = ROOT / "results" / "teach_eps"  # the shared cache's records, when present
    if cached.is_dir():
        shutil.copytree(cached, base / "results" / "teach_eps")
    port, token = _free_port(), secrets.token_hex(16)
    env = {
        **os.environ,
        "LANCE_LAB": str(base / "lab"),
        "LANCE_RESULTS": str(base / "results"),
        "JUPYTERLAB_SETTINGS_DIR": str(settings),
        "JUPYTERLAB_WORKSPACES_DIR": str(base / "workspaces"),
    }
    env.pop("LANCE_PROGRESS", None)
    args = (
        f"--no-browser --ServerApp.ip=127.0.0.1 --ServerApp.port={port} "
        f"--IdentityProvider.token={token} --LabApp.expose_app_in_browser=True"
    )
    log = (base / "lab.log").open("w")
    server = subprocess.Popen(
        ["make", "-s", "lab", f"LAB_ROOT={base}", f"LAB_ARGS={args}"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: stopped as one below
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"`make lab` did not serve {url}: {(base / 'lab.log').read_text()}"
                    ) from None
                time.sleep(1)
        yield url, token, folder
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        log.close()


_ALL_RAN = """() => {
  const prompts = [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')];
  return prompts.length > 0 && prompts.every(p => /\\[\\d+\\]/.test(p.textContent));
}"""
#: The answers: closed ``<details>`` of rendered Markdown cells (their text not shown).
_CLOSED = """() => [...document.querySelectorAll('.jp-MarkdownOutput details')]
  .filter(d => !d.open && d.querySelector('summary')).length"""
_OPEN = "() => document.querySelectorAll('.jp-MarkdownOutput details[open]').length"
_SEEN = """() => ({
  code_cells: document.querySelectorAll('.jp-CodeCell').length,
  executed: [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')]
    .filter(p => /\\[\\d+\\]/.test(p.textContent)).length,
  images: [...document.querySelectorAll('.jp-OutputArea-output img')]
    .filter(i => i.complete && i.naturalWidth > 100).length,
  equations: document.querySelectorAll('.jp-MarkdownOutput mjx-container').length,
  sliders: document.querySelectorAll('.jp-OutputArea-output .widget-slider').length,
  widget_tables: document.querySelectorAll('.jp-OutputArea-output .widget-output table').length,
  stderr: [...document.querySelectorAll(
    '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')]
    .map(e => e.textContent.slice(0, 300)),
  errors: [...document.querySelectorAll('.jp-OutputArea-output .jp-RenderedText')]
    .filter(e => /Traceback|Error:/.test(e.textContent)).map(e => e.textContent.slice(0, 300)),
  posix_paths: document.body.innerText.includes('PosixPath('),
  news_prompt: /Jupyter news/i.test(document.body.innerText),
})"""


def test_teaching_notebook_in_jupyterlab(lab):
    from playwright.sync_api import sync_playwright

    url, token, folder = lab
    OUT.mkdir(parents=True, exist_ok=True)
    before = (folder / NOTEBOOK).read_bytes()
    with sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(
            str(folder.parent / "chromium-profile"),
            executable_path=str(CHROMIUM),
            headless=True,
            args=FLAGS,
            viewport={"width": 1400, "height": 1000},
        )
        page = browser.new_page()
        page.goto(f"{url}/lab/tree/notebooks/{NOTEBOOK}?token={token}", timeout=120_000)
        page.wait_for_function(
            "() => window.jupyterapp && document.querySelector('.jp-Notebook .jp-CodeCell')",
            timeout=120_000,
        )
        page.wait_for_function(
            "() => { const w = window.jupyterapp.shell.currentWidget;"
            " return w && w.sessionContext && w.sessionContext.session"
            " && w.sessionContext.session.kernel"
            " && w.sessionContext.session.kernel.status === 'idle'; }",
            timeout=120_000,
        )
        closed_at_open = page.evaluate(_CLOSED)
        start = time.monotonic()
        page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
        try:
            page.wait_for_function(_ALL_RAN, timeout=RUN_TIMEOUT_S * 1000, polling=1000)
        finally:
            seconds = time.monotonic() - start
            page.wait_for_timeout(3000)  # let MathJax and the widget manager finish
            seen = page.evaluate(_SEEN)
            seen["run_all_seconds"] = round(seconds, 1)
            seen["answers_closed_at_open"] = closed_at_open
            page.keyboard.press("End")  # where Run All leaves the reader: the last cells
            seen["answers_closed_after_run_all"] = page.evaluate(_CLOSED)
            seen["answers_open_after_run_all"] = page.evaluate(_OPEN)
            for i, image in enumerate(page.query_selector_all(".jp-OutputArea-output img")):
                image.scroll_into_view_if_needed()
                image.screenshot(path=str(OUT / f"figure-{i + 1}.png"))
            slider = page.query_selector(".jp-OutputArea-output .widget-slider")
            if slider is not None:
                slider.scroll_into_view_if_needed()
                page.screenshot(path=str(OUT / "slider.png"))
            (OUT / "summary.json").write_text(json.dumps(seen, indent=2) + "\n")
            browser.close()
    print(json.dumps(seen, indent=2))
    assert seen["executed"] == seen["code_cells"], seen
    assert not seen["stderr"] and not seen["errors"], seen
    assert seen["images"] >= 3, seen  # memory, spectra and eps figures
    assert seen["equations"] >= 5, seen  # Eq. 1-5 and Theorem 1 typeset by MathJax
    assert seen["sliders"] == 1 and seen["widget_tables"] >= 1, seen  # the eps slider answers
    assert not seen["posix_paths"], seen
    assert not seen["news_prompt"], seen  # the project's Lab settings turn the news off
    assert seen["answers_closed_at_open"] >= 1, seen  # the answers start closed
    assert seen["answers_closed_after_run_all"] == seen["answers_closed_at_open"], seen
    assert seen["answers_open_after_run_all"] == 0, seen  # Run All revealed none of them
    assert (folder / NOTEBOOK).read_bytes() == before  # nothing saved into the notebook
