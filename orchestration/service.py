"""``usseg up`` / ``down`` / ``status``: a local Prefect server, the ``usseg`` process work pool, every
deployment of ``deployments/prefect.yaml``, and one worker.

State lives in a folder (``$USSEG_STATE``, default ``<storage>/_service/``): ``service.json`` (API url,
pids, storage and data roots), ``server.log``, ``worker.log``, ``deploy.log``, the Prefect home (its SQLite
database) and the exact ``prefect.yaml`` that was deployed. Server and worker bind 127.0.0.1 and run with
telemetry off. Every process is started in its own session, so stopping it stops its children (a worker's
flow-run processes) too; a process is only signalled after checking that its pid still runs the command
that was started. While it is healthy, the CLI's own flow runs on this storage go to its API too
(``commands/launch.py``, through :func:`service_api` and :func:`using_api`).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from orchestration.settings import storage_root
from usseg_core.config import DATA_ROOT_ENV, STORAGE_ENV
from usseg_core.errors import ConfigError, UssegError
from usseg_core.store import atomic_write_json, now_iso

STATE_ENV = "USSEG_STATE"
REPO = Path(__file__).resolve().parents[1]
PREFECT_FILE = REPO / "deployments" / "prefect.yaml"
POOL = "usseg"
DEFAULT_PORT = 4200
TELEMETRY_OFF = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}


class ServiceError(UssegError):
    """The service could not be started or stopped (the message says which log to read)."""


def state_dir(storage: str | os.PathLike | None = None) -> Path:
    """``$USSEG_STATE``, else ``<storage root>/_service``."""
    explicit = os.environ.get(STATE_ENV)
    return Path(explicit).expanduser().resolve() if explicit else storage_root(storage) / "_service"


def read_state(folder: Path) -> dict[str, Any]:
    path = folder / "service.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _write_state(folder: Path, state: dict[str, Any]) -> None:
    atomic_write_json(folder / "service.json", state)


# --- processes ---------------------------------------------------------------------------------------

def alive(pid: int | None, marker: str = "prefect") -> bool:
    """Whether ``pid`` runs and its command line contains ``marker`` (a zombie counts as dead)."""
    if not pid:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    if stat.rsplit(")", 1)[1].split()[0] == "Z":
        try:  # reap it if it is our child (tests start the service in-process)
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        return False
    return marker in cmdline


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (Prefect starts flow runs and their engines in new sessions, so a
    process group does not cover them)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    return tree


def kill_tree(pid: int, sig: int, tree: list[int] | None = None) -> None:
    """Send ``sig`` to ``pid``, its process group and every descendant."""
    for p in tree if tree is not None else process_tree(pid):
        for kill in (os.killpg, os.kill):
            try:
                kill(p, sig)
            except (ProcessLookupError, PermissionError):
                pass


def stop_process(pid: int | None, marker: str, timeout: float = 30.0) -> bool:
    """SIGTERM ``pid`` and its descendants (ours: started with its own session), SIGKILL what is left
    after ``timeout``; returns whether something was stopped."""
    if not alive(pid, marker):
        return False
    tree = process_tree(pid)
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
        kill_tree(pid, sig, tree)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not any(alive(p, "") for p in tree):
                return True
            time.sleep(0.2)
    return not alive(pid, marker)


def _spawn(cmd: list[str], env: dict[str, str], log: Path) -> int:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    return proc.pid


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(api_url: str | None, timeout: float = 2.0) -> bool:
    if not api_url:
        return False
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=timeout) as resp:
            return resp.status == 200
    except OSError:
        return False


def service_api(storage: str | os.PathLike | None = None, timeout: float = 1.0) -> str | None:
    """The API url of a healthy service for ``storage`` (see :func:`state_dir`), or None."""
    url = read_state(state_dir(storage)).get("api_url")
    return url if healthy(url, timeout=timeout) else None


@contextmanager
def using_api(api_url: str) -> Iterator[None]:
    """Within the block, this process's Prefect calls (flow runs, their logs and events, clients) go to
    ``api_url``, and so do the processes it starts (Dask workers).

    Prefect read its settings when it was imported: setting ``PREFECT_API_URL`` in ``os.environ`` now would
    reach only child processes, and this process would start a temporary server of its own. So both: the
    settings context for this process, the environment for its children."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    before = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = api_url
    try:
        with temporary_settings(updates={PREFECT_API_URL: api_url}):
            yield
    finally:
        if before is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = before


