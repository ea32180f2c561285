"""One test per use of Prefect's private API (orchestration/compat.py): each fails when a Prefect upgrade
removes or reshapes what the patch relies on, before a user meets the breakage.

The behaviour behind them is tested end to end elsewhere: the temporary server dying with a killed CLI
(tests/flows/test_cli_errors.py::test_temporary_server_dies_when_the_cli_is_killed), failure records kept off
the terminal (test_cli_errors.py, in the CLI and on Dask workers), the error line after the server stops.
"""
from __future__ import annotations

import inspect
import logging

from orchestration import compat


def test_server_dies_with_parent_relies_on_subprocess_server_internals():
    import prefect
    from prefect.server.api import server as srv
    from prefect.settings import get_current_settings

    assert compat.SERVER_MODULE == srv.__name__
    cls = srv.SubprocessASGIServer
    original = cls.__dict__.get("_run_uvicorn_command")
    assert original is not None, "SubprocessASGIServer._run_uvicorn_command is gone"
    assert list(inspect.signature(original).parameters) == ["self"]  # we replace it with a method of self only
    assert "port" in inspect.getsource(cls.__init__)  # the patched command reads self.port
    assert callable(srv.create_app)  # uvicorn's --factory prefect.server.api.server:create_app
    assert (prefect.__module_path__.parent / "prefect").is_dir()  # --app-dir
    assert isinstance(get_current_settings().to_environment_variables(exclude_unset=True), dict)

    compat.server_dies_with_parent()
    compat.server_dies_with_parent()  # idempotent: wrapped once
    patched = cls._run_uvicorn_command
    assert patched._usseg_watchdog and "_WATCHDOG" in inspect.getsource(patched)


def test_filter_console_wraps_every_prefect_console_handler(monkeypatch):
    from prefect.logging.handlers import PrefectConsoleHandler

    unwrapped = getattr(PrefectConsoleHandler.handle, "__wrapped__", PrefectConsoleHandler.handle)
    monkeypatch.setattr(PrefectConsoleHandler, "handle", unwrapped)  # Prefect's own; restored after the test
    kept = []

    class DropErrors(logging.Filter):
        def filter(self, record):
            if record.levelno >= logging.ERROR:
                kept.append(record)
                return False
            return True

    compat.filter_console(DropErrors())
    handler = PrefectConsoleHandler()  # created after the patch, as Prefect re-creates its handlers
    emitted = []
    monkeypatch.setattr(handler, "emit", emitted.append)
    for level in (logging.INFO, logging.ERROR):
        handler.handle(logging.LogRecord("prefect.flow_runs", level, __file__, 1, "msg", None, None))
    assert [r.levelno for r in emitted] == [logging.INFO] and [r.levelno for r in kept] == [logging.ERROR]


def test_stop_temporary_server_relies_on_the_instance_table_and_the_log_worker():
    from prefect.logging.handlers import APILogWorker
    from prefect.server.api import server as srv

    assert isinstance(srv.SubprocessASGIServer._instances, dict)
    assert callable(srv.SubprocessASGIServer.stop)
    assert "timeout" in inspect.signature(APILogWorker.drain_all).parameters
    # (not called here: it would stop the test session's own Prefect server, started by prefect_harness)


def test_no_other_module_touches_prefects_private_api():
    """The patches live in compat only: no other module of ours names these private attributes."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    private = ("_run_uvicorn_command", "SubprocessASGIServer._instances", "PrefectConsoleHandler.handle =",
               "APILogWorker.drain_all")
    for package in ("usseg_core", "tasks", "orchestration", "flows", "commands"):
        for path in (repo / package).rglob("*.py"):
            if path.name == "compat.py":
                continue
            text = path.read_text()
            assert not any(p in text for p in private), f"{path} uses Prefect's private API: move it to compat"
