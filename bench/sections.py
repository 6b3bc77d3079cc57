"""The section registry of ``python -m bench``: each section is registered where it is defined.

A section is a function ``run(args) -> dict`` that measures one thing and returns its
part of the report; a ``"ratios"`` entry in that part is merged into the report's
top-level ``ratios``. :func:`add_arguments` adds the options shared by the sections.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lance_lib.experiments.setup import WEIGHTS
from lance_lib.methods import METHODS
from lance_lib.paths import repo_root, results_dir

__all__ = [
    "SECTIONS",
    "Section",
    "add_arguments",
    "ordered_sections",
    "register_section",
    "weights_option",
]

Run = Callable[[argparse.Namespace], dict[str, Any]]


@dataclass(frozen=True)
class Section:
    """One benchmark section: its name, what it measures, when it runs, and its function."""

    name: str
    help: str
    order: int
    run: Run


#: ``{name: Section}`` of every registered section.
SECTIONS: dict[str, Section] = {}


def register_section(name: str, help: str, *, order: int) -> Callable[[Run], Run]:
    """Decorator: register ``run(args) -> dict`` as the section ``name``.

    ``order`` places it in a full run (smaller first).
    """

    def decorate(run: Run) -> Run:
        if name in SECTIONS:
            raise ValueError(f"bench section {name!r} is registered twice")
        SECTIONS[name] = Section(name, help, order, run)
        return run

    return decorate


def ordered_sections() -> list[Section]:
    """The registered sections in the order a full run takes them."""
    return sorted(SECTIONS.values(), key=lambda section: section.order)


def weights_option(value: str) -> str | None:
    """``--weights`` as the experiments' ``weights`` setting (``none``: random init)."""
    return None if value == "none" else value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every section reads (the paper's Table 2 setting by default)."""
    parser.add_argument(
        "--out", default=str(repo_root() / "bench" / "latest.json"), help="report file"
    )
    parser.add_argument(
        "--results-dir",
        default=str(results_dir("bench")),
        help="where the experiments' records go",
    )
    parser.add_argument(
        "--reuse", action="store_true", help="reuse stored records instead of measuring again"
    )
    parser.add_argument(
        "--weights",
        default="reference",
        choices=[str(w) if w is not None else "none" for w in WEIGHTS],
        help="starting weights: the shipped reference backbones (default), pretrained here "
        "on split A, ImageNet's (network), or none (random)",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, ...; default CUDA if present")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="input side; default: the weights' own (64 px for the reference ResNet18, "
        "the model's native 224 px otherwise, the paper's)",
    )
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4, help="the last N convs are trained")
    parser.add_argument("--eps", type=float, default=0.7)
    parser.add_argument("--calib-batches", type=int, default=4, help="LANCE calibration batches N")
    parser.add_argument(
        "--repeats", type=int, default=41, help="timed steps per method (interleaved)"
    )
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per method first")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--rank-ratio", type=float, default=0.25, help="LoRAct's r")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    fig5 = parser.add_argument_group("fig5", "the Fig. 5 latency sweep")
    fig5.add_argument("--fig5-model", default="mcunet")
    fig5.add_argument("--fig5-max-layers", type=int, default=10)
    fig5.add_argument("--fig5-batch-size", type=int, default=128)
    fig5.add_argument(
        "--fig5-resolution", type=int, default=None, help="default: the weights' resolution"
    )
    gpu = parser.add_argument_group("gpu", "the CUDA check (skipped without CUDA)")
    gpu.add_argument(
        "--gpu-steps", type=int, default=3, help="fine-tuning steps per method on the paper path"
    )
