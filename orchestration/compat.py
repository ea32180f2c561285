"""Every use of Prefect's private API, in one place, each with a test that fails when an upgrade breaks it
(tests/orchestration/test_compat.py).

Prefect 3.8 (pinned ``>=3.8,<3.9`` in pyproject.toml) offers no public hook for these three needs:

1. :func:`server_dies_with_parent`: the temporary API server a flow run starts without a configured API
   (``prefect.server.api.server.SubprocessASGIServer``) outlives a CLI killed with ``kill -9``. We replace
   its private ``_run_uvicorn_command`` with one that runs uvicorn behind a watchdog thread that stops it
   when its parent is gone.
2. :func:`filter_console`: Prefect's console handler (``prefect.logging.handlers.PrefectConsoleHandler``)
   is (re)created whenever a run or the temporary server configures logging, so a filter added to an
   instance is lost; we wrap the class's ``handle``.
3. :func:`stop_temporary_server`: the error line of a failed command must come after the temporary
   server's "Stopping ..." line, so the CLI stops it first, through ``SubprocessASGIServer._instances`` and
   ``APILogWorker.drain_all`` (the run logs still buffered are sent while the server listens).
"""
from __future__ import annotations

import logging
import os
import sys

SERVER_MODULE = "prefect.server.api.server"

# The temporary server's process: uvicorn behind a watchdog thread that stops it when its parent (the CLI
# or flow process that started it) is gone, e.g. after ``kill -9`` - else it stays behind as an orphan.
_WATCHDOG = (
    "import os, sys, threading, time, signal, runpy\n"
    "parent = os.getppid()\n"
    "def watch():\n"
    "    while os.getppid() == parent:\n"
    "        time.sleep(0.5)\n"
    "    os.kill(os.getpid(), signal.SIGTERM)\n"
    "    time.sleep(10)\n"
    "    os._exit(1)\n"
    "threading.Thread(target=watch, daemon=True).start()\n"
    "sys.argv = ['uvicorn'] + sys.argv[1:]\n"
    "runpy.run_module('uvicorn', run_name='__main__', alter_sys=True)\n")


def server_dies_with_parent() -> None:
    """Make Prefect's temporary API server (``SubprocessASGIServer``) exit when its parent exits."""
    import subprocess

    from prefect.server.api import server as srv

    cls = srv.SubprocessASGIServer
    if getattr(cls._run_uvicorn_command, "_usseg_watchdog", False):
        return
    original = cls._run_uvicorn_command

    def _run_uvicorn_command(self) -> subprocess.Popen:
        import prefect
        from prefect.settings import get_current_settings

        if not sys.platform.startswith("linux"):
            return original(self)
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
               "PREFECT__SERVER_FINAL": "1",
               **get_current_settings().to_environment_variables(exclude_unset=True)}
        return subprocess.Popen(
            args=[sys.executable, "-c", _WATCHDOG, "--app-dir", str(prefect.__module_path__.parent),
                  "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1",
                  "--port", str(self.port), "--log-level", "error", "--lifespan", "on"],
            env=env)

    _run_uvicorn_command._usseg_watchdog = True
    cls._run_uvicorn_command = _run_uvicorn_command


def filter_console(flt: logging.Filter) -> None:
    """Put ``flt`` in front of every Prefect console handler, present and future (class level)."""
    from prefect.logging.handlers import PrefectConsoleHandler

    if getattr(PrefectConsoleHandler.handle, "_usseg_quiet", False):
        return
    original = PrefectConsoleHandler.handle

    def handle(self, record):
        return original(self, record) if flt.filter(record) else False

    handle._usseg_quiet, handle.__wrapped__ = True, original
    PrefectConsoleHandler.handle = handle


def stop_temporary_server() -> None:
    """Stop Prefect's temporary server now, after sending the run logs it still buffers."""
    srv = sys.modules.get(SERVER_MODULE)
    if srv is None:
        return
    try:  # send the buffered run logs while the server still listens
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=5)
    except Exception:  # noqa: BLE001
        pass
    for server in list(srv.SubprocessASGIServer._instances.values()):
        try:
            server.stop()
        except Exception:  # noqa: BLE001 - exiting anyway
            pass