def service_env(state: dict[str, Any]) -> dict[str, str]:
    """Environment of the server, the deploy step, the worker and (through the worker) every flow run."""
    env = dict(os.environ)
    env.update(TELEMETRY_OFF)
    env.update({
        "PREFECT_HOME": state["prefect_home"],
        "PREFECT_API_URL": state["api_url"],
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(state["port"]),
        "PREFECT_WORKER_QUERY_SECONDS": str(state.get("poll_s", 5)),
        "PREFECT_SERVER_EPHEMERAL_ENABLED": "false",
        STORAGE_ENV: state["storage"],
        # Flow code is imported by module path: the checkout must be importable by every flow run.
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
    })
    if state.get("data_root"):
        env[DATA_ROOT_ENV] = state["data_root"]
    return env


# --- the pieces of `up` ------------------------------------------------------------------------------

def start_server(folder: Path, state: dict[str, Any], timeout: float = 180.0) -> None:
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
           str(state["port"])]
    state["server_pid"] = _spawn(cmd, service_env(state), folder / "server.log")
    _write_state(folder, state)
    deadline = time.monotonic() + timeout
    while not healthy(state["api_url"]):
        if not alive(state["server_pid"], "server") or time.monotonic() > deadline:
            stop_process(state["server_pid"], "server")
            raise ServiceError(f"the Prefect server did not start on port {state['port']}; see "
                               f"{folder / 'server.log'}")
        time.sleep(0.5)


# With the pinned fastapi/pydantic the server rejects the explicit nulls the client sends for an unset
# limit/sort (HTTP 422): every list call here passes them (see also deployments/deploy.py).
def _run_list_args() -> dict[str, Any]:
    from prefect.client.schemas.sorting import FlowRunSort

    return {"limit": 200, "sort": FlowRunSort.EXPECTED_START_TIME_DESC}


def _deployment_list_args() -> dict[str, Any]:
    from prefect.client.schemas.sorting import DeploymentSort

    return {"limit": 200, "sort": DeploymentSort.NAME_ASC}


def _client(state: dict[str, Any]):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    class _Client:
        def __enter__(self):
            self._settings = temporary_settings({PREFECT_API_URL: state["api_url"]})
            self._settings.__enter__()
            self._client = get_client(sync_client=True)
            return self._client.__enter__()

        def __exit__(self, *exc):
            try:
                self._client.__exit__(*exc)
            finally:
                self._settings.__exit__(*exc)

    return _Client()


def ensure_pool(state: dict[str, Any]) -> None:
    """The process work pool; its concurrency limit keeps runs on one storage from racing (artifacts
    have no cross-process lock: two runs computing the same key at once would both write it)."""
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with _client(state) as client:
        try:
            client.read_work_pool(state["pool"])
            client.update_work_pool(state["pool"], WorkPoolUpdate(concurrency_limit=state["concurrency"]))
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(
                name=state["pool"], type="process", concurrency_limit=state["concurrency"],
                base_job_template=ProcessWorker.get_default_base_job_template()))


def deployable_file(source: Path, folder: Path, *, schedules: bool, pool: str) -> Path:
    """A copy of ``source`` for `prefect deploy`: work pool name filled in, schedules inactive if asked."""
    spec = yaml.safe_load(source.read_text())
    for dep in spec.get("deployments", []):
        dep.setdefault("work_pool", {})["name"] = pool
        for sched in dep.get("schedules") or []:
            if not schedules:
                sched["active"] = False
    spec.pop("definitions", None)
    target = folder / "prefect.yaml"
    target.write_text(f"# generated by `usseg up` from {source}\n" + yaml.safe_dump(spec, sort_keys=False))
    return target


