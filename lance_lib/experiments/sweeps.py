"""Which experiments each notebook needs: one declaration, read by notebooks and the grid.

A figure or table notebook does not run experiments of its own making: the function
registered for it with :func:`lance_lib.experiments.base.register_sweep` (where the
experiment is defined) turns the notebook's parameters (from
its profile) into a list of experiment configs; the notebook calls :func:`sweep` and
plots the records, and ``make grid`` calls :func:`profile_experiments` to compute every
experiment of a profile before any notebook runs (in-process or on a Dask cluster).
Both therefore ask for exactly the same configs, and the results cache serves the
notebook what the grid computed.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from lance_lib.experiments.base import ExperimentConfig, SweepFunction, registered_sweeps

__all__ = ["SWEEP_MODULES", "grid_only_parameters", "profile_experiments", "sweep", "sweeps"]

#: Modules whose import registers sweeps (imported by :func:`sweeps` before listing).
SWEEP_MODULES: tuple[str, ...] = (
    "lance_lib.experiments.finetune",
    "lance_lib.experiments.transformer",
    "lance_lib.experiments.gradient_fidelity",
    "lance_lib.experiments.latency",
    "lance_lib.experiments.region_memory",
    "lance_lib.experiments.continual",
)


def sweeps() -> dict[str, SweepFunction]:
    """Every registered sweep, ``{notebook: function}`` (importing :data:`SWEEP_MODULES`)."""
    for module in SWEEP_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as error:
            if error.name != module:  # a real import error inside the module
                raise
    return registered_sweeps()


def sweep(notebook: str, params: Mapping[str, Any]) -> list[ExperimentConfig]:
    """The experiment configs ``notebook`` needs under ``params``."""
    registered = sweeps()
    if notebook not in registered:
        raise KeyError(
            f"no sweep registered for notebook {notebook!r}; known: {sorted(registered)}"
        )
    return list(registered[notebook](params))


def grid_only_parameters(notebook: str, profile: str) -> dict[str, Any]:
    """The parameters of a *grid-only* sweep (no notebook): ``common`` overridden by its section.

    Raises
    ------
    KeyError
        ``profile`` has no section named ``notebook``.
    """
    from lance_lib.paths import profiles_dir
    from lance_lib.profiles import load_profile

    data = load_profile(profile, profiles_dir())
    if notebook not in data:
        raise KeyError(f"profile {profile!r} has no section {notebook!r}")
    return {**(data.get("common") or {}), **dict(data[notebook] or {})}


def profile_experiments(profile: str) -> dict[str, list[ExperimentConfig]]:
    """``{notebook: [configs]}`` for every sweep of ``profile``.

    A sweep whose notebook exists gets that notebook's parameters (what the notebook
    will ask for); a *grid-only* sweep, with no notebook yet but a section of its name
    in the profile, gets the profile's ``common`` values overridden by that section.
    """
    from lance_lib.paths import profiles_dir, repo_root
    from lance_lib.profiles import load_profile, notebook_parameters

    data = load_profile(profile, profiles_dir())
    out: dict[str, list[ExperimentConfig]] = {}
    for notebook, function in sorted(sweeps().items()):
        path = repo_root() / "notebooks" / f"{notebook}.ipynb"
        if path.exists():
            params, _ = notebook_parameters(path, profile, profiles_dir=profiles_dir())
        elif notebook in data:
            params = grid_only_parameters(notebook, profile)
        else:
            continue
        out[notebook] = list(function(params))
    return out
