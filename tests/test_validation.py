"""Boundary checks name the argument, the value and the fix."""

import dataclasses

import pytest

from lance_lib.experiments.base import ExperimentConfig, register_experiment, run_experiment
from lance_lib.validation import check_choice, check_int, check_real


@pytest.mark.parametrize(
    "value, error, match",
    [
        (None, TypeError, r"num_batches must be an integer, got None"),
        (1.5, ValueError, r"whole number, got 1\.5"),
        (True, TypeError, "integer"),
        ("2", TypeError, "integer"),
        (0, ValueError, r">= 1, got 0; e\.g\. num_batches=1"),
    ],
)
def test_check_int_rejects(value, error, match):
    with pytest.raises(error, match=match):
        check_int("num_batches", value, minimum=1)


def test_check_int_accepts_integral_values():
    assert check_int("n", 2.0, minimum=1) == 2 and check_int("n", None, allow_none=True) is None


def test_check_real_bounds():
    assert check_real("eps", 1, low=0, high=1, low_open=True) == 1.0
    with pytest.raises(ValueError, match=r"eps must lie in \(0, 1\], got 0"):
        check_real("eps", 0, low=0, high=1, low_open=True)
    with pytest.raises(TypeError, match="eps must be a number, got None"):
        check_real("eps", None, low=0, high=1)
    with pytest.raises(ValueError, match="nan"):
        check_real("lr", float("nan"), low=0)


def test_check_choice_lists_the_choices():
    with pytest.raises(ValueError, match=r"method must be one of 'bp', 'lance'; got 'lanc'"):
        check_choice("method", "lanc", ("lance", "bp"))


@dataclasses.dataclass(frozen=True)
class _Toy(ExperimentConfig):
    kind = "toy"
    epochs: int = 1

    def validate(self):
        check_int("epochs", self.epochs, minimum=1)


@register_experiment(_Toy)
def _run_toy(config, scale=1):
    return {"value": config.epochs * scale}


def test_configs_validate_once_and_dispatch_by_type():
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        _Toy(epochs=0)
    with pytest.raises(TypeError, match=r"unknown toy settings \['epoch'\]; known: \['epochs'\]"):
        _Toy.from_dict({"epoch": 2})
    config = _Toy.from_dict({"epochs": 3})
    assert run_experiment(config, scale=2) == {"value": 6}
    assert config.settings() == {"epochs": 3, "kind": "toy", "format": 1}
    assert config.key() != config.replace(epochs=4).key()
    with pytest.raises(ValueError):
        config.replace(epochs=0)
