"""Tests of lance_lib.reporting: figure/table writers, paper-vs-ours, the paper's numbers."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from lance_lib import provenance as run_provenance
from lance_lib.reporting import (
    Provenance,
    SavedFiles,
    figure_size,
    paper_table,
    paper_tables,
    paper_value,
    paper_vs_ours,
    plot_accuracy_matrix,
    record_sources,
    save_figure,
    save_table,
    table_to_latex,
    table_to_markdown,
    use_style,
)
from lance_lib.reporting.finetune_tables import finetune_rows, paper_comparison, seed_summary
from tests.synthetic_records import finetune_record

PROV = Provenance("smoke", ["cifar10_mini"], ["resnet18"], ["1 epoch"])


def test_save_figure_writes_png_pdf_and_provenance(tmp_path):
    use_style()
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    written = save_figure(fig, tmp_path / "sub" / "fig", provenance=PROV)
    names = sorted(p.name for p in written)
    assert names == ["fig.pdf", "fig.png", "fig.provenance.json"]
    assert (tmp_path / "sub" / "fig.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "sub" / "fig.pdf").read_bytes()[:5] == b"%PDF-"
    meta = json.loads((tmp_path / "sub" / "fig.provenance.json").read_text())
    assert meta["profile"] == "smoke" and meta["models"] == ["resnet18"]
    assert not list((tmp_path / "sub").glob("*.tmp"))  # nothing half-written left


def test_save_figure_rejects_suffix(tmp_path):
    fig, _ = plt.subplots()
    with pytest.raises(ValueError, match="suffix"):
        save_figure(fig, tmp_path / "fig.png")
    plt.close(fig)


def test_save_table_markdown_and_booktabs(tmp_path):
    df = pd.DataFrame({"method": ["BP", "LANCE_2"], "MB": [24.5, float("nan")], "n": [1, 2]})
    save_table(df, tmp_path / "t", caption="Memory & more", provenance=PROV)
    md = (tmp_path / "t.md").read_text()
    assert "| method | MB | n |" in md and "|---|---:|---:|" in md
    assert "| LANCE_2 |  | 2 |" in md  # NaN is an empty cell
    assert "profile: smoke" in md
    tex = (tmp_path / "t.tex").read_text()
    for rule in (r"\toprule", r"\midrule", r"\bottomrule", r"\caption{Memory \& more"):
        assert rule in tex
    assert r"LANCE\_2" in tex and "24.50" in tex
    with pytest.raises(TypeError):
        save_table([1, 2], tmp_path / "bad")


def test_markdown_and_latex_escape_specials():
    df = pd.DataFrame({"a|b": ["x|y"], "p%": ["50%"]})
    assert r"x\|y" in table_to_markdown(df)
    assert r"50\%" in table_to_latex(df) and r"p\%" in table_to_latex(df)


def test_paper_vs_ours_side_by_side():
    ours = pd.DataFrame({"model": ["R18", "R18"], "method": ["BP", "LANCE"], "Acc": [90.0, 88.0]})
    paper = pd.DataFrame({"model": ["R18"], "method": ["BP"], "Acc": [92.5]})
    out = paper_vs_ours(ours, paper, ["model", "method"], ["Acc"])
    assert list(out.columns) == ["model", "method", "Acc (paper)", "Acc (ours)", "Acc (ours-paper)"]
    assert out["Acc (ours-paper)"].iloc[0] == pytest.approx(-2.5)
    assert np.isnan(out["Acc (paper)"].iloc[1]) and np.isnan(out["Acc (ours-paper)"].iloc[1])
    with pytest.raises(KeyError, match="MB"):
        paper_vs_ours(ours, paper, ["model"], ["MB"])
    with pytest.raises(ValueError, match="several rows"):
        paper_vs_ours(ours, pd.concat([paper, paper]), ["model", "method"], ["Acc"])


def test_plot_accuracy_matrix_masks_unseen_tasks():
    a = np.array([[0.9, 0.1, 0.2], [0.85, 0.8, 0.3], [0.8, 0.75, 0.7]])
    ax = plot_accuracy_matrix(a, title="t")
    texts = sorted(t.get_text() for t in ax.texts)
    assert len(texts) == 6  # lower triangle only, as percentages
    assert "90" in texts and "10" not in texts
    plt.close(ax.figure)
    with pytest.raises(ValueError, match="square"):
        plot_accuracy_matrix(np.zeros((2, 3)))


def test_provenance_requires_profile():
    with pytest.raises(ValueError):
        Provenance("", ["d"], ["m"])
    assert Provenance("cpu", "cifar10", "mcunet").caption().startswith("profile: cpu")


# The paper's numbers: a sample of cells checked against the paper's text by hand.
@pytest.mark.parametrize(
    ("table", "metric", "keys", "value"),
    [
        (1, "MB", {"model": "ResNet18", "method": "BP", "layers": 4}, 61.25),
        (1, "Acc", {"model": "ResNet34", "method": "LANCE", "layers": 2}, 58.59),
        (
            2,
            "Acc",
            {"model": "MobileNetV2", "method": "ASI", "layers": 2, "dataset": "CUB200"},
            46.44,
        ),
        (
            2,
            "MB",
            {"model": "ResNet18", "method": "LANCE", "layers": 4, "dataset": "CIFAR100"},
            0.16,
        ),
        (3, "Mem_MB", {"method": "LANCE", "dataset": "SplitMiniImageNet"}, 32.96),
        (3, "BWT", {"method": "CUBER", "dataset": "SplitCIFAR100"}, 0.13),
        (
            8,
            "GFLOPs",
            {
                "model": "ResNet34",
                "method": "LANCE",
                "layers": 4,
                "dataset": "CIFAR100",
                "batch_size": 8,
            },
            4.161,
        ),
        (
            9,
            "MB",
            {"model": "MCUNet", "method": "LANCE", "layers": 2, "dataset": "Pets", "batch_size": 8},
            0.015,
        ),
    ],
)
def test_paper_value_sample(table, metric, keys, value):
    assert paper_value(table, metric, **keys) == pytest.approx(value)


def test_paper_tables_shape_and_errors():
    df = paper_tables()
    assert sorted(df["table"].unique()) == [1, 2, 3, 8, 9]
    assert df["value"].notna().all()
    t2 = paper_table(2, model="ResNet18", dataset="CIFAR10")
    assert len(t2) == 8 and {"Acc", "MB", "TFLOPs"} <= set(t2.columns)
    assert len(paper_table(3, method=["LANCE", "GPM"])) == 6
    with pytest.raises(KeyError):
        paper_table(7)
    with pytest.raises(KeyError):
        paper_table(1, metrics=["BWT"])
    with pytest.raises(KeyError, match="selects 0"):
        paper_value(1, "Acc", model="VGG")


def test_provenance_sidecar_explains_differences(tmp_path):
    prov = Provenance("smoke", "cifar10_mini", "resnet18", seeds=[1, 0], weights={"resnet18": "ab"})
    save_figure(plt.figure(), tmp_path / "f", provenance=prov)
    meta = json.loads((tmp_path / "f.provenance.json").read_text())
    assert meta["seeds"] == [0, 1] and meta["weights"] == {"resnet18": "ab"}
    assert meta["versions"]["torch"] and meta["python"] and meta["cpu"]
    assert meta["torch_threads"] >= 1 and "commit" in meta and "gpu" in meta
    with pytest.raises(AttributeError):
        prov.profile = "cpu"  # frozen: what produced a figure does not change afterwards


def test_provenance_with_records_names_their_seeds_weights_and_device():
    records = [
        {"provenance": {"seeds": [2], "weights": {"resnet18": "aa"}, "device": "cpu"}},
        {"provenance": {"seeds": [0, 2], "weights": {"mcunet": "bb"}, "device": "cpu"}},
        None,  # a record a notebook could not compute
    ]
    prov = Provenance("smoke", "cifar10_mini", ["resnet18", "mcunet"], seeds=[5])
    prov = prov.with_records(records)
    assert prov.seeds == (0, 2, 5) and prov.weights == {"resnet18": "aa", "mcunet": "bb"}
    assert prov.device == "cpu" and prov.profile == "smoke"
    assert record_sources([])["device"] is None


def test_save_figure_shows_the_png_in_a_kernel_and_caps_the_width(tmp_path, monkeypatch):
    from lance_lib.reporting import MAX_WIDTH, figures

    shown = []
    monkeypatch.setattr(figures, "in_notebook", lambda: True)
    monkeypatch.setattr(figures, "show_png", shown.append)
    fig = plt.figure(figsize=(3 * MAX_WIDTH, 3.0))
    written = save_figure(fig, tmp_path / "wide")
    assert shown == [tmp_path / "wide.png"]  # the file written is what the reader sees
    assert fig.get_size_inches()[0] == pytest.approx(MAX_WIDTH)
    assert fig.get_size_inches()[1] == pytest.approx(1.0)  # aspect kept
    assert not plt.fignum_exists(fig.number)  # closed: the inline backend shows it once
    assert repr(written) == f"saved to {tmp_path}: wide.png, wide.pdf"
    save_figure(plt.figure(), tmp_path / "quiet", show=False)
    assert len(shown) == 1


def test_figure_size_and_method_table():
    from lance_lib.methods import METHOD_TABLE
    from lance_lib.reporting import METHOD_LABELS, figure_size, method_color, method_label

    assert figure_size(1) < figure_size(2) and figure_size(10)[0] == figure_size(20)[0]
    with pytest.raises(ValueError, match="ncols"):
        figure_size(0)
    assert method_label("lance") == METHOD_TABLE["lance"].label == METHOD_LABELS["lance"]
    assert method_color("bp") == METHOD_TABLE["bp"].color


def test_footer_stays_below_an_outside_legend(tmp_path):
    use_style()
    fig, ax = plt.subplots()
    ax.plot([0, 1], label="a curve")
    legend = fig.legend(loc="outside lower center")
    seen = []  # extents at every draw, including the tight-bbox draws of savefig

    def measure(event):
        if len(fig.texts):
            footer = fig.texts[-1].get_window_extent(event.renderer)
            seen.append((footer.y1, legend.get_window_extent(event.renderer).y0))

    fig.canvas.mpl_connect("draw_event", measure)
    save_figure(fig, tmp_path / "f", provenance=PROV)
    assert seen and all(top <= bottom for top, bottom in seen), seen


def test_sidecar_holds_the_hash_of_the_resolved_parameters(tmp_path):
    params = {"seed": 0, "finetune": {"epochs": 3, "weights": "reference"}, "models": ["a"]}
    same = {"models": ("a",), "finetune": {"weights": "reference", "epochs": 3}, "seed": 0}
    prov = Provenance("smoke", "cifar10_mini", "resnet18", parameters=params)
    meta = json.loads(prov.write_sidecar(tmp_path / "t").read_text())
    assert meta["parameters_sha256"] == run_provenance.parameters_sha256(same)
    assert len(meta["parameters_sha256"]) == 64
    assert meta["parameters_sha256"] != run_provenance.parameters_sha256({**params, "seed": 1})
    assert Provenance("smoke", "d", "m").as_dict()["parameters_sha256"] is None


def test_dirty_flag_covers_everything_that_decides_a_number(tmp_path, monkeypatch):
    import subprocess

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    for name in ("lance_lib/x.py", "profiles/p.yaml", "notebooks/n.ipynb", "bench/b.py",
                 "Makefile", "README.md"):  # fmt: skip
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("0\n")
    git("init", "-q")
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    monkeypatch.setattr(run_provenance, "_REPO", tmp_path)
    state = run_provenance.git_commit.__wrapped__
    assert state()["dirty"] is False
    (tmp_path / "README.md").write_text("1\n")  # documentation decides no number
    assert state()["dirty"] is False
    for name in ("profiles/p.yaml", "Makefile", "bench/b.py", "notebooks/n.ipynb"):
        (tmp_path / name).write_text("1\n")
        assert state()["dirty"] is True and name in state()["dirty_paths"]
        git("checkout", "--", name)
    (tmp_path / "lance_lib" / "new.py").write_text("")  # a new module, not yet committed
    assert state() == {**state(), "dirty": True, "dirty_paths": ["lance_lib/new.py"]}


def test_seed_summary_gives_mean_std_and_the_paired_gap_interval_per_setting():
    records = []
    for seed, gap in enumerate((-1.0, -2.0, -3.0)):
        records += [finetune_record("bp", seed=seed, acc=0.60 + seed / 100),
                    finetune_record("lance", seed=seed, acc=0.60 + (seed + gap) / 100)]  # fmt: skip
    records.append(finetune_record("lance", seed=0, acc=0.5, layers=2))  # no BP partner
    summary = seed_summary(finetune_rows(records)).set_index(["method", "layers"])
    bp, lance = summary.loc["bp", 4], summary.loc["lance", 4]
    assert bp["seeds"] == [0, 1, 2] and bp["acc mean"] == pytest.approx(61.0)
    assert bp["acc std"] == pytest.approx(1.0) and np.isnan(bp["gap to BP"])
    assert lance["gap to BP"] == pytest.approx(-2.0) and lance["gap std"] == pytest.approx(1.0)
    half = 4.302652729911275 / 3**0.5
    assert lance["gap 95% CI low"] == pytest.approx(-2 - half)
    assert lance["gap 95% CI high"] == pytest.approx(-2 + half)
    alone = summary.loc["lance", 2]
    assert np.isnan(alone["acc std"]) and np.isnan(alone["gap to BP"])


def test_table2_like_for_like_only_when_every_setting_is_the_papers():
    ours = finetune_record("bp")
    paper = finetune_record("bp")
    paper["settings"] = {**paper["settings"], "weights": "IMAGENET1K_V1", "resolution": 224,
                         "epochs": 50}  # fmt: skip
    paper["classes"] = list(range(10))
    table = paper_comparison(finetune_rows([ours, paper]), [2], "TFLOPs", 1e12, paper_batch=128)
    assert table["like for like"].tolist() == [False, True]
    assert "weights reference (paper IMAGENET1K_V1)" in table["differs"][0]
    assert "classes 5 of 10" in table["differs"][0] and table["differs"][1] == ""


def test_smoke_banner_links_the_reference_copy_and_says_what_smoke_runs():
    from lance_lib.reporting import banner_text

    assert banner_text("reference", "fig2_angle") is None and banner_text("cpu", "x") is None
    text = banner_text("smoke", "fig2_angle.ipynb")
    copy = Path(__file__).resolve().parents[1] / "figures/reference/notebooks/fig2_angle.ipynb"
    if copy.is_file():  # linked from notebooks/, where the notebook lives
        assert "(../figures/reference/notebooks/fig2_angle.ipynb)" in text
    else:  # never a link to a file that is not there
        assert "](" not in text and "figures/reference/notebooks/fig2_angle.ipynb" in text
    assert "reference ResNet18" in text and "committed" in text
    assert "once it is built" not in text and "small models" not in text
    notebooks = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
    for path in notebooks:  # every notebook shows it, through the one helper
        assert f'show_banner(profile, \\"{path.stem}\\")' in path.read_text(), path.name


def test_saved_files_name_their_folder_from_the_repository_root(tmp_path):
    from lance_lib.paths import repo_root

    inside = SavedFiles([repo_root() / "figures" / "smoke" / "a.png"])
    assert repr(inside) == "saved to figures/smoke: a.png"
    outside = SavedFiles([tmp_path / "b.png"])
    assert repr(outside) == f"saved to {tmp_path}: b.png"


def test_layout_check_flags_overlapping_text_and_legends_over_data(tmp_path):
    from lance_lib.reporting import LayoutWarning, layout_problems

    use_style()
    fig, axes = plt.subplots(1, 4, figsize=(4, 2))  # four long titles in 4 inches
    for ax in axes:
        ax.set_title("a long title that cannot fit")
    assert any("title" in p and "overlaps" in p for p in layout_problems(fig))
    with pytest.warns(LayoutWarning, match="overlaps"):
        save_figure(fig, tmp_path / "titles")

    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([0, 1], [1, 1], label="flat line under the legend")
    ax.legend(loc="upper left")
    ax.set_ylim(0, 1.05)
    assert "axes 0 legend covers data of axes 0" in layout_problems(fig)

    fig, ax = plt.subplots(figsize=(2.5, 2))  # minor tick labels of a log axis collide
    ax.semilogx([3, 9], [0, 1])
    ax.set_xticks([5, 6], ["5 x 10^0", "6 x 10^0"], minor=True)
    assert any("minor tick label '5 x 10^0' overlaps" in p for p in layout_problems(fig))

    fig, ax = plt.subplots(figsize=figure_size(1))  # a plain figure passes
    ax.plot([0, 1], [0, 1], label="line")
    ax.set(title="title", xlabel="x", ylabel="y")
    ax.legend(loc="upper left")
    assert layout_problems(fig) == []
    plt.close("all")


def test_converged_records_are_looked_up_in_the_cache_never_computed(tmp_path, monkeypatch):
    from lance_lib.experiments.sweeps import grid_only_parameters, sweep
    from lance_lib.io import write_json_atomic
    from lance_lib.reporting.converged import converged_records
    from lance_lib.reporting.scorecard import gather_records

    monkeypatch.setenv("LANCE_RESULTS", str(tmp_path))
    assert converged_records("smoke") is None and gather_records("smoke", ()) == {}
    configs = sweep("claim_runs", grid_only_parameters("claim_runs", "reference"))
    assert converged_records("reference") == [None] * len(configs)  # nothing run
    assert not list(tmp_path.rglob("*.json"))
    path, settings, required = configs[1].record_request()
    write_json_atomic(path, {**dict.fromkeys(required), "settings": settings,
                             "final_accuracy": 0.8})  # fmt: skip
    found = converged_records("reference")
    assert found[1]["path"] == str(path) and found[1]["final_accuracy"] == 0.8
    assert found[:1] + found[2:] == [None] * (len(configs) - 1)
    assert gather_records("reference", ())["claim_runs"] == found


def test_accuracy_curves_are_bp_and_lance_at_bps_eps_and_n_mean_over_seeds():
    from lance_lib.reporting.converged import plot_accuracy_curves

    records = []
    for seed in range(3):
        records += [
            finetune_record("bp", seed=seed, epochs=3, curve=(0.6, 0.7, 0.8 + seed / 100)),
            finetune_record("lance", seed=seed, epochs=3, curve=(0.6, 0.7, 0.75)),
            finetune_record("lance", seed=seed, epochs=3, modes="all", curve=(0.5, 0.6, 0.7)),
            finetune_record("lance", seed=seed, epochs=3, eps=0.9, curve=(0.1,) * 3),  # eps sweep
        ]
    fig, ax = plt.subplots()
    drawn = plot_accuracy_curves(records, ax)
    plt.close(fig)
    assert drawn == ["BP, 4 convs: 81.00 %", "LANCE, Eq. 1 as written, 4 convs: 70.00 %",
                     "LANCE, channel-only, 4 convs: 75.00 %"]  # fmt: skip
    assert len(ax.lines) == 3
    assert list(ax.lines[0].get_ydata()) == pytest.approx([60.0, 70.0, 81.0])
