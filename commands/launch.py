"""How a CLI command runs its flow: on a running ``usseg up`` service, answered from the store, or as a
flow run on a temporary server.

A Prefect flow run needs an API. Without one, Prefect starts a temporary server (several seconds on a
small machine: most of a warm ``usseg extract``), and a command whose every artifact is cached would pay
that only to find there is nothing to do. So, in this order:

1. A Prefect API configured (``PREFECT_API_URL``): the flow runs against it (the user's server, or a deployment's worker).
2. A healthy ``usseg up`` service for this storage (``<storage>/_service/service.json`` or
   ``$USSEG_STATE``): the flow runs on it, and the output says so.
3. Otherwise the flow's body runs once under :func:`usseg_core.store.lookups_only`: stage tasks run inline
   (``tasks.stage.StageTask``) and the first artifact that would have to be computed raises
   ``NotCached`` before any of its work. If nothing was missing, that pass *is* the answer: the same
   result dict, the same cache-hit lines, and the run record under ``storage/_runs/`` (without Prefect
   artifacts, since no flow run exists). If something was missing, the flow runs as usual, on a
   temporary server; the look-up pass cost only reads. ``USSEG_FLOW_RUN=always`` skips this pass, for
   users who want every command recorded as a flow run.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from usseg_core.store import NotCached, lookups_only

log = logging.getLogger("usseg")

def prepare_flow_process() -> None:
    """What a CLI process needs before its first flow run (kept out of start-up, which stays Prefect-free):
    Prefect's failure records off the console unless ``--debug``, and a temporary server that exits with us."""
    from orchestration.compat import server_dies_with_parent
    from orchestration.console import quiet_prefect_console

    quiet_prefect_console()
    server_dies_with_parent()


FLOW_RUN_ENV = "USSEG_FLOW_RUN"  # "always": skip the look-up pass (every command is a Prefect flow run)


def api_configured() -> bool:
    """Whether a Prefect API is configured (``PREFECT_API_URL``, a profile, or a test harness)."""
    from prefect.settings import PREFECT_API_URL

    return bool(PREFECT_API_URL.value())


def service_api(storage: str | os.PathLike | None) -> str | None:
    """The API url of a healthy ``usseg up`` service for ``storage``, or None."""
    from orchestration.service import healthy, read_state, state_dir

    url = read_state(state_dir(storage)).get("api_url")
    return url if url and healthy(url, timeout=1.0) else None


def cached_result(flow, spec) -> Any | None:
    """The flow's result if every artifact it needs is in the store (no flow run, no server), else None."""
    try:
        with lookups_only():
            return flow.fn(spec)
    except NotCached as miss:
        log.debug("look-up pass: %s must be computed; starting a flow run", miss)
        return None


def run_flow(flow, spec, *, say: Callable[[str], None] = print) -> Any:
    """Run ``flow(spec)`` the cheapest way that keeps its records (see the module docstring).

    ``spec.storage`` (resolved) names the store whose ``usseg up`` service is looked for."""
    prepare_flow_process()
    if api_configured() or os.environ.get(FLOW_RUN_ENV) == "always":
        return flow(spec)
    api = service_api(spec.storage)
    if api:
        say(f"flow run on the running usseg service at {api} (usseg up)")
        os.environ["PREFECT_API_URL"] = api  # the process's: Dask worker processes inherit it too
        return flow(spec)
    result = cached_result(flow, spec)
    if result is not None:
        say("every artifact was already in the store: answered by look-ups, no flow run started")
        return result
    return flow(spec)
