"""A throwaway reference-weights folder (manifest + fp16 file) for tests, via ``LANCE_WEIGHTS``."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lance_lib.models import build_model
from lance_lib.weights import REFERENCE_RECIPES, file_sha256


def write_reference(directory: Path, model: str = "mcunet", seed: int = 0) -> dict:
    """Write a random split-A backbone of ``model`` and its manifest entry; return the entry."""
    recipe = REFERENCE_RECIPES[model]
    torch.manual_seed(seed)
    net = build_model(model, len(recipe.classes))
    half = {k: v.half() if v.is_floating_point() else v for k, v in net.state_dict().items()}
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(half, directory / recipe.file)
    entry = {
        "model": model,
        "file": recipe.file,
        "sha256": file_sha256(directory / recipe.file),
        "classes": recipe.classes,
        "resolution": recipe.resolution,
        "test_accuracy": 0.0,
        "command": recipe.command,
    }
    manifest = directory / "manifest.json"
    entries = json.loads(manifest.read_text()) if manifest.exists() else []
    entries = [e for e in entries if e["model"] != model] + [entry]
    manifest.write_text(json.dumps(entries))
    return entry
