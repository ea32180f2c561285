"""The task-runner setting shared by every flow: threads, a local Dask cluster, or a Dask address.

Every flow's spec has it as its ``task_runner`` field (CLI: ``--runner`` / ``--dask-address``).

On a machine with GPUs a local cluster has one worker per GPU, each pinned to its own with
``CUDA_VISIBLE_DEVICES`` and offering the Dask resource ``GPU=1`` (:func:`plan_workers`). Tasks tagged
``usseg_core.device.GPU_TAG`` (extraction, view bank, head training, k-means and probe codes, evaluation
and segmentation shards) ask for that resource, so they run only on a GPU's worker; other tasks run
anywhere. An existing cluster (``tcp://``) whose workers were started with ``--resources GPU=1`` gets the
same placement (docs/architecture.md, "Orchestration").
"""
from __future__ import annotations

from dataclasses import dataclass

from prefect.task_runners import TaskRunner

from usseg_core.errors import ConfigError

PRELOAD = ["orchestration.dask_worker"]  # failures on a worker stay off the terminal, as in the CLI
DEFAULT_DASK_WORKERS = 2  # `dask` without N on a machine without GPUs


@dataclass(frozen=True)
class PlannedWorker:
    """One worker of a local cluster: its name, the GPU it is pinned to (None: a CPU worker)."""

    name: str
    gpu: str | None

    @property
    def env(self) -> dict[str, str]:
        """The worker's environment on a GPU machine: its GPU alone, or none for a CPU worker."""
        return {"CUDA_VISIBLE_DEVICES": self.gpu or ""}

    @property
    def resources(self) -> dict[str, int]:
        from usseg_core.device import GPU_RESOURCE

        return {GPU_RESOURCE: 1} if self.gpu is not None else {}


def plan_workers(n: int | None, gpus: list[str]) -> list[PlannedWorker]:
    """The workers of ``dask[:n]`` on a machine whose GPUs are ``gpus`` (``usseg_core.device.gpu_ids``).

    - no GPU: ``n`` CPU workers (default 2), as before GPUs were counted;
    - ``n`` = G (the default with GPUs): worker i pinned to GPU ``gpus[i]``;
    - ``n`` < G: the first ``n`` GPUs get a worker each, the others stay idle;
    - ``n`` > G: G pinned workers and ``n - G`` CPU workers (``CUDA_VISIBLE_DEVICES`` empty: they see no
      GPU), which run the work that needs none (oversegmentation, segment memories).
    """
    if n is not None and n < 1:
        raise ConfigError(f"task runner dask:{n}: use at least one worker")
    if not gpus:
        return [PlannedWorker(f"cpu-{i}", None) for i in range(n or DEFAULT_DASK_WORKERS)]
    n = len(gpus) if n is None else n
    pinned = [PlannedWorker(f"gpu-{g}", g) for g in gpus[:n]]
    return pinned + [PlannedWorker(f"cpu-{i}", None) for i in range(n - len(pinned))]


def dask_runner():
    """The Dask task-runner class (imported on use: Dask's import costs about a second)."""
    from orchestration.dask_runner import PlacingDaskTaskRunner

    return PlacingDaskTaskRunner


def make_task_runner(spec: str | None = None, *, max_workers: int | None = None):
    """Task runner from a setting string.

    - ``threads`` (default) or ``threads:N``: a thread pool in the flow's process;
    - ``dask:N``: a local Dask cluster of N worker processes (one thread each); with GPUs, one worker per
      GPU pinned to it (:func:`plan_workers`; ``dask`` alone: one per GPU, else 2);
    - ``tcp://host:port``: an existing Dask cluster (many machines; storage must be shared); its workers
      started with ``--resources GPU=1`` run the GPU work.
    """
    from prefect.task_runners import ThreadPoolTaskRunner

    spec = (spec or "threads").strip()
    if spec.startswith("threads"):
        n = int(spec.split(":", 1)[1]) if ":" in spec else max_workers
        return ThreadPoolTaskRunner(max_workers=n or 2)
    if spec.startswith("dask"):
        return _local_dask_runner(int(spec.split(":", 1)[1]) if ":" in spec else None)
    if spec.startswith("tcp://") or spec.startswith("tls://"):
        return dask_runner()(address=spec)
    raise ConfigError(f"task runner {spec!r}: use threads[:N], dask[:N] or tcp://host:port")


