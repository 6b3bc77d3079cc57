"""Pretraining cache: reuse, integrity checks, determinism."""

import warnings
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from lance_lib.training import pretrain as pretrain_module
from lance_lib.training.pretrain import (
    CheckpointWarning,
    checkpoint_path,
    pretrain,
    pretrain_settings,
    state_dict_sha256,
)

TINY = dict(resolution=16, epochs=1, batch_size=16, lr=0.05, seed=3, progress=False)


pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_datasets(settings, root):
    """Two separable classes of 16x16 images, as the data API would return them."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(64) % 2
    images = torch.randn(64, 3, 16, 16, generator=generator) + labels.view(-1, 1, 1, 1)
    data = TensorDataset(images, labels)
    return data, data, 2


@pytest.fixture
def tiny_data(monkeypatch):
    monkeypatch.setattr(pretrain_module, "_make_datasets", _tiny_datasets)


def _run(cache_dir):
    return pretrain("mcunet", "tiny", [0, 1], cache_dir=cache_dir, **TINY)


def _weights_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_checkpoint_name_is_readable_and_keyed_by_settings(tmp_path):
    kwargs = dict(resolution=32, epochs=10, batch_size=64, lr=0.05, seed=0)
    settings = pretrain_settings("resnet18", "cifar10_mini", range(5), **kwargs)
    path = checkpoint_path(settings, tmp_path)
    assert path.parent == tmp_path
    assert path.name.startswith("resnet18-cifar10_mini-c0-4-r32-e10-s0-")
    other = pretrain_settings("resnet18", "cifar10_mini", range(5), **{**kwargs, "lr": 0.1})
    assert checkpoint_path(other, tmp_path) != path


def test_cache_is_reused(tmp_path, tiny_data, monkeypatch):
    first = _run(tmp_path)
    record = first.pretrain_record
    assert not record["cached"] and record["num_classes"] == 2
    assert 0.0 <= record["test_accuracy"] <= 1.0
    assert not first.training

    def no_training(*args, **kwargs):
        raise AssertionError("a cached checkpoint must not be retrained")

    monkeypatch.setattr(pretrain_module, "_pretrain_fresh", no_training)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointWarning)
        second = _run(tmp_path)
    assert second.pretrain_record["cached"]
    assert second.pretrain_record["checkpoint"] == record["checkpoint"]
    assert _weights_equal(first, second)
    assert [p.name for p in tmp_path.iterdir()] == [Path(record["checkpoint"]).name]


def test_truncated_checkpoint_is_detected_and_rebuilt(tmp_path, tiny_data):
    first = _run(tmp_path)
    path = Path(first.pretrain_record["checkpoint"])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.warns(CheckpointWarning, match="unusable"):
        rebuilt = _run(tmp_path)
    assert not rebuilt.pretrain_record["cached"]
    assert _weights_equal(first, rebuilt)  # same seed, same weights
    assert _run(tmp_path).pretrain_record["cached"]  # the rebuilt file is intact


def test_tampered_weights_fail_the_hash(tmp_path, tiny_data):
    first = _run(tmp_path)
    path = first.pretrain_record["checkpoint"]
    payload = torch.load(path, weights_only=True)
    payload["state_dict"]["classifier.1.bias"] += 1.0
    torch.save(payload, path)
    with pytest.warns(CheckpointWarning, match="SHA-256"):
        assert not _run(tmp_path).pretrain_record["cached"]


def test_settings_mismatch_is_rebuilt(tmp_path, tiny_data):
    first = _run(tmp_path)
    path = first.pretrain_record["checkpoint"]
    payload = torch.load(path, weights_only=True)
    payload["settings"]["epochs"] = 99
    torch.save(payload, path)
    with pytest.warns(CheckpointWarning, match="different settings"):
        assert not _run(tmp_path).pretrain_record["cached"]


def test_global_random_state_is_left_untouched(tmp_path, tiny_data):
    torch.manual_seed(123)
    expected = torch.rand(3)
    for _ in range(2):  # a training run, then a cache hit
        torch.manual_seed(123)
        _run(tmp_path)
        assert torch.equal(torch.rand(3), expected)


def test_state_dict_sha256_sees_every_byte():
    state = {"w": torch.zeros(3), "n": torch.tensor(0)}
    digest = state_dict_sha256(state)
    assert digest == state_dict_sha256({k: v.clone() for k, v in state.items()})
    state["w"][1] = 1e-30
    assert state_dict_sha256(state) != digest


def test_default_cache_dir_is_under_the_data_root(tmp_path, tiny_data, monkeypatch):
    monkeypatch.setenv("LANCE_DATA", str(tmp_path))
    model = pretrain("mcunet", "tiny", [0, 1], **TINY)
    assert Path(model.pretrain_record["checkpoint"]).parent == tmp_path / "checkpoints"


def test_datasets_come_from_the_data_api():
    settings = pretrain_settings(
        "mcunet", "cifar10_mini", [3, 5], resolution=16, epochs=1, batch_size=50, lr=0.1, seed=0
    )
    train, test, num_classes = pretrain_module._make_datasets(settings, None)
    assert num_classes == 2
    assert (len(train), len(test)) == (1000, 200)
    image, label = train[0]
    assert image.shape == (3, 16, 16)
    assert {label for _, label in (train[i] for i in range(0, 1000, 97))} <= {0, 1}


def test_crop_flip_augmentation_is_in_the_key_and_moves_pixels():
    kwargs = dict(resolution=16, epochs=1, batch_size=50, lr=0.1, seed=0)
    flip = pretrain_settings("mcunet", "cifar10_mini", [3, 5], **kwargs)
    crop = pretrain_settings("mcunet", "cifar10_mini", [3, 5], augment="crop-flip", **kwargs)
    assert (flip["crop_padding"], crop["crop_padding"]) == (0, pretrain_module.CROP_PADDING)
    train, _, _ = pretrain_module._make_datasets(crop, None)
    torch.manual_seed(0)
    views = torch.stack([train[0][0] for _ in range(8)])
    assert (views - views[0]).abs().amax() > 0  # random windows and flips differ
    with pytest.raises(ValueError, match="augment"):
        pretrain_settings("mcunet", "cifar10_mini", [3, 5], augment="mixup", **kwargs)


def test_an_interrupted_run_resumes_where_it_stopped(tmp_path, tiny_data, monkeypatch):
    """Per-epoch state: a run stopped after epoch 1 and resumed equals an unbroken run."""
    from lance_lib.training import loop

    settings = {**TINY, "epochs": 3}
    whole = pretrain("mcunet", "tiny", [0, 1], cache_dir=tmp_path / "a", **settings)
    calls = []
    evaluate = loop.evaluate

    def stop_in_epoch_two(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(loop, "evaluate", stop_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        pretrain("mcunet", "tiny", [0, 1], cache_dir=tmp_path / "b", **settings)
    partial = list((tmp_path / "b").glob("*.partial.pt"))
    assert len(partial) == 1 and not list((tmp_path / "b").glob("*[!l].pt"))
    monkeypatch.setattr(loop, "evaluate", evaluate)
    resumed = pretrain("mcunet", "tiny", [0, 1], cache_dir=tmp_path / "b", **settings)
    assert _weights_equal(whole, resumed)
    curve = lambda m: [(c["train_loss"], c["test_accuracy"]) for c in m.pretrain_record["curve"]]  # noqa: E731
    assert curve(whole) == curve(resumed) and len(curve(whole)) == 3
    assert not partial[0].exists()  # the finished checkpoint replaces the training state
