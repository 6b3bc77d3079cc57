"""Execute one parameterized notebook with papermill, for ``make figures`` and the tests.

Parameters come from ``profiles/<profile>.yaml``::

    common:            # shared defaults, passed to a notebook only if it declares them
      seed: 0
    fig4_eps:          # one section per notebook (file stem); every key must be declared
      eps_values: [0.5, 0.7, 0.9]
      inputs: [bench/latest.json]   # optional: files the notebook reads (not a parameter)

Three parameters are always injected: ``profile`` (its name), ``outputs_dir``
(``figures/<profile>`` at the repository root unless given) and ``force`` (recompute
cached results).

One source of truth: the profile
--------------------------------
A notebook opened in JupyterLab gets the same values as under ``make figures``: its
parameters cell reads them from the profile it names, one line per parameter::

    from lance_lib.notebook_runner import profile_parameters

    profile = "smoke"  # profiles/<profile>.yaml supplies every value below
    params = profile_parameters("fig4_eps_gradient", profile)
    outputs_dir = params["outputs_dir"]  # build/lab/<profile>/: make figures writes figures/
    force = False  # recompute cached results
    eps_values = params["eps_values"]  # energy thresholds of Eq. (3)

The reader changes a value by editing its line, or the whole set by naming another
profile; papermill sees every line as a declared parameter and the runner injects the
profile's values after the cell (the same values, so a notebook behaves the same in
both). One value differs by design: ``outputs_dir``. Run interactively, a notebook
writes its figures and tables to the untracked ``build/lab/<profile>/``
(:func:`lance_lib.paths.lab_dir`); only the runner (``make figures``) injects the
committed ``figures/<profile>/``. Both read and write the same results cache. Every path
resolves from the repository root (:mod:`lance_lib.paths`), never from the working
directory (``notebooks/`` under JupyterLab).

The kernel
----------
The runner starts the kernel with matplotlib's inline backend (figures become
``image/png`` outputs of the executed notebook, whatever ``MPLBACKEND`` the caller has)
and with ``LANCE_PROGRESS=0`` unless the caller set it (:mod:`lance_lib.progress`: no
progress bars in executed notebooks nobody watches).

Incremental and resumable
-------------------------
The executed notebook records a fingerprint (SHA-256 of the notebook's cell sources,
its parameters, its declared input files and every file of the library).  When make
asks for a re-run because some prerequisite is newer but the fingerprint is unchanged
(e.g. another notebook's profile section was edited), the notebook is not executed
again; its output is only touched.  The output notebook is written atomically (temporary
file, then ``os.replace``), so an interrupted run leaves no half-written target and
``make`` retries it; the experiments it had finished are in result files keyed by their
settings (:mod:`lance_lib.experiments.cache`) and are not recomputed.  A failed or
interrupted run is kept as ``<output>.failed.ipynb`` for reading.  Beside the output a
make dependency file ``<output stem>.d`` lists the declared inputs.

One runner per output
---------------------
While it checks and executes a notebook the runner holds an exclusive claim
``.<output name>.claim`` beside the output (:mod:`lance_lib.experiments.claim`, the
grid's mechanism). A second runner for the same output (two ``make`` runs, Lab beside
``make figures``) waits for the first, then finds the output up to date instead of
executing it again; a claim whose runner died is broken at once on the same machine
(after 60 s without a heartbeat elsewhere), and the temporary files a killed runner left
for this output are removed. On the command line SIGTERM is handled like Ctrl-C: the
kernel is shut down, the partial notebook kept as ``<output>.failed.ipynb`` and the
claim released.

Bad parameters
--------------
A malformed profile (the file and line are named), a malformed ``--set`` value (the
``--set`` item is named), or a key the notebook does not declare (named as coming from
the profile or from ``--set``) raises :class:`ParameterError` before any kernel starts;
the command line reports it as a usage error (exit status 2).

Usage::

    python -m lance_lib.notebook_runner notebooks/fig4_eps.ipynb build/smoke/fig4_eps.ipynb \\
        --profile smoke [--outputs-dir DIR] [--force] [--set key=yaml_value ...]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import signal
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import nbformat
import yaml

from lance_lib import paths
from lance_lib.experiments.claim import read_claim, try_claim
from lance_lib.io import atomic_write, write_text_atomic
from lance_lib.progress import PROGRESS_ENV

__all__ = [
    "INJECTED",
    "KERNEL_ENV",
    "ParameterError",
    "fingerprint",
    "load_profile",
    "main",
    "notebook_parameters",
    "parse_set",
    "profile_parameters",
    "run_notebook",
]

#: Parameters the runner always passes; every notebook must declare them.
INJECTED = ("profile", "outputs_dir", "force")
KERNEL = "lance"
#: Environment of the kernels the runner starts (``PROGRESS_ENV`` only if unset).
KERNEL_ENV = {"MPLBACKEND": "module://matplotlib_inline.backend_inline", PROGRESS_ENV: "0"}
_LIBRARY = Path(__file__).resolve().parent
#: Seconds between two looks at an output claimed by another runner.
WAIT_POLL_S = 1.0


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
        ``outputs_dir`` and ``force`` (``False``): the values :func:`run_notebook`
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


def _write_depfile(output: Path, inputs: Sequence[str]) -> None:
    text = "".join(f"{output}: {p}\n{p}:\n" for p in inputs)
    write_text_atomic(output.with_suffix(".d"), text)


@contextlib.contextmanager
def _kernel_environment() -> Iterator[None]:
    """Set :data:`KERNEL_ENV` for the kernels started inside, then restore the caller's."""
    wanted = dict(KERNEL_ENV)
    if os.environ.get(PROGRESS_ENV):
        del wanted[PROGRESS_ENV]  # the caller asked for bars (or not) explicitly
    saved = {k: os.environ.get(k) for k in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_notebook(
    notebook: str | os.PathLike,
    output: str | os.PathLike,
    *,
    profile: str = "smoke",
    profiles_dir: str | os.PathLike | None = None,
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
        Which ``<profiles_dir>/<profile>.yaml`` to read (default: the repository's
        ``profiles/``).
    outputs_dir
        Where the notebook writes figures, tables and results (default
        ``figures/<profile>`` at the repository root); tests pass a temporary folder.
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
    ParameterError
        Bad parameters (see :func:`notebook_parameters`), before any kernel starts.
    papermill.PapermillExecutionError
        A cell failed; the partial notebook is kept as ``<output>.failed.ipynb``.

    Notes
    -----
    The check for an up-to-date output and the execution happen under the output's
    claim (module notes, "One runner per output"): a second call for the same output
    waits, then returns ``False`` when the first produced the same fingerprint.
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
    with _claimed(output):
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
        _remove_leftovers(output)
        tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp.ipynb")  # papermill writes it
        failed = output.with_name(output.stem + ".failed.ipynb")
        try:
            with _kernel_environment():
                pm.execute_notebook(
                    str(notebook),
                    str(tmp),
                    parameters=params,
                    kernel_name=kernel,
                    log_output=log_output,
                    progress_bar=False,
                    cwd=os.getcwd(),
                )
        except BaseException:
            if tmp.exists():
                os.replace(tmp, failed)  # a whole notebook, kept for reading
            raise
        nb = nbformat.read(tmp, as_version=4)
        tmp.unlink()
        nb.metadata["lance"] = {
            "fingerprint": fp,
            "profile": profile,
            "parameters": params,
            "inputs": list(inputs),
        }
        atomic_write(output, lambda handle: nbformat.write(nb, handle))
        _write_depfile(output, inputs)
        if failed.exists():
            failed.unlink()
    print_(f"{output}: executed with profile {profile!r}\n")
    return True


@contextlib.contextmanager
def _claimed(output: Path, poll: float = WAIT_POLL_S) -> Iterator[None]:
    """Hold the output's exclusive claim; while another live runner holds it, wait."""
    path = output.with_name(f".{output.name}.claim")
    claim = try_claim(path)
    if claim is None:
        holder = read_claim(path) or {}
        machine = str(holder.get("machine", "?")).split("|")[0]
        sys.stderr.write(
            f"{output}: another runner (process {holder.get('pid', '?')} on {machine}) is "
            "executing it; waiting for it to finish\n"
        )
        while claim is None:
            time.sleep(poll)
            claim = try_claim(path)
    with claim:
        yield


def _remove_leftovers(output: Path) -> None:
    """Delete the temporary files a killed runner left for ``output`` (under its claim)."""
    for name in (output.name, output.with_suffix(".d").name):
        for stale in output.parent.glob(f".{name}.*.tmp*"):
            stale.unlink(missing_ok=True)


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


def _terminate_like_ctrl_c(signum: int, frame: object) -> None:
    """SIGTERM handler of the command line: unwind as Ctrl-C does (cleanup runs)."""
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebook", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--profile", default="smoke")
    parser.add_argument("--profiles-dir", default=None, type=Path)
    parser.add_argument("--outputs-dir", default=None, type=Path)
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--kernel", default=KERNEL)
    parser.add_argument("--log-output", action="store_true")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate_like_ctrl_c)
    try:
        run_notebook(
            args.notebook,
            args.output,
            profile=args.profile,
            profiles_dir=args.profiles_dir,
            outputs_dir=args.outputs_dir,
            force=args.force,
            overrides=parse_set(args.set),
            kernel=args.kernel,
            log_output=args.log_output,
        )
    except (ParameterError, FileNotFoundError) as error:
        parser.error(str(error))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