def deploy(folder: Path, state: dict[str, Any], prefect_file: Path, schedules: bool = True,
           timeout: float = 600.0) -> None:
    """`prefect deploy --all` of every deployment in ``prefect_file`` (run from the repository root,
    through deployments/deploy.py)."""
    path = deployable_file(Path(prefect_file), folder, schedules=schedules, pool=state["pool"])
    cmd = [sys.executable, str(REPO / "deployments" / "deploy.py"), "--all", "--prefect-file", str(path)]
    with open(folder / "deploy.log", "ab") as log:
        done = subprocess.run(cmd, cwd=REPO, env=service_env(state), stdout=log, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, timeout=timeout)
    if done.returncode != 0:
        raise ServiceError(f"`prefect deploy` failed (exit {done.returncode}); see {folder / 'deploy.log'}")
    state["deployed"] = {"file": str(prefect_file), "at": now_iso(), "schedules": schedules}


def active_runs(state: dict[str, Any]) -> list[tuple[str, int | None]]:
    """(flow run id, local pid or None) of the pool's Running/Pending runs.

    The process worker records a bare pid (``"1234"``; ``"host:1234"`` is accepted too) and starts each
    flow run in its own session, so the pid is also a process-group id.
    """
    from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType,
                                                WorkPoolFilter, WorkPoolFilterName)
    from prefect.client.schemas.objects import StateType

    host = socket.gethostname()
    with _client(state) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(
                any_=[StateType.RUNNING, StateType.PENDING]))),
            work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[state["pool"]])),
            **_run_list_args())
    out = []
    for run in runs:
        pid_host, _, pid = (run.infrastructure_pid or "").rpartition(":")
        local = pid_host in ("", host) and pid.isdigit()
        out.append((str(run.id), int(pid) if local else None))
    return out


def _crash(state: dict[str, Any], run_id: str, message: str) -> None:
    from prefect.states import Crashed

    with _client(state) as client:
        client.set_flow_run_state(run_id, Crashed(message=message), force=True)


def reap_orphans(state: dict[str, Any]) -> list[str]:
    """Mark Running/Pending runs of the pool whose process on this host is gone as Crashed.

    A killed worker (or machine) cannot report; without this its runs stay Running and hold the pool's
    concurrency slot. Their finished work is kept in storage: a re-run resumes it.
    """
    reaped = []
    for run_id, pid in active_runs(state):
        if pid is not None and not alive(pid, ""):
            _crash(state, run_id, "its process is gone (worker or machine killed)")
            reaped.append(run_id)
    return reaped


def stop_runs(state: dict[str, Any], timeout: float = 30.0) -> list[str]:
    """Stop the flow-run processes of the pool on this host and mark their runs Crashed."""
    stopped = []
    for run_id, pid in active_runs(state):
        if pid is not None and stop_process(pid, "prefect", timeout):
            _crash(state, run_id, "stopped by `usseg down`")
            stopped.append(run_id)
    return stopped


def start_worker(folder: Path, state: dict[str, Any]) -> None:
    state["reaped"] = reap_orphans(state)
    cmd = [sys.executable, "-m", "prefect", "worker", "start", "--pool", state["pool"], "--type", "process",
           "--name", f"usseg-{socket.gethostname()}"]
    state["worker_pid"] = _spawn(cmd, service_env(state), folder / "worker.log")
    _write_state(folder, state)
    time.sleep(1.0)
    if not alive(state["worker_pid"], "worker"):
        raise ServiceError(f"the worker exited at once; see {folder / 'worker.log'}")


# --- up / down / status ------------------------------------------------------------------------------

