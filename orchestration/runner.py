"""The task-runner setting shared by every flow: threads, a local Dask cluster, or a Dask address.

Every flow's spec has it as its ``task_runner`` field (CLI: ``--runner`` / ``--dask-address``).
"""
from __future__ import annotations

from prefect.task_runners import TaskRunner

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
                                              "processes": True, "dashboard_address": "127.0.0.1:0",
                                              "host": "127.0.0.1",
                                              # failures on a worker stay off the terminal, as in the CLI
                                              "preload": ["orchestration.dask_worker"]})
    if spec.startswith("tcp://") or spec.startswith("tls://"):
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=spec)
    raise ConfigError(f"task runner {spec!r}: use threads[:N], dask[:N] or tcp://host:port")


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
