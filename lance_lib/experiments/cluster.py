"""Where the grid's tasks run: a local Dask cluster with one GPU per worker, or any cluster.

:func:`dask_client` gives the grid (:mod:`lance_lib.experiments.grid`) a
``distributed.Client``:

* of a fresh ``distributed.LocalCluster`` of ``workers`` processes
  (:func:`local_cluster`): one thread each, ``1 / workers`` of the memory each, worker
  ``i`` seeing only GPU ``i`` (round robin) through ``CUDA_VISIBLE_DEVICES`` where GPUs
  exist and left as it is where there are none, restarted by its nanny when it dies;
* or of a running cluster at ``scheduler`` (``tcp://host:port``), whose launcher (e.g.
  ``dask-jobqueue`` on SLURM) decides each worker's GPU and retry policy.

Nothing here knows what an experiment is; the client prints its dashboard link.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

__all__ = ["dask_client", "local_cluster", "visible_gpus", "worker_environments"]


def visible_gpus() -> list[str]:
    """The GPUs this process may use: ``CUDA_VISIBLE_DEVICES`` if set, else all of torch's."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [device.strip() for device in listed.split(",") if device.strip()]
    import torch

    return [str(index) for index in range(torch.cuda.device_count())]


def worker_environments(workers: int, threads: int, gpus: Sequence[str]) -> list[dict[str, str]]:
    """Each local worker's environment: its thread count and, where GPUs exist, one GPU.

    Worker ``i`` sees GPU ``gpus[i % len(gpus)]`` alone (more workers than GPUs share
    them round robin); without GPUs ``CUDA_VISIBLE_DEVICES`` is left as it is.
    """
    out = []
    for index in range(workers):
        environment = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        if gpus:
            environment["CUDA_VISIBLE_DEVICES"] = gpus[index % len(gpus)]
        out.append(environment)
    return out


@contextmanager
def local_cluster(workers: int, *, threads: int = 1, allowed_failures: int = 3) -> Iterator[Any]:
    """A ``distributed.Client`` of a fresh ``LocalCluster`` of ``workers`` processes.

    Parameters
    ----------
    workers
        Worker processes, one task at a time each.
    threads
        ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` of each worker.
    allowed_failures
        Worker deaths a task survives before it is given up
        (``distributed.scheduler.allowed-failures``).

    Notes
    -----
    Worker processes are not daemonic, so that a ``DataLoader`` may start its own. The
    processes are spawned: a script that calls this must do so under
    ``if __name__ == "__main__":``.
    """
    import dask
    from distributed import Client, LocalCluster

    config = {
        "distributed.scheduler.allowed-failures": allowed_failures,
        "distributed.worker.daemon": False,
    }
    with dask.config.set(config):  # read by the scheduler, and by nannies on restarts
        cluster = LocalCluster(
            n_workers=0,
            threads_per_worker=1,
            processes=True,
            memory_limit=1 / workers,
            silence_logs=logging.ERROR,
        )
        template = cluster.new_spec
        environments = worker_environments(workers, threads, visible_gpus())
        for index, environment in enumerate(environments):
            options = {**template["options"], "env": environment}
            cluster.worker_spec[f"grid-{index}"] = {"cls": template["cls"], "options": options}
        cluster.scale(workers)
        with cluster, Client(cluster) as client:
            client.wait_for_workers(workers)
            yield client


@contextmanager
def dask_client(
    *,
    workers: int | None = None,
    scheduler: str | None = None,
    threads: int = 1,
    allowed_failures: int = 3,
) -> Iterator[Any]:
    """A client of a local cluster (``workers``) or of a running one (``scheduler``).

    Prints the cluster's dashboard link. See :func:`local_cluster` for the arguments.
    """
    if workers is not None:
        with local_cluster(workers, threads=threads, allowed_failures=allowed_failures) as client:
            print(f"local Dask cluster of {workers} workers; dashboard: {client.dashboard_link}")
            yield client
        return
    from distributed import Client

    with Client(scheduler) as client:
        count = len(client.scheduler_info().get("workers", {}))
        print(f"Dask cluster {scheduler} ({count} workers now); dashboard: {client.dashboard_link}")
        yield client
