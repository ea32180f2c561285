"""The task-runner setting shared by every flow: threads, a local Dask cluster, or a Dask address."""
from __future__ import annotations

from usseg_core.errors import ConfigError


def make_task_runner(spec: str | None = None, *, max_workers: int | None = None):
    """Task runner from a setting string.

    - ``threads`` (default) or ``threads:N``: a thread pool in the flow's process;
    - ``dask:N``: a local Dask cluster of N worker processes (one thread each);
    - ``tcp://host:port``: an existing Dask cluster (many machines; storage must be shared).
    """
    from prefect.task_runners import ThreadPoolTaskRunner

    spec = (spec or "threads").strip()
    if spec.startswith("threads"):
        n = int(spec.split(":", 1)[1]) if ":" in spec else max_workers
        return ThreadPoolTaskRunner(max_workers=n or 2)
    if spec.startswith("dask"):
        from prefect_dask import DaskTaskRunner

        n = int(spec.split(":", 1)[1]) if ":" in spec else 2
        return DaskTaskRunner(cluster_kwargs={"n_workers": n, "threads_per_worker": 1,
                                              "processes": True, "dashboard_address": None,
                                              "host": "127.0.0.1"})
    if spec.startswith("tcp://") or spec.startswith("tls://"):
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=spec)
    raise ConfigError(f"task runner {spec!r}: use threads[:N], dask[:N] or tcp://host:port")
