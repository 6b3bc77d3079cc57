"""Execute one parameterized notebook with papermill, for ``make figures`` and the tests.

Parameters come from ``profiles/<profile>.yaml``::

    common:            # shared defaults, passed to a notebook only if it declares them
      seed: 0
    fig4_eps:          # one section per notebook (file stem); every key must be declared
      eps_values: [0.5, 0.7, 0.9]
      inputs: [bench/latest.json]   # optional: files the notebook reads (not a parameter)

Three parameters are always injected: ``profile`` (its name), ``outputs_dir``
(``figures/<profile>`` unless given) and ``force`` (recompute cached results).

Incremental and resumable
-------------------------
The executed notebook records a fingerprint (SHA-256 of the notebook's cell sources,
its parameters, its declared input files and every file of the library).  When make
asks for a re-run because some prerequisite is newer but the fingerprint is unchanged
(e.g. another notebook's profile section was edited), the notebook is not executed
again; its output is only touched.  The output notebook is written atomically (temporary
file, then ``os.replace``), so an interrupted run leaves no half-written target and
``make`` retries it; the experiments it had finished are in result files keyed by their
settings (:mod:`lance_lib.results`) and are not recomputed.  A failed run is kept as
``<output>.failed.ipynb`` for reading.  Beside the output a make dependency file
``<output stem>.d`` lists the declared inputs.

Usage::

    python -m lance_lib.notebook_runner notebooks/fig4_eps.ipynb build/smoke/fig4_eps.ipynb \\
        --profile smoke [--outputs-dir DIR] [--force] [--set key=yaml_value ...]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nbformat
import yaml

__all__ = [
    "INJECTED",
    "fingerprint",
    "load_profile",
    "main",
    "notebook_parameters",
    "run_notebook",
]

#: Parameters the runner always passes; every notebook must declare them.
INJECTED = ("profile", "outputs_dir", "force")
KERNEL = "lance"
_LIBRARY = Path(__file__).resolve().parent


def load_profile(profile: str, profiles_dir: str | os.PathLike = "profiles") -> dict[str, Any]:
    """Read ``<profiles_dir>/<profile>.yaml`` and check its shape.

    Raises
    ------
    FileNotFoundError
        No such profile (the message lists the profiles that exist).
    ValueError
        The file is not a mapping of sections, or ``common`` / a section is not a mapping.
    """
    path = Path(profiles_dir) / f"{profile}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in Path(profiles_dir).glob("*.yaml"))
        raise FileNotFoundError(f"no profile {profile!r} at {path}; profiles: {known}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of sections, got {type(data).__name__}")
    for name, section in data.items():
        if section is not None and not isinstance(section, dict):
            raise ValueError(f"{path}: section {name!r} must be a mapping")
    return data


def _declared(notebook: Path) -> dict[str, Any]:
    """The names declared in the notebook's cell tagged ``parameters``."""
    import papermill as pm

    nb = nbformat.read(notebook, as_version=4)
    if not any("parameters" in c.get("metadata", {}).get("tags", []) for c in nb.cells):
        raise ValueError(f"{notebook} has no cell tagged 'parameters'")
    return pm.inspect_notebook(str(notebook))


