"""Execute one parameterized notebook with papermill, for ``make figures`` and the tests.

The parameters come from ``profiles/<profile>.yaml`` as :mod:`lance_lib.profiles`
reads them (:func:`~lance_lib.profiles.notebook_parameters`); a bad profile, ``--set``
value or undeclared key raises :class:`~lance_lib.profiles.ParameterError` before any
kernel starts, and the command line reports it as a usage error (exit status 2).

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
``.<output name>.claim`` beside the output (:mod:`lance_lib.experiments.locks`, the
grid's mechanism). A second runner for the same output (two ``make`` runs, Lab beside
``make figures``) waits for the first, then finds the output up to date instead of
executing it again; a claim whose runner died is broken at once on the same machine
(after 60 s without a heartbeat elsewhere), and the temporary files a killed runner left
for this output are removed. On the command line SIGTERM is handled like Ctrl-C: the
kernel is shut down, the partial notebook kept as ``<output>.failed.ipynb`` and the
claim released.

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

from lance_lib.experiments.locks import read_claim, try_claim
from lance_lib.io import atomic_write, write_text_atomic
from lance_lib.profiles import ParameterError, notebook_parameters, parse_set
from lance_lib.progress import PROGRESS_ENV

__all__ = [
    "KERNEL_ENV",
    "fingerprint",
    "main",
    "run_notebook",
]

KERNEL = "lance"
#: Environment of the kernels the runner starts (``PROGRESS_ENV`` only if unset).
KERNEL_ENV = {"MPLBACKEND": "module://matplotlib_inline.backend_inline", PROGRESS_ENV: "0"}
_LIBRARY = Path(__file__).resolve().parent
#: Seconds between two looks at an output claimed by another runner.
WAIT_POLL_S = 1.0


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
