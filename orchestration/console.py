"""What reaches the terminal: Prefect's failure records and tracebacks stay off it unless ``--debug``.

The CLI's process and the local Dask workers it starts (``orchestration.dask_worker``) share this policy:
records of level ERROR and above are kept in :data:`FAILURE_RECORDS` (the CLI appends them to
``<storage>/logs/usseg-errors.log`` when a command fails) instead of being printed. They still reach the
Prefect API (the run's logs in the UI): only the console handler is filtered.
"""
from __future__ import annotations

import logging

DEBUG = False  # `usseg --debug` ($USSEG_DEBUG=1 in the workers): everything stays on the terminal
FAILURE_RECORDS: list = []


class HandledFailures(logging.Filter):
    """Keeps Prefect's failure records off the console unless :data:`DEBUG`; they go to
    :data:`FAILURE_RECORDS`."""

    def filter(self, record: logging.LogRecord) -> bool:
        if DEBUG or record.levelno < logging.ERROR:
            return True
        FAILURE_RECORDS.append(record)
        return False


def quiet_prefect_console() -> None:
    """Apply :class:`HandledFailures` to every Prefect console handler (see orchestration.compat)."""
    from orchestration.compat import filter_console

    filter_console(HandledFailures())