def up(storage: str | os.PathLike | None = None, data_root: str | os.PathLike | None = None,
       port: int | None = None, prefect_file: str | os.PathLike = PREFECT_FILE, pool: str = POOL,
       schedules: bool = True, concurrency: int = 1, poll_s: int = 5) -> dict[str, Any]:
    """Start (or complete) the service; idempotent: a running server is kept, a dead worker restarted.

    Returns the state (``api_url``, ``ui_url``, pids, ``storage``, ``data_root``, ...).
    """
    storage = str(storage_root(storage))
    folder = state_dir(storage)
    folder.mkdir(parents=True, exist_ok=True)
    state = read_state(folder)
    started_here = not (state and alive(state.get("server_pid"), "server") and healthy(state.get("api_url")))
    if not started_here and port and port != state["port"]:
        raise ConfigError(f"a usseg server already runs at {state['api_url']}; `usseg down` first")
    if started_here:
        port = DEFAULT_PORT if port is None else port
        if port == 0:
            port = free_port()
        elif not port_free(port):
            raise ConfigError(f"port {port} is in use; pass --port N (or --port 0 for any free port)")
        data = data_root if data_root is not None else os.environ.get(DATA_ROOT_ENV)
        state = {"api_url": f"http://127.0.0.1:{port}/api", "ui_url": f"http://127.0.0.1:{port}",
                 "port": port, "pool": pool, "concurrency": concurrency, "poll_s": poll_s,
                 "storage": storage, "data_root": str(Path(data).expanduser().resolve()) if data else None,
                 "prefect_home": str(folder / "prefect-home"), "started": now_iso(), "state_dir": str(folder)}
        start_server(folder, state)
    try:
        if started_here:
            ensure_pool(state)
            deploy(folder, state, Path(prefect_file), schedules=schedules)
        if not alive(state.get("worker_pid"), "worker"):
            start_worker(folder, state)
    except BaseException:
        if started_here:  # leave nothing half-started behind
            stop_process(state.get("worker_pid"), "worker")
            stop_process(state["server_pid"], "server")
        raise
    _write_state(folder, state)
    return state


def port_free(port: int) -> bool:
    """Whether ``port`` on 127.0.0.1 can be bound now."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def down(storage: str | os.PathLike | None = None, timeout: float = 30.0) -> list[str]:
    """Stop the flow runs, the worker, then the server; returns what was stopped."""
    folder = state_dir(storage)
    state = read_state(folder)
    stopped = []
    if alive(state.get("server_pid"), "server") and healthy(state.get("api_url")):
        stopped += [f"flow run {run_id}" for run_id in stop_runs(state, timeout)]
    if stop_process(state.get("worker_pid"), "worker", timeout):
        stopped.append(f"worker (pid {state['worker_pid']})")
    if stop_process(state.get("server_pid"), "server", timeout):
        stopped.append(f"server (pid {state['server_pid']})")
    if state:
        state.update(worker_pid=None, server_pid=None, stopped=now_iso())
        _write_state(folder, state)
    return stopped


def status(storage: str | os.PathLike | None = None) -> dict[str, Any]:
    """What runs: server/worker liveness, API health, deployments and flow runs by state."""
    folder = state_dir(storage)
    state = read_state(folder)
    out: dict[str, Any] = {"state_dir": str(folder), "api_url": state.get("api_url"),
                           "ui_url": state.get("ui_url"),
                           "server": alive(state.get("server_pid"), "server"),
                           "worker": alive(state.get("worker_pid"), "worker"),
                           "storage": state.get("storage"), "data_root": state.get("data_root")}
    out["healthy"] = out["server"] and healthy(state.get("api_url"))
    if out["healthy"]:
        with _client(state) as client:
            out["deployments"] = len(client.read_deployments(**_deployment_list_args()))
            counts: dict[str, int] = {}
            for run in client.read_flow_runs(**_run_list_args()):
                counts[run.state_name or "?"] = counts.get(run.state_name or "?", 0) + 1
            out["flow_runs"] = counts
    return out
