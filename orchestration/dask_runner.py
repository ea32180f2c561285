"""The Dask side of the task-runner setting (``orchestration.runner``): the local cluster of workers pinned
one per GPU, and Prefect's Dask runner placing GPU-tagged tasks on the workers that offer a GPU."""
from __future__ import annotations

import logging

import dask
from distributed import Nanny, Scheduler, SpecCluster
from prefect_dask import DaskTaskRunner

from usseg_core.device import GPU_RESOURCE, GPU_TAG


def pinned_cluster(workers: list[dict], preload: list[str]):
    """A local Dask cluster of the planned ``workers`` (``name``, ``env``, ``resources`` each): one
    single-threaded process per worker, bound to 127.0.0.1, memory split evenly as ``LocalCluster`` does."""
    options = {"nthreads": 1, "host": "127.0.0.1", "preload": list(preload),
               "memory_limit": 1 / len(workers), "silence_logs": logging.WARNING}
    specs = {w["name"]: {"cls": Nanny, "options": {**options, "env": dict(w["env"]),
                                                    "resources": dict(w["resources"])}}
             for w in workers}
    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"}}
    return SpecCluster(workers=specs, scheduler=scheduler, silence_logs=logging.WARNING, name="usseg")


class PlacingDaskTaskRunner(DaskTaskRunner):
    """Prefect's Dask runner that sends GPU-tagged tasks to the workers offering the GPU resource.

    Whether any worker offers it is asked of the scheduler at the first GPU-tagged submission (a
    cluster without one runs GPU work anywhere, as before: nothing would ever run it otherwise)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._gpu_workers: bool | None = None

    def submit(self, task, parameters, wait_for=None, dependencies=None):  # noqa: D102 - TaskRunner API
        if GPU_TAG in (task.tags or ()) and self.offers_gpus():
            with dask.annotate(resources={GPU_RESOURCE: 1}):
                return super().submit(task, parameters, wait_for, dependencies)
        return super().submit(task, parameters, wait_for, dependencies)

    def offers_gpus(self) -> bool:
        """True when a worker of the cluster offers the GPU resource (asked once it has workers)."""
        if self._gpu_workers is None:
            workers = self.client.scheduler_info(n_workers=-1).get("workers", {})
            if not workers:
                return False  # none connected yet: ask again at the next GPU task
            self._gpu_workers = any(w.get("resources", {}).get(GPU_RESOURCE, 0) >= 1 for w in workers.values())
            if not self._gpu_workers:
                self.logger.info("no worker of the Dask cluster offers the %s resource: GPU work runs on "
                                 "any worker", GPU_RESOURCE)
        return self._gpu_workers
