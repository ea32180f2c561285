"""Tasks for tests/orchestration/test_gpu_placement.py, in a module of their own: Dask workers import it to
run them, and it imports no torch (a worker started for the test starts faster)."""
from __future__ import annotations

import os
import time

from prefect import task

GPU_TAG = "gpu"  # usseg_core.device.GPU_TAG (that module imports torch); the test checks they agree


def _where(hold: float) -> dict:
    """The Dask worker running this task: its name, CUDA_VISIBLE_DEVICES and resources."""
    from distributed import get_worker

    worker = get_worker()
    time.sleep(hold)  # keeps the worker busy, so that other tasks go elsewhere when they may
    return {"name": worker.name, "cvd": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "resources": dict(worker.state.total_resources)}


@task(name="probe-gpu", tags=[GPU_TAG])
def gpu_probe(i: int, hold: float = 0.0) -> dict:
    return _where(hold)


@task(name="probe-cpu")
def cpu_probe(i: int, hold: float = 0.0) -> dict:
    return _where(hold)


@task(name="probe-env")
def env_probe() -> dict:
    """Every worker's name -> its CUDA_VISIBLE_DEVICES (asked from a task: the flow has no Dask client)."""
    from distributed import get_client

    return dict(get_client().run(_name_and_cvd).values())


def _name_and_cvd(dask_worker) -> tuple:
    return dask_worker.name, os.environ.get("CUDA_VISIBLE_DEVICES")
