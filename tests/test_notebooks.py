"""Execute every notebook with the smoke profile through papermill and check its outputs.

The runner's own behaviour (parameter merging and checking, fingerprint skip, atomic
output, kept failures) is tested on tiny notebooks.  Notebook outputs go to a temporary
folder; pretrained checkpoints are shared through the data root's cache.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import nbformat
import pytest
import yaml

from lance_lib.notebook_runner import fingerprint, run_notebook
from lance_lib.profiles import load_profile, notebook_parameters, profile_parameters
from tests.notebook_files import tiny_notebook

#: Under ``pytest -n N`` this file runs on one worker (``--dist loadfile``): the
#: module-scoped run of every notebook happens once while the others take the rest.
pytestmark = pytest.mark.notebooks

ROOT = Path(__file__).resolve().parents[1]
#: In make's order: the claims scorecard reads the other notebooks' records, so it runs last.
NOTEBOOKS = sorted(
    (ROOT / "notebooks").glob("*.ipynb"), key=lambda p: (p.stem.startswith("99_"), p.name)
)
PROFILES = ROOT / "profiles"
#: The tests' smoke profile: ``profiles/smoke.yaml`` with the values that only decide how
#: long a run takes made smaller (fewer steps and samples, fewer sweep points, fewer
#: calibration batches), so every cell of every notebook runs and every check below
#: holds, without recomputing the profile. Values are merged into the profile's sections.
TEST_PROFILE = {
    "common": {"finetune": {"max_steps_per_epoch": 2, "max_samples": 200, "num_batches": 2}},
    "00_lowrank_in_ten_minutes": {"eps_values": [0.3, 0.7, 0.99], "num_batches": 4},
    "table3_continual": {"overrides": {"max_steps": 2}},
    "transformer_finetune": {"rank_ratios": [0.5, 0.25], "max_steps_per_epoch": 2},
}


@pytest.fixture
def profiles(tmp_path: Path) -> Path:
    d = tmp_path / "profiles"
    d.mkdir()
    (d / "t.yaml").write_text("common: {size: 2, unused: 1}\ntiny: {size: 3, inputs: [in.txt]}\n")
    return d


def test_parameters_merge_and_checks(tmp_path, profiles):
    nb = tiny_notebook(tmp_path / "tiny.ipynb", "pass")
    params, inputs = notebook_parameters(nb, "t", profiles_dir=profiles, outputs_dir=tmp_path)
    assert params["size"] == 3 and "unused" not in params  # section beats common
    assert params["profile"] == "t" and params["force"] is False and inputs == ["in.txt"]
    with pytest.raises(ValueError, match="declares only"):
        notebook_parameters(nb, "t", profiles_dir=profiles, overrides={"nope": 1})
    with pytest.raises(FileNotFoundError, match="profiles"):
        load_profile("missing", profiles)


def test_every_notebook_is_clean_and_in_every_profile():
    assert NOTEBOOKS, "no notebooks found"
    for name in ("smoke", "cpu", "reference", "paper"):
        data = load_profile(name, PROFILES)
        for path in NOTEBOOKS:
            assert path.stem in data, f"profiles/{name}.yaml has no section for {path.name}"
            notebook_parameters(path, name, profiles_dir=PROFILES)  # every key is declared
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{path.name} has outputs"


def test_runner_skips_unchanged_and_keeps_failures(tmp_path, profiles):
    nb = tiny_notebook(
        tmp_path / "tiny.ipynb",
        "from pathlib import Path\n(Path(outputs_dir) / 'n.txt').write_text(str(size))",
    )
    (tmp_path / "in.txt").write_text("a")
    out, figs = tmp_path / "build" / "tiny.ipynb", tmp_path / "figs"
    kw = {"profile": "t", "profiles_dir": profiles, "outputs_dir": figs}
    params, inputs = notebook_parameters(nb, "t", profiles_dir=profiles, outputs_dir=figs)
    before = fingerprint(nb, params, [str(tmp_path / "in.txt")])
    assert run_notebook(nb, out, **kw) is True
    assert (figs / "n.txt").read_text() == "3"
    assert nbformat.read(out, as_version=4).metadata["lance"]["parameters"]["size"] == 3
    assert out.with_suffix(".d").read_text().startswith(f"{out}: in.txt")
    assert run_notebook(nb, out, **kw) is False  # fingerprint unchanged: skipped
    assert run_notebook(nb, out, force=True, **kw) is True
    (tmp_path / "in.txt").write_text("b")
    assert fingerprint(nb, params, [str(tmp_path / "in.txt")]) != before

    bad = tiny_notebook(tmp_path / "bad.ipynb", "raise RuntimeError('boom')")
    with pytest.raises(Exception, match="boom"):
        run_notebook(bad, tmp_path / "build" / "bad.ipynb", **kw)
    assert not (tmp_path / "build" / "bad.ipynb").exists()
    assert (tmp_path / "build" / "bad.failed.ipynb").exists()


def _outputs(cell, kind: str) -> list:
    """The outputs of ``cell`` of one kind: ``image/png``, ``stderr`` or ``text``."""
    if kind == "stderr":
        return [o for o in cell.outputs if o.output_type == "stream" and o.name == "stderr"]
    if kind == "text":
        texts = [o.get("text", "") for o in cell.outputs if o.output_type == "stream"]
        return texts + [o.data.get("text/plain", "") for o in cell.outputs if "data" in o]
    return [o for o in cell.outputs if kind in o.get("data", {})]


def test_runner_kernel_shows_figures_inline_without_progress(tmp_path, profiles, monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")  # what the Makefile exports to every target
    monkeypatch.delenv("LANCE_PROGRESS", raising=False)
    nb = tiny_notebook(
        tmp_path / "tiny.ipynb",
        "import matplotlib.pyplot as plt\nfrom lance_lib.reporting import save_figure\n"
        "fig, ax = plt.subplots()\nax.plot([0, 1])\nsave_figure(fig, f'{outputs_dir}/fig')",
        "plt.plot([1, 0])\nplt.show()",
        "import os\nprint(os.environ['LANCE_PROGRESS'])",
    )
    out = tmp_path / "build" / "tiny.ipynb"
    run_notebook(nb, out, profile="t", profiles_dir=profiles, outputs_dir=tmp_path / "figs")
    saved, shown, env = nbformat.read(out, as_version=4).cells[-3:]
    assert len(_outputs(saved, "image/png")) == 1  # the PNG written, shown once
    assert "PosixPath" not in "".join(_outputs(saved, "text"))
    assert (tmp_path / "figs" / "fig.png").is_file() and (tmp_path / "figs" / "fig.pdf").is_file()
    assert _outputs(shown, "image/png")  # plt.show() draws under the inline backend
    assert "".join(_outputs(env, "text")).strip() == "0"  # no bars in executed notebooks
    assert not any(_outputs(c, "stderr") for c in (saved, shown, env))


def test_profile_parameters_resolve_from_the_repository_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # JupyterLab runs notebooks in notebooks/, make in the root
    monkeypatch.delenv("LANCE_LAB", raising=False)
    params = profile_parameters("fig4_eps_gradient.ipynb", "smoke")
    # run interactively, a notebook writes to the untracked build/lab/, never to figures/
    assert Path(params["outputs_dir"]) == ROOT / "build" / "lab" / "smoke"
    data = load_profile("smoke")
    assert params["seed"] == data["common"]["seed"]
    assert params["eps_values"] == data["fig4_eps_gradient"]["eps_values"]
    assert "inputs" not in params and params["profile"] == "smoke" and params["force"] is False
    with pytest.raises(KeyError, match="no section 'nope'"):
        profile_parameters("nope", "smoke")


def _parameters_source(path: Path) -> str:
    nb = nbformat.read(path, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    return cell.source


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_lab_defaults_are_the_profile(path, monkeypatch):
    """Run in JupyterLab (working directory notebooks/, no injected parameters), a
    notebook's parameters cell gives exactly what the runner injects, for the profile it
    names, except the outputs folder: build/lab/<profile>, not the committed figures/."""
    monkeypatch.chdir(ROOT / "notebooks")
    monkeypatch.delenv("LANCE_FIGURES", raising=False)
    monkeypatch.delenv("LANCE_LAB", raising=False)
    source = _parameters_source(path)
    assert re.search(r'^profile = "smoke"', source, flags=re.M), "the cell must name a profile"
    for profile in ("smoke", "cpu"):
        namespace: dict = {}
        exec(re.sub(r"^profile = .*$", f'profile = "{profile}"', source, flags=re.M), namespace)
        expected, _ = notebook_parameters(path, profile)
        for key, value in expected.items():
            got = namespace[key]
            if key == "outputs_dir":
                assert Path(value) == ROOT / "figures" / profile  # what make figures writes
                got, value = Path(got).resolve(), ROOT / "build" / "lab" / profile
            assert got == value, f"{path.name} under {profile}: {key} = {got!r}, not {value!r}"


def _merged(base: dict, extra: dict) -> dict:
    """``base`` with ``extra``'s values, nested mappings merged key by key."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merged(base[key], value) if isinstance(value, dict) else value
    return out


