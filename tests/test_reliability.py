"""Bad input and faults (issue 17): each case is refused with a clear error or handled right.

Every case goes through the public API or a command line (``main(argv)`` in this
process: the argument parsing and error reporting of ``python -m ...``) and asserts
either an exception of the right type whose message names the argument (and, where
there is one, the fix), or a correct result. Cases that must fail *before any work*
use inputs that raise if touched. Interrupts (SIGINT, SIGTERM, SIGKILL) are in
``tests/test_interrupts.py``.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import lance_lib as ll
from lance_lib.experiments.cache import CacheWarning, cached_record, record_path
from lance_lib.io import write_json_atomic
from lance_lib.subspaces import Subspaces
from tests.notebook_files import tiny_notebook, tiny_profiles

pytestmark = pytest.mark.usefixtures("one_thread")


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, 3),
    )


def _batches(n: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(2, 3, 8, 8, generator=g), torch.zeros(2)) for _ in range(n)]


class Untouchable:
    """A loader that fails the test if calibration starts iterating it."""

    def __iter__(self):
        raise AssertionError("the loader was read although the arguments are invalid")


# --- calibrate: stops after N batches (item 1) ----------------------------------------


def test_calibrate_leaves_the_rest_of_an_iterator():
    items = iter(_batches(4))
    ll.calibrate(_net(), items, ["0"], num_batches=2)
    assert len(list(items)) == 2  # was 1: batch 3 was read and dropped


def test_calibrate_never_asks_for_a_raising_item():
    def batches():
        yield from _batches(2)
        raise RuntimeError("item 3 was requested")

    subs = ll.calibrate(_net(), batches(), ["0"], num_batches=2)
    assert subs.settings["num_batches"] == 2


def test_calibrate_never_waits_for_a_blocking_item():
    release = threading.Event()

    def batches():
        yield from _batches(2)
        release.wait(20)  # the old code blocked here
        raise AssertionError("item 3 was requested")

    start = time.perf_counter()
    ll.calibrate(_net(), batches(), ["0"], num_batches=2)
    assert time.perf_counter() - start < 10
    release.set()


# --- calibrate: what was used is what is recorded (item 5) ----------------------------


def test_short_loader_records_the_batches_used():
    with pytest.warns(UserWarning, match="ran out after 2 of num_batches=100"):
        subs = ll.calibrate(_net(), _batches(2), ["0"], num_batches=100)
    assert subs.settings["num_batches"] == 2  # was 100
    assert subs.settings["num_batches_requested"] == 100


def test_integral_float_num_batches_is_an_int():
    subs = ll.calibrate(_net(), _batches(4), ["0"], num_batches=3.0)
    assert subs.settings["num_batches"] == 3 and isinstance(subs.settings["num_batches"], int)


@pytest.mark.parametrize(
    "value, error, words",
    [
        (1.5, ValueError, "num_batches must be a whole number, got 1.5"),  # was: 2 used, 1 kept
        (None, TypeError, "num_batches must be an integer, got None"),  # was: int() TypeError
        ("4", TypeError, "num_batches must be an integer, got '4'"),
        (0, ValueError, "num_batches must be >= 1"),
        (True, TypeError, "num_batches must be an integer, got True"),
    ],
)
def test_bad_num_batches_is_refused_before_any_batch(value, error, words):
    with pytest.raises(error, match=words):
        ll.calibrate(_net(), Untouchable(), ["0"], num_batches=value)


# --- calibrate: every error names the argument (item 9) -------------------------------


@pytest.mark.parametrize(
    "value, error",
    [
        (None, TypeError),
        ("0.7", TypeError),
        (2, ValueError),
        (0, ValueError),
        (float("nan"), ValueError),
    ],
)
def test_bad_eps_is_refused_naming_eps(value, error):
    with pytest.raises(error, match=r"eps must .*e\.g\. eps=0\.7"):
        ll.calibrate(_net(), Untouchable(), ["0"], eps=value)


def test_a_loader_of_dicts_says_to_pass_forward():
    batches = [{"image": x, "label": y} for x, y in _batches(2)]
    with pytest.raises(TypeError, match=r"batch is a dict.*forward=.*batch\['image'\]"):
        ll.calibrate(_net(), batches, ["0"], num_batches=2)
    subs = ll.calibrate(  # the fix the message names works
        _net(), batches, ["0"], num_batches=2, forward=lambda m, b: m(b["image"])
    )
    assert subs["0"].input_shape == (2, 3, 8, 8)


def test_a_model_on_the_meta_device_is_refused_before_any_batch():
    with pytest.raises(ValueError, match=r"'0\.weight' is on the 'meta' device.*to_empty"):
        ll.calibrate(_net().to("meta"), Untouchable(), ["0"], num_batches=2)


def test_a_lazy_model_is_refused_before_any_batch():
    model = nn.Sequential(nn.LazyLinear(3))
    with pytest.raises(ValueError, match="uninitialised lazy tensor '0.weight'"):
        ll.calibrate(model, Untouchable(), ["0"], num_batches=2)


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(loader=3), TypeError, "loader must be an iterable of batches"),
        (dict(forward="model"), TypeError, "forward must be a function forward"),
        (dict(memory_rule="eq4"), ValueError, "memory_rule must be one of 'eq3', 'eq5'"),
        (dict(memory=[torch.eye(4)]), TypeError, "memory must map layer names"),
        (dict(memory={"0": torch.eye(3)[0]}), TypeError, r"memory\['0'\] must be an \(n, m\)"),
        (dict(layers=None), TypeError, "layers must be a layer name or a list"),
        (dict(layers=[]), ValueError, "no layers given"),
        (dict(layers=["9"]), KeyError, "layer '9' is not a module.*0, 2, 4"),
        (dict(layers=["1"]), KeyError, "layer '1' is a ReLU, not a Conv2d or Linear"),
        (dict(modes="channels"), ValueError, "modes='channels' is not a mode selection"),
        (dict(modes={"2": "channel"}), ValueError, r"no entry for layers \['0'\]"),
    ],
)
def test_bad_arguments_are_refused_before_any_batch(kwargs, error, words):
    args = {"loader": Untouchable(), "layers": ["0"], "num_batches": 2, **kwargs}
    with pytest.raises(error, match=words):
        ll.calibrate(_net(), **args)


def test_a_memory_of_the_wrong_size_names_the_layer():
    with pytest.raises(ValueError, match=r"memory\['0'\] has 5 rows.*feature mode 1 has size 3"):
        ll.calibrate(_net(), _batches(2), ["0"], num_batches=2, memory={"0": torch.eye(5)[:, :2]})


def test_an_empty_loader_says_so():
    with pytest.raises(ValueError, match="yielded no batches"):
        ll.calibrate(_net(), [], ["0"])


def test_nan_activations_name_the_layer_and_batch():
    batches = _batches(2)
    batches[1][0][0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="layer '0' received NaN or Inf.*batch 1"):
        ll.calibrate(_net(), batches, ["0"], num_batches=2)


def test_a_short_last_batch_names_drop_last():
    batches = _batches(2) + [(torch.randn(1, 3, 8, 8), torch.zeros(1))]
    with pytest.raises(ValueError, match="drop_last=True"):
        ll.calibrate(_net(), batches, ["0"], num_batches=3)


# --- calibrate rejects what compress rejects; compress is all or nothing (item 6) ----


@pytest.mark.parametrize("padding_mode", ["reflect", "replicate", "circular"])
def test_calibrate_refuses_non_zero_padding_before_any_batch(padding_mode):
    model = _net()
    model[2].padding_mode = padding_mode
    with pytest.raises(ValueError, match=f"layer '2': padding_mode='{padding_mode}'.*'zeros'"):
        ll.calibrate(model, Untouchable(), ["0", "2"], num_batches=2)


def test_calibrate_refuses_padding_same_naming_explicit_padding():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding="same"))
    with pytest.raises(ValueError, match=r"padding='same'.*padding=\(1, 1\)"):
        ll.calibrate(model, Untouchable(), ["0"], num_batches=2)


def test_padding_valid_is_supported():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding="valid"))
    ll.compress(model, ll.calibrate(model, _batches(2), ["0"], num_batches=2))
    model(_batches(1)[0][0]).sum().backward()
    assert model[0].weight.grad is not None


def test_compress_swaps_all_layers_or_none():
    model = _net()
    subs = ll.calibrate(model, _batches(2), ["0", "2"], num_batches=2)
    model[2].padding_mode = "reflect"  # changed after calibration
    with pytest.raises(ValueError, match="layer '2': padding_mode='reflect'"):
        ll.compress(model, subs)
    assert type(model[0]) is nn.Conv2d  # was a LanceConv2d until restore()


def test_compress_refuses_subspaces_of_another_model():
    subs = ll.calibrate(_net(), _batches(2), ["0", "2"], num_batches=2)
    other = _net()
    other[2] = nn.Conv2d(5, 4, 3, padding=1)
    with pytest.raises(ValueError, match="layer '2' takes 5 input channels.*with 4"):
        ll.compress(other, subs)
    assert type(other[0]) is nn.Conv2d


def test_compress_refuses_a_plain_dict_of_tensors():
    with pytest.raises(TypeError, match="subspaces must be the result of calibrate"):
        ll.compress(_net(), [torch.eye(3)])
    with pytest.raises(TypeError, match="layer '0': expected a LayerSubspace"):
        ll.compress(_net(), {"0": torch.eye(3)})


def test_compressed_batch_mode_names_drop_last():
    model = _net()
    ll.compress(model, ll.calibrate(model, _batches(2), ["0"], num_batches=2))
    with pytest.raises(ValueError, match="batch of size 3.*drop_last=True"):
        model(torch.randn(3, 3, 8, 8))


# --- unbatched inputs (item 12) -------------------------------------------------------


def test_an_unbatched_conv_input_fails_at_calibration():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1))
    data = [torch.randn(3, 8, 8) for _ in range(2)]
    with pytest.raises(ValueError, match=r"\(3, 8, 8\).*batched \(B, C, H, W\).*unsqueeze"):
        ll.calibrate(model, data, ["0"], num_batches=2)  # was: fails in backward


def test_an_unbatched_input_to_a_compressed_conv_names_unsqueeze():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1))
    ll.compress(model, ll.calibrate(model, _batches(2), ["0"], num_batches=2, modes="channel"))
    with pytest.raises(ValueError, match=r"3 modes.*\(B, C, H, W\).*unsqueeze"):
        model(torch.randn(3, 8, 8))


def test_an_unbatched_linear_input_works_end_to_end():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 3)).double()
    data = [torch.randn(6, dtype=torch.float64) for _ in range(3)]
    subs = ll.calibrate(model, data, ["0"], eps=0.9, num_batches=3)
    u = subs["0"].factors[0]
    ll.compress(model, subs)
    model(data[0]).sum().backward()
    expected = torch.outer(torch.ones(3, dtype=torch.float64), u @ (u.T @ data[0]))
    torch.testing.assert_close(model[0].weight.grad, expected)


# --- Subspaces files (items 8 and 10) -------------------------------------------------


def _saved(tmp_path: Path) -> Path:
    path = tmp_path / "subspaces.pt"
    ll.calibrate(_net(), _batches(2), ["0", "4"], num_batches=2).save(path)
    return path


@pytest.mark.parametrize(
    "write, words",
    [
        (lambda p: torch.save(torch.zeros(3), p), "it holds a Tensor, not the mapping"),
        (lambda p: p.write_text('{"layers": {}}'), "it holds JSON text"),
        (lambda p: p.write_bytes(b""), "it holds nothing"),
        (
            lambda p: torch.save({"format": "lance-subspaces/1"}, p),
            r"lacks \['layers', 'settings'\]",
        ),
        (lambda p: torch.save({"format": "other/2", "layers": {}}, p), "its format is 'other/2'"),
        (
            lambda p: torch.save(
                {"format": "lance-subspaces/1", "settings": {}, "layers": {"0": {"ranks": [1]}}}, p
            ),
            "the entry of layer '0' is malformed",
        ),
    ],
)
def test_loading_what_save_did_not_write_names_the_file(tmp_path, write, words):
    path = tmp_path / "s.pt"
    write(path)
    with pytest.raises(ValueError, match=words) as info:
        Subspaces.load(path)
    assert str(path) in str(info.value) and "Subspaces.save" in str(info.value)
    assert "weights_only" not in str(info.value)  # never the unsafe advice


def test_loading_a_truncated_subspaces_file_is_a_clear_error(tmp_path):
    path = _saved(tmp_path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="is not a LANCE subspaces file"):
        Subspaces.load(path)


def test_loading_a_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        Subspaces.load(tmp_path / "absent.pt")


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_saved_subspaces_get_the_umask_mode_and_round_trip(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        path = _saved(tmp_path)
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == mode  # was 0o600 whatever the umask
    assert list(Subspaces.load(path)) == ["0", "4"]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


# --- the results cache (items 2, 3 and 8) ---------------------------------------------


SETTINGS = {"kind": "toy", "eps": 0.7}
FIELDS = ("final_accuracy", "accuracy")


def _compute():
    return {"final_accuracy": 0.5, "accuracy": [0.5]}


def _stored(folder: Path) -> Path:
    path = record_path(folder, "toy", SETTINGS)
    cached_record(path, SETTINGS, _compute, required=FIELDS)
    return path


def _edit_settings(path):
    data = json.loads(path.read_text())
    data.update(final_accuracy=0.99, settings={**data["settings"], "eps": 0.123})
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "damage, reason",
    [
        (_edit_settings, r"stored settings differ from the request \(eps\)"),
        (lambda p: p.write_text("{}"), "it stores no settings"),
        (lambda p: p.write_text("[]"), "this file holds a list"),
        (lambda p: p.write_text(p.read_text()[:20]), "unreadable"),
        (
            lambda p: p.write_text(json.dumps({"settings": SETTINGS, "accuracy": [0.9]})),
            r"lacks the fields \['final_accuracy'\]",
        ),
    ],
)
def test_a_record_that_does_not_answer_the_request_is_recomputed(tmp_path, damage, reason):
    path = _stored(tmp_path)
    damage(path)
    with pytest.warns(CacheWarning, match=reason):
        record = cached_record(path, SETTINGS, _compute, required=FIELDS)
    assert record["final_accuracy"] == 0.5 and record["settings"] == SETTINGS
    assert json.loads(path.read_text())["final_accuracy"] == 0.5


def test_a_matching_record_is_reused_without_recomputing(tmp_path):
    path = _stored(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        record = cached_record(path, SETTINGS, Untouchable().__iter__, required=FIELDS)
    assert record["final_accuracy"] == 0.5


def test_a_results_folder_below_a_file_fails_before_the_run(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    path = record_path(blocker / "results", "toy", SETTINGS)
    with pytest.raises(PermissionError, match="a part of it is a file"):
        cached_record(path, SETTINGS, Untouchable().__iter__, required=FIELDS)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_results_folder_fails_before_the_run(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(PermissionError, match="not writable"):
            cached_record(folder / "r.json", SETTINGS, Untouchable().__iter__, required=FIELDS)
    finally:
        folder.chmod(0o755)


def test_records_get_the_umask_mode(tmp_path):
    old = os.umask(0o027)
    try:
        path = write_json_atomic(tmp_path / "r.json", {"a": 1})
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o640


# --- experiment configs (items 4 and 9) -----------------------------------------------

FINETUNE = dict(model="mcunet", weights=None, classes=[0, 1], resolution=16, layers=2, epochs=1)


@pytest.mark.parametrize(
    "change, error, words",
    [
        (dict(classes=[0, 99]), ValueError, r"classes \[99\] are outside.*0\.\.9"),
        (dict(max_steps_per_epoch=0), ValueError, "max_steps_per_epoch must be >= 1"),
        (dict(epochs=0), ValueError, "epochs must be >= 1"),
        (dict(method="lance", eps=2), ValueError, "eps must lie in"),
        (dict(method="adam"), ValueError, "method must be one of"),
        (dict(num_batches=None), TypeError, "num_batches must be an integer"),
        (dict(lr=-1), ValueError, "lr must lie in"),
        (dict(epoch=3), TypeError, "epoch"),
    ],
)
def test_finetune_config_names_the_bad_setting(change, error, words):
    from lance_lib.experiments.finetune import FinetuneConfig

    with pytest.raises(error, match=words):
        FinetuneConfig.from_dict({**FINETUNE, **change})


def test_bp_ignores_eps():
    from lance_lib.experiments.finetune import FinetuneConfig

    assert FinetuneConfig.from_dict({**FINETUNE, "method": "bp", "eps": 2}).method == "bp"


def test_continual_epochs_zero_is_refused_at_once(tmp_path):
    from lance_lib.experiments.continual import run_benchmark

    start = time.perf_counter()
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        run_benchmark("cifar10_mini", "lance", epochs=0, results_dir=tmp_path)
    assert time.perf_counter() - start < 5  # was a 57 s run caching ACC 49.0
    assert not list(tmp_path.iterdir())


def test_missing_reference_weights_name_make_weights(tmp_path, monkeypatch):
    from lance_lib.weights import ReferenceWeightsError, load_reference

    monkeypatch.setenv("LANCE_WEIGHTS", str(tmp_path))
    with pytest.raises(ReferenceWeightsError, match="make weights"):
        load_reference("resnet18")


# --- command lines --------------------------------------------------------------------


def _usage_error(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, words",
    [
        (["build", "nosuch"], "invalid choice: 'nosuch'"),
        (["build", "mcunet", "--threads", "abc"], "--threads: invalid int value"),
        ([], "required: command"),
    ],
)
def test_weights_cli_usage_errors(argv, words, capsys):
    from lance_lib.weights import main

    assert words in _usage_error(main, argv, capsys)


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--profile", "nosuch", "--dry-run"], "no profile 'nosuch'"),
        (["--profile", "smoke", "--workers", "0", "--dry-run"], "workers must be >= 1"),
        (["--profile", "smoke", "--scheduler", "host", "--dry-run"], "scheduler must be a Dask"),
        (["--profile", "smoke", "--only", "nosuch", "--dry-run"], "only names notebooks"),
    ],
)
def test_grid_cli_usage_errors(argv, words, capsys):
    from lance_lib.experiments.grid import main

    assert words in _usage_error(main, argv, capsys)


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--only", "nosuch"], "--only: invalid choice: 'nosuch'"),
        (["--eps", "abc"], "--eps: invalid float value"),
        (["--weights", "imagenet"], "--weights: invalid choice"),
    ],
)
def test_bench_cli_usage_errors(argv, words, capsys):
    from bench.__main__ import main

    assert words in _usage_error(main, argv, capsys)


# --- the notebook runner (items 7 and 11) ---------------------------------------------


def _runner_usage_error(tmp_path, capsys, *extra: str, profile_text: str | None = None) -> str:
    from lance_lib.notebook_runner import main

    profiles = tiny_profiles(tmp_path / "profiles", *([profile_text] if profile_text else []))
    notebook = tiny_notebook(tmp_path / "tiny.ipynb", "pass")
    argv = [str(notebook), str(tmp_path / "out.ipynb"), "--profile", "t"]
    return _usage_error(main, [*argv, "--profiles-dir", str(profiles), *extra], capsys)


@pytest.mark.parametrize(
    "item, words",
    [
        (
            "benchmarks=[cifar10_mini",
            r"--set 'benchmarks=\[cifar10_mini': the value is not valid YAML",
        ),
        ("size", "--set 'size': expected KEY=VALUE"),
        ("=3", "--set '=3': expected KEY=VALUE"),
    ],
)
def test_a_malformed_set_value_names_the_set_item(tmp_path, capsys, item, words):
    err = _runner_usage_error(tmp_path, capsys, "--set", item)
    assert re.search(words, err) and "Traceback" not in err  # was a raw yaml ParserError


def test_an_unknown_set_key_is_reported_as_set_not_the_profile(tmp_path, capsys):
    err = _runner_usage_error(tmp_path, capsys, "--set", "nope=1")
    assert "--set sets ['nope'] for tiny.ipynb, which declares only" in err
    assert "profile 't' sets" not in err  # was blamed on the profile


def test_an_unknown_profile_key_is_reported_as_the_profile(tmp_path, capsys):
    err = _runner_usage_error(tmp_path, capsys, profile_text="tiny: {nope: 1}\n")
    assert "profile 't' sets ['nope'] for tiny.ipynb" in err


def test_a_malformed_profile_names_the_file_and_line(tmp_path, capsys):
    err = _runner_usage_error(
        tmp_path, capsys, profile_text="common:\n  seed: 0\ntiny: {size: [3\n"
    )
    assert re.search(r"profile .*t\.yaml, line 4, column 1: .*fix the YAML", err)


@pytest.mark.parametrize(
    "text, words",
    [("- a\n- b\n", "must hold a mapping of sections, got list"), ("tiny: 3\n", "section 'tiny'")],
)
def test_a_profile_of_the_wrong_shape_is_a_parameter_error(tmp_path, text, words):
    from lance_lib.profiles import ParameterError, load_profile

    with pytest.raises(ParameterError, match=words):
        load_profile("t", tiny_profiles(tmp_path, text))


def test_an_unknown_profile_lists_the_profiles(tmp_path, capsys):
    err = _runner_usage_error(tmp_path, capsys, "--profile", "nosuch")
    assert "no profile 'nosuch'" in err and "['t']" in err


def test_a_second_runner_on_the_same_output_waits_and_finds_it_up_to_date(tmp_path, capfd):
    from lance_lib.notebook_runner import run_notebook

    runs = tmp_path / "runs.txt"
    notebook = tiny_notebook(
        tmp_path / "tiny.ipynb",
        f"import time\nopen({str(runs)!r}, 'a').write('run\\n')\ntime.sleep(2)",
    )
    output = tmp_path / "build" / "tiny.ipynb"
    options = dict(profile="t", profiles_dir=tiny_profiles(tmp_path / "p"), outputs_dir=tmp_path)
    executed = {}
    first = threading.Thread(
        target=lambda: executed.update(first=run_notebook(notebook, output, **options))
    )
    first.start()
    claim = output.with_name(".tiny.ipynb.claim")
    deadline = time.monotonic() + 120
    while not claim.exists() and first.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert claim.exists(), "the first runner never claimed its output"
    second = run_notebook(notebook, output, **options)  # waits for the first
    first.join()
    assert executed["first"] is True and second is False
    assert runs.read_text() == "run\n"  # was executed twice, the last writer winning
    assert "is executing it; waiting for it to finish" in capfd.readouterr().err
    assert not claim.exists()