def _local_dask_runner(n: int | None):
    import torch

    from orchestration.dask_runner import pinned_cluster
    from usseg_core.device import gpu_ids

    gpus = gpu_ids()
    plan = plan_workers(n, gpus)
    if not gpus:  # a CPU machine: Dask's own local cluster, as before
        return dask_runner()(cluster_kwargs={"n_workers": len(plan), "threads_per_worker": 1, "processes": True,
                                             "dashboard_address": "127.0.0.1:0", "host": "127.0.0.1",
                                             "preload": PRELOAD})
    workers = [{"name": w.name, "env": w.env, "resources": w.resources} for w in plan]
    runner = dask_runner()(cluster_class=pinned_cluster, cluster_kwargs={"workers": workers, "preload": PRELOAD})
    pinned = [w.gpu for w in plan if w.gpu is not None]
    runner.logger.info("local Dask cluster: %d worker(s) pinned to GPU %s%s%s", len(pinned), ", ".join(pinned),
                       f", {len(plan) - len(pinned)} CPU worker(s)" if len(plan) > len(pinned) else "",
                       f"; GPU {', '.join(gpus[len(pinned):])} unused" if len(gpus) > len(pinned) else "")
    if not torch.cuda.is_available():
        runner.logger.warning("$USSEG_GPUS names %d GPU(s) but torch sees no CUDA device here: the workers are "
                              "pinned and offer the GPU resource, and their work runs on the CPU", len(gpus))
    return runner


class SettingTaskRunner(TaskRunner):
    """The task runner named by the running flow's spec (its ``task_runner`` field; see
    :func:`make_task_runner`).

    Deployments cannot pass a task-runner object, only parameters; a flow decorated with
    ``@flow(task_runner=SettingTaskRunner())`` and taking a ``spec`` therefore fans out as its spec says,
    whether it is called from Python, the CLI or a deployment run. The real runner is built and started at
    the first submission (the parameters are known by then) and stopped with the flow run.
    """

    def __init__(self, parameter: str = "spec", default: str = "threads") -> None:
        super().__init__()
        self.parameter = parameter
        self.default = default
        self._delegate: TaskRunner | None = None

    def duplicate(self) -> "SettingTaskRunner":
        return type(self)(self.parameter, self.default)

    def _runner(self) -> TaskRunner:
        if self._delegate is None:
            from prefect.context import FlowRunContext

            ctx = FlowRunContext.get()
            spec = (ctx.parameters or {}).get(self.parameter) if ctx is not None else None
            if isinstance(spec, str):  # a flow whose parameter is the setting itself
                setting = spec
            else:
                setting = spec.get("task_runner") if isinstance(spec, dict) else getattr(spec, "task_runner", None)
            self._delegate = make_task_runner(setting or self.default).__enter__()
        return self._delegate

    def submit(self, task, parameters, wait_for=None, dependencies=None):  # noqa: D102 - TaskRunner API
        return self._runner().submit(task, parameters, wait_for, dependencies)

    def map(self, task, parameters, wait_for=None):  # noqa: D102 - TaskRunner API
        return self._runner().map(task, parameters, wait_for)

    def cancel_all(self) -> None:
        if self._delegate is not None and hasattr(self._delegate, "cancel_all"):
            self._delegate.cancel_all()

    def __exit__(self, exc_type, exc_value, traceback) -> None:
        delegate, self._delegate = self._delegate, None
        try:
            if delegate is not None:
                delegate.__exit__(exc_type, exc_value, traceback)
        finally:
            super().__exit__(exc_type, exc_value, traceback)
