"""Profiles: the parameters every notebook, the grid, the bench and the scorecard read.

Parameters come from ``profiles/<profile>.yaml``::

    common:            # shared defaults, passed to a notebook only if it declares them
      seed: 0
    fig4_eps:          # one section per notebook (file stem); every key must be declared
      eps_values: [0.5, 0.7, 0.9]
      inputs: [bench/latest.json]   # optional: files the notebook reads (not a parameter)

Three parameters are always injected (:data:`INJECTED`): ``profile`` (its name),
``outputs_dir`` (``figures/<profile>`` at the repository root unless given) and
``force`` (recompute cached results).

One source of truth: the profile
--------------------------------
A notebook opened in JupyterLab gets the same values as under ``make figures``: its
parameters cell reads them from the profile it names, one line per parameter::

    from lance_lib.profiles import profile_parameters

    profile = "smoke"  # profiles/<profile>.yaml supplies every value below
    params = profile_parameters("fig4_eps_gradient", profile)
    outputs_dir = params["outputs_dir"]  # build/lab/<profile>/: make figures writes figures/
    force = False  # recompute cached results
    eps_values = params["eps_values"]  # energy thresholds of Eq. (3)

The reader changes a value by editing its line, or the whole set by naming another
profile; papermill sees every line as a declared parameter and the notebook runner
(:mod:`lance_lib.notebook_runner`) injects the profile's values after the cell (the
same values, so a notebook behaves the same in both). One value differs by design:
``outputs_dir``. Run interactively, a notebook writes its figures and tables to the
untracked ``build/lab/<profile>/`` (:func:`lance_lib.paths.lab_dir`); only the runner
(``make figures``) injects the committed ``figures/<profile>/``. Both read and write the
same results cache. Every path resolves from the repository root
(:mod:`lance_lib.paths`), never from the working directory (``notebooks/`` under
JupyterLab).

Bad parameters
--------------
A malformed profile (the file and line are named), a malformed ``--set`` value (the
``--set`` item is named), or a key the notebook does not declare (named as coming from
the profile or from ``--set``) raises :class:`ParameterError` before any kernel starts;
the notebook runner's command line reports it as a usage error (exit status 2).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nbformat
import yaml

from lance_lib import paths

__all__ = [
    "INJECTED",
    "ParameterError",
    "load_profile",
    "notebook_parameters",
    "parse_set",
    "profile_parameters",
]

#: Parameters the runner always passes; every notebook must declare them.
INJECTED = ("profile", "outputs_dir", "force")


class ParameterError(ValueError):
    """A profile, a ``--set`` value or the parameters they give a notebook cannot be used."""


def _yaml_problem(error: yaml.YAMLError) -> str:
    """Where and what the YAML parser found wrong, in one line."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    if mark is None:
        return problem
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"


