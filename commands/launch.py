"""How a CLI command runs its flow: answered from the store, or as a flow run on a running ``usseg up``
service, on a configured Prefect API, or on a temporary server.

A Prefect flow run needs an API. Without one, Prefect starts a temporary server (several seconds on a
small machine: most of a warm ``usseg extract``), and a command whose every artifact is cached would pay
that only to find there is nothing to do. So, in this order:

1. A Prefect API configured (``PREFECT_API_URL``, a profile): the flow runs against it (the user's
   server, or a deployment's worker), always as a flow run.
2. Otherwise the flow's body runs once under :func:`usseg_core.store.lookups_only`: stage tasks run inline
   (``tasks.stage.StageTask``) and the first artifact that would have to be computed raises
   ``NotCached`` before any of its work. If nothing was missing, that pass *is* the answer: the same
   result dict, the same cache-hit lines, and the run record under ``storage/_runs/`` (without Prefect
   artifacts, since no flow run exists). ``USSEG_FLOW_RUN=always`` skips this pass, for users who want
   every command recorded as a flow run.
3. Something must be computed: the flow runs on the healthy ``usseg up`` service of this storage
   (``<storage>/_service/service.json`` or ``$USSEG_STATE``), and the output says so; its flow run, task
   runs and logs are in the service's UI, and no temporary server starts. Without a service, the flow
   runs on a temporary server; the look-up pass cost only reads.

With a service, the look-up pass runs against its API as well, so both passes read the same Prefect
variables (``orchestration/settings.py``).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

from usseg_core.store import NotCached, lookups_only

log = logging.getLogger("usseg")


def prepare_flow_process(*, temporary_server: bool = True) -> None:
    """What a CLI process needs before its first flow run (kept out of start-up, which stays Prefect-free):
    Prefect's failure records off the console unless ``--debug``, and a temporary server that exits with us
    (not imported at all when a service is used: Prefect's server module alone takes seconds to import)."""
    from orchestration.console import quiet_prefect_console

    quiet_prefect_console()
    if temporary_server:
        from orchestration.compat import server_dies_with_parent

        server_dies_with_parent()


FLOW_RUN_ENV = "USSEG_FLOW_RUN"  # "always": skip the look-up pass (every command is a Prefect flow run)


def api_configured() -> bool:
    """Whether a Prefect API is configured (``PREFECT_API_URL``, a profile, or a test harness)."""
    from prefect.settings import PREFECT_API_URL

    return bool(PREFECT_API_URL.value())


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
    from orchestration.service import service_api, using_api

    configured = api_configured()
    api = None if configured else service_api(spec.storage)
    prepare_flow_process(temporary_server=not (configured or api))
    if configured:
        return flow(spec)
    with using_api(api) if api else nullcontext():
        if os.environ.get(FLOW_RUN_ENV) != "always":
            result = cached_result(flow, spec)
            if result is not None:
                say("every artifact was already in the store: answered by look-ups, no flow run started")
                return result
        if api:
            say(f"flow run on the running usseg service at {api} (usseg up)")
        return flow(spec)