def test_profile_keeps_every_section_and_key():
    """The tests' profile only changes values the smoke profile already sets."""
    smoke = load_profile("smoke", PROFILES)
    for section, values in TEST_PROFILE.items():
        merged = _merged(smoke[section], values)
        assert merged.keys() == smoke[section].keys(), section


def write_test_profile(folder: Path) -> Path:
    """``folder/smoke.yaml``: the smoke profile with :data:`TEST_PROFILE` merged in."""
    folder.mkdir(parents=True, exist_ok=True)
    data = _merged(load_profile("smoke", PROFILES), TEST_PROFILE)
    (folder / "smoke.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return folder


@pytest.fixture(scope="module")
def smoke_outputs(tmp_path_factory) -> Path:
    """Run every notebook once with the tests' smoke profile; return the outputs folder.

    ``profiles/`` (the profile's values, for the tests to read), ``results/`` (a fresh
    cache), ``figures/`` (what the notebooks wrote) and ``build/`` (the executed notebooks).
    """
    base = tmp_path_factory.mktemp("smoke")
    profiles = write_test_profile(base / "profiles")
    # a fresh results cache and the tests' profile (the kernels inherit both, so the
    # notebooks' parameters cells and the claims scorecard read the same values): every
    # run computes once, and the notebooks share it as under make figures
    patch = pytest.MonkeyPatch()
    patch.setenv("LANCE_RESULTS", str(base / "results"))
    patch.setenv("LANCE_PROFILES", str(profiles))
    try:
        for path in NOTEBOOKS:
            run_notebook(
                path,
                base / "build" / path.name,
                profile="smoke",
                profiles_dir=profiles,
                outputs_dir=base / "figures",
                force=False,
            )
    finally:
        patch.undo()
    return base


def _profile(outputs: Path) -> dict:
    """The profile the notebooks of ``outputs`` ran with."""
    return load_profile("smoke", outputs / "profiles")


def _figure_ok(figures: Path, stem: str) -> dict:
    for suffix in (".png", ".pdf"):
        assert (figures / f"{stem}{suffix}").stat().st_size > 1000, f"{stem}{suffix} missing"
    meta = json.loads((figures / f"{stem}.provenance.json").read_text())
    assert meta["profile"] == "smoke" and meta["datasets"] and meta["models"]
    assert meta["seeds"] and meta["commit"] and meta["versions"]["torch"]  # explains differences
    return meta


def test_all_notebooks_executed(smoke_outputs):
    for path in NOTEBOOKS:
        nb = nbformat.read(smoke_outputs / "build" / path.name, as_version=4)
        assert nb.metadata["lance"]["profile"] == "smoke"
    assert not list(smoke_outputs.rglob("*.tmp"))


def test_teaching_notebook(smoke_outputs):
    figures = smoke_outputs / "figures"
    for stem in ("teach_memory", "teach_spectra", "teach_eps"):
        _figure_ok(figures, stem)
    memory = json.loads((figures / "results" / "teach_memory.json").read_text())
    total, conv = memory["total_mib"], memory["by_kind_mib"]["conv"]
    assert 0 < total["lean LANCE"] < total["LANCE"] < total["BP"]
    assert conv["LANCE"] < conv["BP"] < total["BP"]  # BP keeps more than the convs' inputs
    hosvd = json.loads((figures / "results" / "teach_hosvd.json").read_text())
    assert hosvd["ranks_scratch"] == hosvd["ranks_library"]  # the by-hand HOSVD is lance_lib's
    assert hosvd["max_abs_difference"] < 1e-8 and 0 < hosvd["stored_over_full"] < 1
    rows = json.loads((figures / "results" / "teach_eps.json").read_text())["rows"]
    eps_values = _profile(smoke_outputs)["00_lowrank_in_ten_minutes"]["eps_values"]
    assert {r["modes"] for r in rows} == {"channel", "no_batch", "all"}
    for modes in ("channel", "no_batch", "all"):
        part = [r for r in rows if r["modes"] == modes]
        assert [r["eps"] for r in part] == eps_values
        ratios = [r["memory_ratio"] for r in part]
        assert all(q > 0 for q in ratios) and ratios == sorted(ratios)  # Eq. (3)
        # compression pays below eps 0.9 (near 1 the factors can outweigh the input)
        assert all(r["memory_ratio"] < 1 for r in part if r["eps"] <= 0.9)
        assert all(0 <= r["angle_deg"] <= 180 for r in part)
    for r in rows:
        if r["modes"] == "channel":  # Theorem 1: the channel mode alone never points uphill
            assert r["cosine"] >= -1e-9 and r["angle_deg"] <= 90 + 1e-6
    spectra = json.loads((figures / "results" / "teach_spectra.json").read_text())
    for energy in spectra["cumulative_energy"].values():
        assert energy[-1] == pytest.approx(1.0) and energy == sorted(energy)


#: Code that draws: a cell calling one of these must show an image.
FIGURE_CALLS = ("save_figure(", "plt.show(")
#: Tag of a cell that draws only when its records exist and otherwise prints why not.
OPTIONAL_FIGURE = "optional-figure"


def test_figures_show_inline_and_nothing_goes_to_stderr(smoke_outputs):
    problems = []
    for path in NOTEBOOKS:
        nb = nbformat.read(smoke_outputs / "build" / path.name, as_version=4)
        for i, cell in enumerate(nb.cells):
            if cell.cell_type != "code":
                continue
            explained = OPTIONAL_FIGURE in cell.metadata.get("tags", []) and _outputs(cell, "text")
            if (
                any(call in cell.source for call in FIGURE_CALLS)
                and not _outputs(cell, "image/png")
                and not explained
            ):
                problems.append(f"{path.name}, cell {i}: draws a figure but shows no image/png")
            for output in _outputs(cell, "stderr"):
                problems.append(f"{path.name}, cell {i}: stderr {output.text[:300]!r}")
    assert not problems, "\n".join(problems)


@pytest.mark.skipif(not (ROOT / "notebooks" / "fig4_eps_gradient.ipynb").exists(), reason="absent")
def test_fig4_eps(smoke_outputs):
    figures = smoke_outputs / "figures"
    _figure_ok(figures, "fig4_eps_gradient")
    rows = json.loads((figures / "results" / "fig4_eps_gradient.json").read_text())["rows"]
    assert rows
    for r in rows:
        assert 0 <= r["angle_mean"] <= 90 and r["angle_std"] >= 0
        assert 0 < r["memory_ratio"] < 1 and 0 < r["measured_memory_ratio"] < 1  # LANCE < BP
        assert 0 <= r["accuracy"] <= 100 and 0 <= r["bp_accuracy"] <= 100
    assert "(paper)" not in (figures / "fig4_eps_gradient.md").read_text()
    assert "\\toprule" in (figures / "fig4_eps_gradient.tex").read_text()


@pytest.mark.skipif(not (ROOT / "notebooks" / "table3_continual.ipynb").exists(), reason="absent")
def test_table3_continual(smoke_outputs):
    figures = smoke_outputs / "figures"
    _figure_ok(figures, "table3_acc_matrices")
    result = json.loads((figures / "results" / "table3_continual.json").read_text())
    for r in result["rows"]:
        assert 0 <= r["ACC"] <= 100 and r["Mem_MB"] >= 0
        assert r["BWT"] is None or -100 <= r["BWT"] <= 100
    for matrix in result["acc_matrices"].values():
        assert all(0 <= v <= 100 for row in matrix for v in row)
    md = (figures / "table3_continual.md").read_text()
    assert "ACC (paper)" in md and "ACC (ours)" in md and "ACC (ours-paper)" in md


def _rows(figures: Path, name: str) -> list[dict]:
    return json.loads((figures / "results" / f"{name}.json").read_text())["rows"]


@pytest.mark.skipif(not (ROOT / "notebooks" / "table2_finetune.ipynb").exists(), reason="absent")
def test_table2_finetune(smoke_outputs):
    figures = smoke_outputs / "figures"
    _figure_ok(figures, "fig1c_acc_memory")
    rows = _rows(figures, "table2_finetune")
    bp = {
        (r["model"], r["dataset"], r["layers"], r["batch_size"]): r
        for r in rows
        if r["method"] == "bp"
    }
    assert bp and any(r["method"] == "lance" for r in rows)
    for r in rows:
        assert 0 <= r["accuracy"] <= 100 and r["flops"] > 0 and r["analytic_mb"] > 0
        ref = bp[r["model"], r["dataset"], r["layers"], r["batch_size"]]
        assert r["analytic_bp_mb"] == pytest.approx(ref["analytic_mb"])
        if r["method"] == "lance":  # LANCE keeps less than BP, analytic and measured
            assert r["analytic_mb"] < ref["analytic_mb"] and r["measured_mb"] < ref["measured_mb"]
    for (model, dataset, layers, batch), r in bp.items():  # more trained layers keep more
        deeper = [b for k, b in bp.items() if k[:2] == (model, dataset) and k[2] > layers]
        assert all(b["analytic_mb"] > r["analytic_mb"] for b in deeper if b["batch_size"] == batch)
    md = (figures / "table2_finetune.md").read_text()
    assert "Acc (paper)" in md and "MB (ours-paper)" in md and "TFLOPs (ours)" in md
    assert "profile: smoke" in md


@pytest.mark.skipif(not (ROOT / "notebooks" / "table1_split.ipynb").exists(), reason="absent")
def test_table1_split(smoke_outputs):
    figures = smoke_outputs / "figures"
    rows = _rows(figures, "table1_split")
    by = {(r["model"], r["method"], r["layers"]): r for r in rows}
    for (model, method, layers), r in by.items():
        assert 0 <= r["accuracy"] <= 100
        if method == "lance":
            assert r["analytic_mb"] < by[model, "bp", layers]["analytic_mb"]
    md = (figures / "table1_split.md").read_text()
    assert "ImageNet split B" in md and "cifar10_mini" in md
    assert "| 60.7 |" in md  # the paper's ResNet18 BP 2-layer accuracy stands beside ours
    assert "| 7.12 |" in md  # and its LANCE 2-layer memory


@pytest.mark.skipif(not (ROOT / "notebooks" / "fig2_angle.ipynb").exists(), reason="absent")
def test_fig2_angle(smoke_outputs):
    figures = smoke_outputs / "figures"
    meta = _figure_ok(figures, "fig2_angle")
    assert len(meta["weights"]["resnet18"]) == 64  # the starting weights' sha256
    rows = _rows(figures, "fig2_angle")
    epochs = _profile(smoke_outputs)["common"]["finetune"]["epochs"]
    runs = {(r["model"], r["dataset"], r["layers"], r["modes"]) for r in rows}
    assert {m for *_, m in runs} == {"channel", "no_batch", "all"}  # the modes ablation
    assert len(rows) == epochs * len(runs)
    assert [r["epoch"] for r in rows[:epochs]] == list(range(1, epochs + 1))
    for r in rows:
        assert 0 <= r["angle_deg"] <= 180 and 0 <= r["accuracy"] <= 100
        if r["modes"] == "channel":  # Theorem 1: projecting the channel mode never points uphill
            assert r["angle_deg"] <= 90 + 1e-6


@pytest.mark.skipif(not (ROOT / "notebooks" / "memory_breakdown.ipynb").exists(), reason="absent")
def test_memory_breakdown(smoke_outputs):
    figures = smoke_outputs / "figures"
    _figure_ok(figures, "memory_breakdown")
    results = json.loads((figures / "results" / "memory_breakdown.json").read_text())["results"]
    assert results
    for r in results.values():
        rows = {row["module"]: row for row in r["rows"]}
        total = rows["region total"]
        assert 0 < total["lean_bytes"] < total["lance_bytes"] < total["bp_bytes"]
        convs = [row for row in r["rows"] if row["kind"] == "conv"]
        assert sum(c["lance_bytes"] for c in convs) < sum(c["bp_bytes"] for c in convs)
    assert "region total" in (figures / "memory_breakdown.md").read_text()


@pytest.mark.skipif(not (ROOT / "notebooks" / "fig3_ablation.ipynb").exists(), reason="absent")
def test_fig3_ablation(smoke_outputs):
    figures = smoke_outputs / "figures"
    _figure_ok(figures, "fig3_ablation")
    rows = _rows(figures, "fig3_ablation")
    section = _profile(smoke_outputs)["fig3_ablation"]
    eps = [r for r in rows if r["sweep"] == "eps"]
    assert [r["value"] for r in eps] == section["eps_values"]
    memory = [r["memory_mb"] for r in eps]
    assert memory == sorted(memory)  # Eq. (3): same calibration data, ranks grow with eps
    n_rows = [r for r in rows if r["sweep"] == "num_batches"]
    assert [r["value"] for r in n_rows] == section["num_batches_values"]
    for r in rows:
        assert 0 < r["memory_mb"] < r["bp_memory_mb"] and 0 <= r["accuracy"] <= 100


@pytest.mark.skipif(not (ROOT / "notebooks" / "fig5_latency.ipynb").exists(), reason="absent")
def test_fig5_latency(smoke_outputs):
    figures = smoke_outputs / "figures"
    _figure_ok(figures, "fig5_latency")
    rows = _rows(figures, "fig5_latency")
    section = _profile(smoke_outputs)["fig5_latency"]
    methods = {r["method"] for r in rows}
    assert {"bp", "lance"} <= methods
    assert len(rows) == len(methods) * section["max_layers"]
    by = {(r["layers"], r["method"]): r for r in rows}
    for (layers, method), r in by.items():
        assert r["forward_s_median"] > 0 and r["backward_s_median"] > 0 and r["step_s_median"] > 0
        if method == "lance":
            assert r["total_over_lance"] == pytest.approx(1.0)
            assert r["analytic_mb"] < by[layers, "bp"]["analytic_mb"]
    assert "total / LANCE (median)" in (figures / "fig5_latency.md").read_text()


@pytest.mark.skipif(
    not (ROOT / "notebooks" / "transformer_finetune.ipynb").exists(), reason="absent"
)
def test_transformer_finetune(smoke_outputs):
    figures = smoke_outputs / "figures"
    _figure_ok(figures, "transformer_finetune")
    rows = _rows(figures, "transformer_finetune")
    ratios = _profile(smoke_outputs)["transformer_finetune"]["rank_ratios"]
    lowrank = ("loract", "loract_prenorm", "loract_prenorm_linear")  # one row per method and r
    assert len(rows) == 2 + len(lowrank) * len(ratios)  # and BP, LANCE
    by = {(r["method"], r["rank_ratio"]): r for r in rows}
    assert by["bp", None]["layer_memory_ratio"] == by["bp", None]["step_time_ratio"] == 1.0
    for r in rows:
        assert 0 <= r["accuracy"] <= 100 and r["step_s_median"] > 0 and 0 <= r["angle_deg"] <= 90
        if r["method"] != "bp":  # every method keeps less than BP, measured
            assert 0 < r["layer_memory_ratio"] < 1 and 0 < r["region_memory_ratio"] < 1
    for method in lowrank:  # a smaller rank ratio keeps less
        layer = [by[method, r]["layer_bytes"] for r in sorted(ratios)]
        assert layer == sorted(layer)
    for r in ratios:  # the pre-norm modes also drop the LayerNorm's stored input; LoRAct's
        # own pre-norm mode recomputes whole sub-layers, so it keeps the least
        region = {m: by[m, r]["region_bytes"] for m in lowrank}
        assert region["loract_prenorm"] < region["loract_prenorm_linear"] < region["loract"]
    assert "\\toprule" in (figures / "transformer_finetune.tex").read_text()
    assert "Layer memory / BP" in (figures / "transformer_finetune.md").read_text()


def _git_status() -> str:
    return subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout


#: Notebooks run the way JupyterLab runs them, to check that they leave the tree as it was.
LAB_RUNS = ("fig4_eps_gradient", "table1_split")


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="not a git checkout")
@pytest.mark.parametrize("name", LAB_RUNS)
def test_a_lab_run_leaves_the_tree_clean(name, smoke_outputs, tmp_path, monkeypatch):
    """papermill from notebooks/ without the runner (as Lab runs it: the parameters cell
    decides) writes to the untracked build/lab/<profile>/ and changes no tracked file; the
    results cache is shared with the runner's runs (here: the module's)."""
    import papermill as pm

    monkeypatch.setenv("LANCE_RESULTS", str(smoke_outputs / "results"))
    monkeypatch.setenv("LANCE_PROFILES", str(smoke_outputs / "profiles"))
    for variable in ("LANCE_LAB", "LANCE_FIGURES"):
        monkeypatch.delenv(variable, raising=False)
    before = _git_status()
    start = time.time()
    pm.execute_notebook(
        str(ROOT / "notebooks" / f"{name}.ipynb"),
        str(tmp_path / f"{name}.ipynb"),
        kernel_name="lance",
        progress_bar=False,
        cwd=str(ROOT / "notebooks"),
    )
    assert _git_status() == before
    lab = ROOT / "build" / "lab" / "smoke"
    written = [p for p in (lab / f"{name}.md", lab / f"{name}.png") if p.exists()]
    assert written and all(p.stat().st_mtime >= start - 1 for p in written)
    executed = nbformat.read(tmp_path / f"{name}.ipynb", as_version=4)
    shown = "".join(t for c in executed.cells if c.cell_type == "code" for t in _outputs(c, "text"))
    assert "saved to /" not in shown
    if (lab / f"{name}.png").exists():  # a figure's "saved to" line: repository-relative
        assert f"saved to build/lab/smoke: {name}.png" in shown
