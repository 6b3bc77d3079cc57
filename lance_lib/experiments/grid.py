"""The grid: compute every experiment of a profile, in-process or on a Dask cluster.

``make grid PROFILE=p`` runs ``python -m lance_lib.experiments.grid --profile p``: the
experiment configs every notebook of the profile declares
(:func:`lance_lib.experiments.sweeps.profile_experiments`) are collected once each,
those whose record the results cache already holds are skipped, and the rest are run
with :func:`lance_lib.experiments.base.run_experiment`, each by one process that writes
its own record atomically into the one results folder. The notebooks then find every
record in the cache and only plot.

Where the experiments run:

* in this process (the default), one after the other;
* on a ``distributed.LocalCluster`` (``--workers N``): ``N`` worker processes of one
  thread each, each seeing one GPU through ``CUDA_VISIBLE_DEVICES`` where GPUs exist
  (round robin over the visible ones), none hidden where there are none
  (:mod:`lance_lib.experiments.cluster`);
* on any running Dask cluster (``--scheduler tcp://host:port``), e.g. one started on
  SLURM with ``dask-jobqueue``; its workers need this repository (a shared file system)
  and see the client's results folder, which every task is given explicitly
  (:func:`project_environment`).

Guarantees:

* **Never recomputed.** A config is skipped before submission when the cache answers it
  (:func:`find_record` asks :func:`lance_lib.experiments.cache.load_record`); every task
  asks again before and after taking its claim.
* **One computation per record.** A task holds an exclusive claim
  (:mod:`lance_lib.experiments.locks`) while it computes, so a task that Dask hands to
  a second worker because the first was presumed dead, or the same experiment asked
  for by a second grid, waits for the first and then reads its record.
* **A killed worker loses only its task.** The nanny restarts the worker, the
  scheduler retries its task (up to ``allowed_failures`` deaths per task on a
  ``LocalCluster``); the retry breaks the dead process's claim at once. Records are
  written atomically (:func:`lance_lib.io.atomic_write`), so none is ever half-written.
* **Deterministic.** Every task runs with ``torch.set_num_threads(threads)`` (default
  1, in-process as on every worker), so a record does not depend on how the grid was
  run; seeds come from the config.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from lance_lib.experiments.base import ExperimentConfig, experiment_kinds, run_experiment
from lance_lib.experiments.cache import load_record
from lance_lib.experiments.cluster import dask_client
from lance_lib.experiments.locks import try_claim
from lance_lib.experiments.sweeps import profile_experiments, sweeps
from lance_lib.io import ensure_writable
from lance_lib.paths import results_dir
from lance_lib.progress import PROGRESS_ENV, progress_bar
from lance_lib.validation import check_int, check_real

__all__ = [
    "GridReport",
    "GridSettings",
    "PlannedExperiment",
    "compute",
    "find_record",
    "listing",
    "main",
    "plan",
    "profile_plan",
    "project_environment",
    "run_grid",
]


@dataclass(frozen=True)
class GridSettings:
    """Where and how the grid runs its experiments.

    Attributes
    ----------
    workers
        Worker processes of a ``distributed.LocalCluster``; ``None`` runs in-process.
    scheduler
        Address of a running Dask scheduler (``tcp://host:port``); excludes ``workers``.
    threads
        ``torch.set_num_threads`` of every experiment, in-process and on workers.
    allowed_failures
        Worker deaths a task survives on a ``LocalCluster`` before it is given up (a
        running cluster keeps its own ``distributed.scheduler.allowed-failures``).
    poll
        Seconds between two looks at a claim held by another process.
    progress
        Show a tqdm bar over completed experiments; ``None``: when someone watches
        (:func:`lance_lib.progress.progress_enabled`).
    """

    workers: int | None = None
    scheduler: str | None = None
    threads: int = 1
    allowed_failures: int = 3
    poll: float = 1.0
    progress: bool | None = None

    def __post_init__(self) -> None:
        check_int("workers", self.workers, minimum=1, allow_none=True)
        check_int("threads", self.threads, minimum=1)
        check_int("allowed_failures", self.allowed_failures, minimum=0)
        check_real("poll", self.poll, low=0.0, low_open=True)
        if self.scheduler is not None:
            if not isinstance(self.scheduler, str) or "://" not in self.scheduler:
                raise ValueError(
                    f"scheduler must be a Dask scheduler address such as "
                    f"'tcp://host:8786', got {self.scheduler!r}"
                )
            if self.workers is not None:
                raise ValueError(
                    f"give either workers (a local cluster, got {self.workers}) or "
                    f"scheduler (a running cluster, got {self.scheduler!r}), not both"
                )


@dataclass(frozen=True)
class PlannedExperiment:
    """One experiment of the grid: its config, who needs it, and its stored record.

    Attributes
    ----------
    config
        The experiment.
    notebooks
        The notebooks that declared it (one experiment serves several).
    record
        The stored record that answers it, or ``None``: still to compute.
    """

    config: ExperimentConfig
    notebooks: tuple[str, ...]
    record: Path | None

    @property
    def key(self) -> str:
        """The task's name: ``<kind>-<settings key>``."""
        return f"{self.config.kind}-{self.config.key()}"


@dataclass(frozen=True)
class GridReport:
    """What a run of the grid did.

    Attributes
    ----------
    stored
        Keys of the experiments already in the cache (not submitted).
    computed
        Record paths of the experiments computed now.
    failed
        ``(key, error)`` of the experiments that raised or outlived their retries.
    """

    stored: tuple[str, ...]
    computed: tuple[str, ...]
    failed: tuple[tuple[str, str], ...]


def find_record(config: ExperimentConfig) -> Path | None:
    """The stored record that answers ``config``, if the results cache holds one.

    The cache decides (:func:`lance_lib.experiments.cache.load_record`: stored settings
    equal to the request's, which carry the record format, and every required field),
    asked with what the config's runner gives
    :func:`~lance_lib.experiments.cache.cached_record`:

    * a config class whose runner stores its record elsewhere, or with settings beyond
      :meth:`~lance_lib.experiments.base.ExperimentConfig.settings` (e.g. the reference
      weights' SHA-256), says so with a method ``record_request() -> (path, settings,
      required)``;
    * otherwise the runner stores it under ``results_dir(config.kind)`` as
      ``<name>-<config.key()>.json`` (:func:`~lance_lib.experiments.cache.record_path`
      of ``config.settings()``), with the fields the class lists in ``record_fields``
      (where it lists them) required.
    """
    request = getattr(config, "record_request", None)
    if callable(request):
        path, settings, required = request()
        candidates = [Path(path)]
    else:
        settings = config.settings()
        required = getattr(type(config), "record_fields", ())
        candidates = sorted(results_dir(config.kind).glob(f"*-{config.key()}.json"))
    for path in candidates:
        if load_record(path, settings, required) is not None:
            return path
    return None


def plan(experiments: Mapping[str, Sequence[ExperimentConfig]]) -> list[PlannedExperiment]:
    """Each distinct config of ``{notebook: [configs]}`` once, with its stored record."""
    needed: dict[str, tuple[ExperimentConfig, list[str]]] = {}
    for notebook, configs in experiments.items():
        for config in configs:
            key = f"{config.kind}-{config.key()}"
            needed.setdefault(key, (config, []))[1].append(notebook)
    return [
        PlannedExperiment(config, tuple(dict.fromkeys(notebooks)), find_record(config))
        for config, notebooks in needed.values()
    ]


def profile_plan(profile: str, only: Sequence[str] = ()) -> list[PlannedExperiment]:
    """The plan of every notebook of ``profile`` (or of the notebooks in ``only``)."""
    experiments = profile_experiments(profile)
    unknown = sorted(set(only) - set(experiments))
    if unknown:
        raise ValueError(
            f"only names notebooks {unknown} that declare no sweep under profile "
            f"{profile!r}; notebooks with sweeps: {sorted(experiments)}"
        )
    return plan({k: v for k, v in experiments.items() if not only or k in only})


def project_environment() -> dict[str, str]:
    """The client's project folders for a task: every ``LANCE_*`` variable, resolved results.

    ``LANCE_RESULTS`` is always given (the client's resolved results folder), so that a
    worker started elsewhere writes where the client and the notebooks read.
    """
    environment = {k: v for k, v in os.environ.items() if k.startswith("LANCE_")}
    environment["LANCE_RESULTS"] = str(results_dir())
    return environment


@contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def compute(
    config: ExperimentConfig,
    *,
    environment: Mapping[str, str] | None = None,
    threads: int = 1,
    poll: float = 1.0,
) -> str | None:
    """One task of the grid: compute ``config``'s record unless it is stored; its path.

    Runs in the process that writes the record (a worker, or the client in-process)
    with ``threads`` torch threads. A worker first takes on ``environment`` for good
    (:func:`project_environment` of the client: the same results folder); in-process
    it is ``None``. While the task computes it holds the claim
    ``results_dir(kind)/.<kind>-<key>.claim``; a claim held by a live process is waited
    for (looking every ``poll`` seconds), then the record is read instead of computed.
    """
    if environment:  # a worker of the grid takes on the client's project folders
        os.environ.update(environment)
    with _torch_threads(threads):
        if type(config) not in experiment_kinds().values():
            sweeps()  # a fresh worker: import the modules that register the runners
        folder = ensure_writable(results_dir(config.kind), "results folder")
        claim_file = folder / f".{config.kind}-{config.key()}.claim"
        while True:
            stored = find_record(config)
            if stored is not None:
                return str(stored)
            claim = try_claim(claim_file)
            if claim is not None:
                with claim:
                    stored = find_record(config)
                    if stored is not None:
                        return str(stored)
                    return run_experiment(config).get("path")
            time.sleep(poll)


def _run_in_process(
    planned: Sequence[PlannedExperiment], settings: GridSettings, bar: tqdm
) -> tuple[list[str], list[tuple[str, str]]]:
    computed, failed = [], []
    for item in planned:
        try:
            path = compute(item.config, threads=settings.threads, poll=settings.poll)
        except Exception as error:  # reported with the others; the grid goes on
            failed.append((item.key, f"{type(error).__name__}: {error}"))
            bar.write(f"FAILED {item.key}: {failed[-1][1]}")
        else:
            computed.append(str(path))
        bar.update()
    return computed, failed


def _run_on_cluster(
    client: Any, planned: Sequence[PlannedExperiment], settings: GridSettings, bar: tqdm
) -> tuple[list[str], list[tuple[str, str]]]:
    from distributed import as_completed

    futures = client.map(
        compute,
        [item.config for item in planned],
        key=[item.key for item in planned],
        environment={**project_environment(), PROGRESS_ENV: "0"},  # nobody watches a worker
        threads=settings.threads,
        poll=settings.poll,
    )
    computed, failed = [], []
    for future in as_completed(futures):
        if future.status == "finished":
            computed.append(str(future.result()))
        else:
            error = future.exception()
            failed.append((future.key, f"{type(error).__name__}: {error}"))
            bar.write(f"FAILED {future.key}: {failed[-1][1]}")
        bar.update()
    return computed, failed


def run_grid(
    planned: Sequence[PlannedExperiment], settings: GridSettings | None = None
) -> GridReport:
    """Compute every experiment of ``planned`` that has no stored record.

    Parameters
    ----------
    planned
        From :func:`plan` or :func:`profile_plan`.
    settings
        Where and how (default: in-process, one thread).

    Returns
    -------
    GridReport
        What was skipped, computed and failed (failures do not stop the others).

    Notes
    -----
    A local cluster's worker processes are spawned: a script that calls this with
    ``workers`` must do so under ``if __name__ == "__main__":``.
    """
    settings = settings or GridSettings()
    todo = [item for item in planned if item.record is None]
    stored = tuple(item.key for item in planned if item.record is not None)
    print(f"{len(planned)} experiments: {len(stored)} stored, {len(todo)} to compute")
    if not todo:
        return GridReport(stored, (), ())
    bar = progress_bar(
        progress=settings.progress, total=len(todo), desc="grid", unit="experiment", leave=True
    )
    with bar:
        if settings.workers is None and settings.scheduler is None:
            computed, failed = _run_in_process(todo, settings, bar)
        else:
            with dask_client(
                workers=settings.workers,
                scheduler=settings.scheduler,
                threads=settings.threads,
                allowed_failures=settings.allowed_failures,
            ) as client:
                computed, failed = _run_on_cluster(client, todo, settings, bar)
    return GridReport(stored, tuple(computed), tuple(failed))


def _changed_fields(config: ExperimentConfig) -> str:
    """``field=value`` for every field of ``config`` that differs from its default."""
    out = []
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        default = field.default
        if field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        if default is dataclasses.MISSING or value != default:
            out.append(f"{field.name}={value!r}")
    return " ".join(out)


def listing(planned: Sequence[PlannedExperiment]) -> str:
    """One line per experiment: status, task key, the notebooks needing it, its settings."""
    lines = []
    for item in planned:
        status = "stored    " if item.record is not None else "to compute"
        notebooks = ",".join(item.notebooks)
        lines.append(f"{status}  {item.key}  [{notebooks}]  {_changed_fields(item.config)}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lance_lib.experiments.grid",
        description="Compute every experiment a profile's notebooks need (in-process or "
        "on Dask), so that the notebooks only plot.",
    )
    parser.add_argument("--profile", default="smoke", help="profile name (default: smoke)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--workers", type=int, help="run on a LocalCluster of N processes")
    where.add_argument("--scheduler", help="run on a running cluster (tcp://host:port)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per task")
    parser.add_argument(
        "--only", nargs="+", default=(), metavar="NOTEBOOK", help="only these notebooks"
    )
    parser.add_argument("--dry-run", action="store_true", help="list the experiments only")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (1 when an experiment failed)."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        settings = GridSettings(
            workers=args.workers, scheduler=args.scheduler, threads=args.threads
        )
        planned = profile_plan(args.profile, only=tuple(args.only))
    except (TypeError, ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    if args.dry_run:
        todo = sum(item.record is None for item in planned)
        print(f"profile {args.profile}: {len(planned)} experiments, {todo} to compute")
        print(listing(planned))
        return 0
    report = run_grid(planned, settings)
    print(f"computed {len(report.computed)}, failed {len(report.failed)}")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
