"""Dask worker preload for the local clusters usseg starts (``--runner dask[:N]``).

A task that fails on a worker is logged by Prefect *in the worker process*, whose console is the user's
terminal. The CLI keeps failure records and tracebacks off the terminal (``orchestration.console``); without this
preload, each failing task on a worker would still print its traceback there, before the one error line.
``usseg --debug`` (``$USSEG_DEBUG=1``, inherited by the workers) keeps them on the terminal, as in the
CLI's own process. The records still reach the Prefect API (the run's logs in the UI): only the console
handler is filtered.
"""
from __future__ import annotations

import os


def dask_setup(worker) -> None:  # noqa: ARG001 - Dask's preload hook signature
    from orchestration import console

    console.DEBUG = os.environ.get("USSEG_DEBUG") == "1"
    console.quiet_prefect_console()