def load_profile(profile: str, profiles_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Read ``<profiles_dir>/<profile>.yaml`` (default: the repository's ``profiles/``).

    Raises
    ------
    FileNotFoundError
        No such profile (the message lists the profiles that exist).
    ParameterError
        The file is not valid YAML (the message names the file, line and column), is
        not a mapping of sections, or ``common`` / a section is not a mapping.
    """
    profiles_dir = Path(profiles_dir) if profiles_dir is not None else paths.profiles_dir()
    path = profiles_dir / f"{profile}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in profiles_dir.glob("*.yaml"))
        raise FileNotFoundError(f"no profile {profile!r} at {path}; profiles: {known}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ParameterError(
            f"profile {path}, {_yaml_problem(error)}; fix the YAML there (indentation, a "
            "missing ':' or closing bracket, an unquoted ':' in a value)"
        ) from None
    if not isinstance(data, dict):
        raise ParameterError(f"{path} must hold a mapping of sections, got {type(data).__name__}")
    for name, section in data.items():
        if section is not None and not isinstance(section, dict):
            raise ParameterError(
                f"{path}: section {name!r} must be a mapping of parameters, got "
                f"{type(section).__name__}"
            )
    return data


def _declared(notebook: Path) -> dict[str, Any]:
    """The names declared in the notebook's cell tagged ``parameters``."""
    import papermill as pm

    nb = nbformat.read(notebook, as_version=4)
    if not any("parameters" in c.get("metadata", {}).get("tags", []) for c in nb.cells):
        raise ParameterError(f"{notebook} has no cell tagged 'parameters'")
    return pm.inspect_notebook(str(notebook))


def _section(
    data: Mapping[str, Any], notebook: str | os.PathLike
) -> tuple[dict[str, Any], list[str]]:
    """The notebook's own section of a loaded profile (without ``inputs``), and its inputs."""
    section = dict(data.get(Path(notebook).stem) or {})
    inputs = [str(p) for p in section.pop("inputs", [])]
    return section, inputs


def _outputs_dir(profile: str, outputs_dir: str | os.PathLike | None) -> str:
    folder = Path(outputs_dir) if outputs_dir is not None else paths.figures_dir(profile)
    return str(folder.resolve())


def profile_parameters(
    notebook: str | os.PathLike,
    profile: str = "smoke",
    *,
    profiles_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Every value ``profile`` gives ``notebook``: what its parameters cell reads.

    Parameters
    ----------
    notebook
        The notebook's file name or stem (``"fig4_eps_gradient"``): its section of the
        profile is used.
    profile
        Which ``profiles/<profile>.yaml`` to read.
    profiles_dir
        Folder of the profiles (default: the repository's ``profiles/``).

    Returns
    -------
    dict
        The ``common`` keys, overridden by the notebook's section, and ``profile``,
        ``outputs_dir`` and ``force`` (``False``): the values the notebook runner
        injects, except ``outputs_dir``, which is the untracked
        :func:`lance_lib.paths.lab_dir` (``build/lab/<profile>``, absolute) where the
        runner injects ``figures/<profile>``: an interactive run leaves the committed
        figures as they are.

    Raises
    ------
    FileNotFoundError
        No such profile (the message lists those that exist).
    KeyError
        The profile has no section for the notebook.
    """
    data = load_profile(profile, profiles_dir)
    stem = Path(notebook).stem
    if stem not in data:
        sections = sorted(k for k in data if k != "common")
        raise KeyError(
            f"profile {profile!r} has no section {stem!r}; add one to profiles/{profile}.yaml "
            f"(its sections: {sections})"
        )
    section, _ = _section(data, stem)
    params = {**(data.get("common") or {}), **section}
    params.update(profile=profile, outputs_dir=str(paths.lab_dir(profile)), force=False)
    return params


def notebook_parameters(
    notebook: str | os.PathLike,
    profile: str,
    *,
    profiles_dir: str | os.PathLike | None = None,
    outputs_dir: str | os.PathLike | None = None,
    force: bool = False,
    overrides: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """Parameters for ``notebook`` under ``profile``, and its declared input files.

    ``common`` keys the notebook declares, then the notebook's own section, then
    ``overrides``, then the injected ``profile``, ``outputs_dir`` (default
    ``figures/<profile>`` at the repository root) and ``force``.

    Raises
    ------
    ParameterError
        A section or override key the notebook does not declare in its ``parameters``
        cell (named as coming from the profile or from ``--set``), a notebook that does
        not declare the injected parameters, or a malformed profile.
    """
    notebook = Path(notebook)
    declared = _declared(notebook)
    missing = [p for p in INJECTED if p not in declared]
    if missing:
        raise ParameterError(f"{notebook} must declare {missing} in its parameters cell")
    data = load_profile(profile, profiles_dir)
    section, inputs = _section(data, notebook)
    overrides = dict(overrides or {})
    for origin, keys in (("--set", overrides), (f"profile {profile!r}", section)):
        unknown = sorted(set(keys) - set(declared))
        if unknown:
            raise ParameterError(
                f"{origin} sets {unknown} for {notebook.name}, which declares only "
                f"{sorted(declared)} in its parameters cell; set declared names only"
            )
    own = {**section, **overrides}
    params = {k: v for k, v in (data.get("common") or {}).items() if k in declared}
    params.update(own)
    params.update(
        profile=profile, outputs_dir=_outputs_dir(profile, outputs_dir), force=bool(force)
    )
    return params, inputs


def parse_set(items: Sequence[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` items as overrides, each value read as YAML.

    Raises
    ------
    ParameterError
        An item without ``=`` or a key, or a value that is not valid YAML; the message
        names the ``--set`` item and the fix.
    """
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ParameterError(
                f"--set {item!r}: expected KEY=VALUE, e.g. --set 'eps_values=[0.5, 0.7]'"
            )
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as error:
            raise ParameterError(
                f"--set {item!r}: the value is not valid YAML ({_yaml_problem(error)}); "
                f"close every bracket and quote text with ':' or '#', e.g. "
                f"--set '{key.strip()}=[a, b]'"
            ) from None
    return out
