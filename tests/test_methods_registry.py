"""The method table, the registry, frozen settings and the measurement record."""

from __future__ import annotations

import ast
import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from lance_lib.methods import (
    BLOCK_METHODS,
    METHOD_TABLE,
    METHODS,
    LanceSettings,
    MethodInfo,
    MethodMeasurement,
    apply_method,
    measure_method,
    method_color,
    method_info,
    method_label,
    method_settings,
    register_method,
)
from lance_lib.methods.registry import MethodSettings, settings_class

LAYERS = ["0", "2"]


def small_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 3), nn.Flatten(), nn.LazyLinear(3)
    )


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 3, (8,), generator=g)


def test_table_holds_every_method_any_plot_shows():
    names = set(METHOD_TABLE)
    assert set(METHODS) | set(BLOCK_METHODS) | {"gpm", "finetune", "multitask"} <= names
    assert METHODS == ("bp", "lance", "hosvd", "asi", "loract", "checkpoint")
    for info in METHOD_TABLE.values():
        assert isinstance(info, MethodInfo) and info.kind in ("layer", "block", "continual")
        assert re.fullmatch(r"#[0-9a-f]{6}", info.color)
    colors = [info.color for info in METHOD_TABLE.values()]
    assert len(set(colors)) == len(colors)
    assert method_label("loract", 0.25) == "LoRAct r=1/4" and method_color("lance") == "#de8f05"
    assert method_info("gpm").kind == "continual"
    with pytest.raises(KeyError, match="method table"):
        method_info("sgd")
    with pytest.raises(dataclasses.FrozenInstanceError):
        METHOD_TABLE["bp"].label = "x"


def test_harness_dispatches_through_the_registry_without_name_branches():
    """Every layer method is a registered frozen settings class; the harness names none."""
    source = (Path(__file__).parents[1] / "lance_lib" / "methods" / "harness.py").read_text()
    compared = {
        node.value
        for cmp in ast.walk(ast.parse(source))
        if isinstance(cmp, ast.Compare)
        for node in [cmp.left, *cmp.comparators]
        if isinstance(node, ast.Constant)
    }
    assert not compared & set(METHODS)
    for name in METHODS:
        cls = settings_class(name)
        assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen
        assert cls.name == name
    with pytest.raises(ValueError, match="already registered"):
        register_method("lance")(type("Again", (MethodSettings,), {}))
    with pytest.raises(ValueError, match="not a layer method"):
        register_method("gpm")(type("Gpm", (MethodSettings,), {}))


def test_settings_are_validated_once_and_frozen():
    settings = LanceSettings(eps=0.5, modes=[1])
    assert settings.modes == (1,) and settings.to_dict() == {
        "method": "lance",
        "eps": 0.5,
        "num_batches": 100,
        "modes": [1],
        "keep_unprofitable": False,
        "core_dtype": "param",
    }
    assert LanceSettings(core_dtype="torch.int8").core_dtype == "int8"
    with pytest.raises(ValueError, match="core_dtype='int4' is not supported"):
        LanceSettings(core_dtype="int4")
    with pytest.raises(TypeError, match="keep_unprofitable must be True or False"):
        LanceSettings(keep_unprofitable="yes")
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.eps = 0.9
    with pytest.raises(ValueError, match="eps"):
        LanceSettings(eps=1.5)
    with pytest.raises(ValueError, match="num_batches must be >= 1"):
        LanceSettings(num_batches=0)
    with pytest.raises(ValueError, match="not a mode selection"):
        LanceSettings(modes="batch")
    with pytest.raises(ValueError, match="rank_ratio must lie in"):
        method_settings("loract", rank_ratio=0.0)
    with pytest.raises(ValueError, match="segments must be >= 1"):
        method_settings("checkpoint", segments=0)
    with pytest.raises(TypeError, match="unknown method options"):
        method_settings("lance", epsilon=0.5)
    # one shared bag: options of other methods are left out of a method's settings
    assert method_settings("bp", eps=0.5, rank_ratio=0.25) == {"method": "bp"}
    assert json.dumps(method_settings("asi"))  # JSON-ready


def test_lance_defaults_to_the_channel_mode_only(batch):
    """The fine-tuning default keeps descent directions (Theorem 1's scope)."""
    model = small_net()
    model(batch[0])
    handle = apply_method(model, "lance", LAYERS, calib_loader=[batch], num_batches=1)
    assert handle.settings.modes == "channel"
    assert [handle.subspaces[n].modes for n in LAYERS] == [[1], [1]]
    # any batch size trains: the batch mode is not tied to the calibrated size
    nn.functional.cross_entropy(handle.model(batch[0][:5]), batch[1][:5]).backward()
    handle.restore()
    handle = apply_method(model, "lance", LAYERS, calib_loader=[batch], num_batches=1, modes="all")
    assert [handle.subspaces[n].modes for n in LAYERS] == [[0, 1, 2, 3]] * 2
    handle.restore()


def test_measurement_is_a_documented_frozen_record(batch):
    model = small_net()
    model(batch[0])
    handle = apply_method(model, "lance", LAYERS, calib_loader=[batch], num_batches=1)
    m = measure_method(handle, batch, repeats=2, warmup=0)
    handle.restore()
    assert isinstance(m, MethodMeasurement)
    record = m.to_dict()
    assert set(record) == {f.name for f in dataclasses.fields(MethodMeasurement)}
    doc = MethodMeasurement.__doc__
    assert all(name in doc for name in record)
    assert len(m.step_s) == 2 and m.recompute_bytes == 0
    assert m.cuda_peak_bytes is None and m.cuda_baseline_bytes is None  # CPU
    assert m.measured_region_bytes == m.stored_between_passes_bytes
    json.dumps(record)
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.analytic_mb = 0.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_measurement_records_the_cuda_peak_on_a_gpu(batch):
    model = small_net().cuda()
    batch = (batch[0].cuda(), batch[1].cuda())
    model(batch[0])
    handle = apply_method(model, "bp", LAYERS)
    m = measure_method(handle, batch, repeats=1, warmup=0)
    assert m.cuda_peak_bytes >= m.cuda_baseline_bytes > 0