def notebook_parameters(
    notebook: str | os.PathLike,
    profile: str,
    *,
    profiles_dir: str | os.PathLike = "profiles",
    outputs_dir: str | os.PathLike | None = None,
    force: bool = False,
    overrides: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """Parameters for ``notebook`` under ``profile``, and its declared input files.

    ``common`` keys the notebook declares, then the notebook's own section, then
    ``overrides``, then the injected ``profile``, ``outputs_dir`` and ``force``.

    Raises
    ------
    ValueError
        A section or override key the notebook does not declare in its ``parameters``
        cell, or a notebook that does not declare the injected parameters.
    """
    notebook = Path(notebook)
    declared = _declared(notebook)
    missing = [p for p in INJECTED if p not in declared]
    if missing:
        raise ValueError(f"{notebook} must declare {missing} in its parameters cell")
    data = load_profile(profile, profiles_dir)
    section = dict(data.get(notebook.stem) or {})
    inputs = [str(p) for p in section.pop("inputs", [])]
    own = {**section, **dict(overrides or {})}
    unknown = sorted(set(own) - set(declared))
    if unknown:
        raise ValueError(
            f"profile {profile!r} sets {unknown} for {notebook.name}, which declares only "
            f"{sorted(declared)} in its parameters cell"
        )
    params = {k: v for k, v in (data.get("common") or {}).items() if k in declared}
    params.update(own)
    if outputs_dir is None:
        outputs_dir = Path("figures") / profile
    params.update(profile=profile, outputs_dir=str(Path(outputs_dir).resolve()), force=bool(force))
    return params, inputs


def fingerprint(
    notebook: str | os.PathLike, params: Mapping[str, Any], inputs: Sequence[str]
) -> str:
    """SHA-256 of the notebook's cell sources, the parameters, the inputs and the library."""
    h = hashlib.sha256()
    nb = nbformat.read(notebook, as_version=4)
    for cell in nb.cells:
        h.update(cell.cell_type.encode() + b"\0" + cell.source.encode() + b"\0")
    stable = {k: v for k, v in params.items() if k != "force"}
    h.update(json.dumps(stable, sort_keys=True, default=str).encode())
    files = [Path(p) for p in inputs]
    files += sorted(p for p in _LIBRARY.rglob("*") if p.suffix in (".py", ".csv"))
    for path in files:
        h.update(str(path.name).encode() + b"\0")
        h.update(path.read_bytes() if path.is_file() else b"<missing>")
    return h.hexdigest()


def _write_notebook_atomic(nb: nbformat.NotebookNode, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        nbformat.write(nb, tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _write_depfile(output: Path, inputs: Sequence[str]) -> None:
    dep = output.with_suffix(".d")
    text = "".join(f"{output}: {p}\n{p}:\n" for p in inputs)
    fd, tmp = tempfile.mkstemp(dir=output.parent, prefix=dep.name + ".", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, dep)


def run_notebook(
    notebook: str | os.PathLike,
    output: str | os.PathLike,
    *,
    profile: str = "smoke",
    profiles_dir: str | os.PathLike = "profiles",
    outputs_dir: str | os.PathLike | None = None,
    force: bool = False,
    overrides: Mapping[str, Any] | None = None,
    kernel: str = KERNEL,
    log_output: bool = False,
) -> bool:
    """Execute ``notebook`` into ``output`` with the profile's parameters.

    Parameters
    ----------
    notebook, output
        Source notebook and executed notebook paths.
    profile, profiles_dir
        Which ``<profiles_dir>/<profile>.yaml`` to read.
    outputs_dir
        Where the notebook writes figures, tables and results (default
        ``figures/<profile>``); tests pass a temporary folder.
    force
        Execute even when the fingerprint is unchanged, and tell the notebook to
        recompute its cached results.
    overrides
        Extra parameters (must be declared by the notebook).
    kernel
        Jupyter kernel name (the Makefile installs ``lance`` into the venv).
    log_output
        Stream the notebook's output to the terminal.

    Returns
    -------
    bool
        ``True`` if the notebook was executed, ``False`` if it was up to date.

    Raises
    ------
    papermill.PapermillExecutionError
        A cell failed; the partial notebook is kept as ``<output>.failed.ipynb``.
    """
    import papermill as pm
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    notebook, output = Path(notebook), Path(output)
    params, inputs = notebook_parameters(
        notebook,
        profile,
        profiles_dir=profiles_dir,
        outputs_dir=outputs_dir,
        force=force,
        overrides=overrides,
    )
    print_ = sys.stderr.write
    fp = fingerprint(notebook, params, inputs)
    output.parent.mkdir(parents=True, exist_ok=True)
    if not force and output.is_file():
        old = nbformat.read(output, as_version=4).metadata.get("lance", {})
        if old.get("fingerprint") == fp:
            os.utime(output)
            _write_depfile(output, inputs)
            print_(f"{output}: up to date (parameters, inputs and library unchanged)\n")
            return False
    try:
        KernelSpecManager().get_kernel_spec(kernel)
    except NoSuchKernel:
        raise RuntimeError(
            f"no Jupyter kernel named {kernel!r}; run `make venv` or "
            f"`{sys.executable} -m ipykernel install --sys-prefix --name {kernel}`"
        ) from None
    Path(params["outputs_dir"]).mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=output.parent, prefix=output.name + ".", suffix=".tmp.ipynb")
    os.close(fd)
    failed = output.with_name(output.stem + ".failed.ipynb")
    try:
        pm.execute_notebook(
            str(notebook),
            tmp,
            parameters=params,
            kernel_name=kernel,
            log_output=log_output,
            progress_bar=False,
            cwd=os.getcwd(),
        )
    except BaseException:
        if os.path.exists(tmp):
            os.replace(tmp, failed)
        raise
    nb = nbformat.read(tmp, as_version=4)
    os.unlink(tmp)
    nb.metadata["lance"] = {
        "fingerprint": fp,
        "profile": profile,
        "parameters": params,
        "inputs": list(inputs),
    }
    _write_notebook_atomic(nb, output)
    _write_depfile(output, inputs)
    if failed.exists():
        failed.unlink()
    print_(f"{output}: executed with profile {profile!r}\n")
    return True


def _parse_set(items: Sequence[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        out[key] = yaml.safe_load(value)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebook", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--profile", default="smoke")
    parser.add_argument("--profiles-dir", default="profiles", type=Path)
    parser.add_argument("--outputs-dir", default=None, type=Path)
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--kernel", default=KERNEL)
    parser.add_argument("--log-output", action="store_true")
    args = parser.parse_args(argv)
    run_notebook(
        args.notebook,
        args.output,
        profile=args.profile,
        profiles_dir=args.profiles_dir,
        outputs_dir=args.outputs_dir,
        force=args.force,
        overrides=_parse_set(args.set),
        kernel=args.kernel,
        log_output=args.log_output,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
