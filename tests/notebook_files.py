"""Tiny notebooks and profiles for the tests of the notebook runner."""

from __future__ import annotations

from pathlib import Path

import nbformat


def tiny_notebook(path: Path, *bodies: str) -> Path:
    """A notebook declaring ``profile``, ``outputs_dir``, ``force``, ``size``; then ``bodies``."""
    params = nbformat.v4.new_code_cell('profile = "x"\noutputs_dir = "."\nforce = False\nsize = 1')
    params.metadata["tags"] = ["parameters"]
    nb = nbformat.v4.new_notebook(cells=[params, *map(nbformat.v4.new_code_cell, bodies)])
    nb.metadata["kernelspec"] = {"name": "lance", "display_name": "lance", "language": "python"}
    nbformat.write(nb, path)
    return path


def tiny_profiles(folder: Path, text: str = "tiny: {size: 3}\n") -> Path:
    """A profiles folder holding ``t.yaml`` with ``text``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "t.yaml").write_text(text)
    return folder
