"""How a CLI command runs its flow: answered from the store, or as a flow run on a running ``usseg up``
service, on a configured Prefect API, or on a temporary server.

A Prefect flow run needs an API. Without one, Prefect starts a temporary server (several seconds on a
small machine: most of a warm ``usseg extract``), and a command whose every artifact is cached would pay
that only to find there is nothing to do. So, in this order:

0. No Prefect API configured and the same command answered before: its recorded answer
   (:mod:`usseg_core.answers`) is printed if every input it stood on is unchanged, without importing
   torch, Prefect, timm or the heads (flows are named as ``"module:attr"`` strings for that reason). The
   data check and everything below are skipped; the run record is still written.
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
variables (``orchestration/settings.py``). After 2 or 3, the all-cached result (2's, or a second look-up
pass after the flow run: everything is cached by then) is recorded as the command's answer for step 0.
"""
from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
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


def _profile_api_url() -> str:
    """``PREFECT_API_URL`` of the active Prefect profile, read from ``profiles.toml`` (no Prefect import)."""
    try:
        import tomllib as toml_reader  # Python 3.11+
    except ImportError:  # Python 3.10: the ``toml`` package Prefect depends on
        import toml as toml_reader

    home = Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()
    path = Path(os.environ.get("PREFECT_PROFILES_PATH") or home / "profiles.toml").expanduser()
    try:
        profiles = toml_reader.loads(path.read_text())
    except FileNotFoundError:
        return ""
    except (OSError, ValueError):  # unreadable: assume a server is configured (no answers)
        return "?"
    active = os.environ.get("PREFECT_PROFILE") or profiles.get("active") or "ephemeral"
    return str((profiles.get("profiles") or {}).get(active, {}).get("PREFECT_API_URL") or "")


def _local_prefect_config() -> bool:
    """Whether Prefect settings files of the working folder may name an API (``.env``, ``prefect.toml``,
    ``pyproject.toml``'s ``[tool.prefect]``): then Prefect itself is asked."""
    for name, marker in ((".env", "PREFECT_API_URL"), ("prefect.toml", "url"), ("pyproject.toml", "tool.prefect")):
        try:
            if marker in Path(name).read_text(errors="replace"):
                return True
        except OSError:
            continue
    return False


def answers_enabled() -> bool:
    """Whether step 0 applies: no Prefect API configured (checked without importing Prefect unless it is
    already imported, as in a test harness) and ``USSEG_FLOW_RUN`` is not ``always``."""
    if os.environ.get(FLOW_RUN_ENV) == "always":
        return False
    if "prefect" in sys.modules or _local_prefect_config():
        return not api_configured()
    return not (os.environ.get("PREFECT_API_URL") or _profile_api_url())


def _flow(flow):
    """A flow object, or one named ``"module:attr"`` (imported only now: Prefect and torch come with it)."""
    if isinstance(flow, str):
        module, _, attr = flow.partition(":")
        return getattr(importlib.import_module(module), attr)
    return flow


def _command(flow) -> str:
    return flow if isinstance(flow, str) else f"{flow.fn.__module__}:{flow.fn.__name__}"


def answered(flow, fields: dict, storage: str, *, say: Callable[[str], None] = print) -> Any | None:
    """Step 0: the recorded answer of ``flow`` on the command's ``fields`` if it still holds, else None."""
    from usseg_core.answers import answers_folder, load_answer, write_run_record

    record = load_answer(storage, _command(flow), fields)
    if record is None:
        return None
    write_run_record(storage, record)
    say(f"every artifact was already in the store: answered from {answers_folder(storage)} "
        "(recorded answer, inputs unchanged; no flow run, torch and Prefect not imported)")
    return record["result"]


def _record_answer(flow, spec, result: Any | None, fields: dict) -> None:
    """Record the all-cached result for step 0 (``result`` is one, else a second look-up pass finds it)."""
    from orchestration.publish import no_run_record
    from usseg_core.answers import save_answer

    if result is None:
        with no_run_record():
            result = cached_result(flow, spec)
    if result is not None and "://" not in str(spec.storage):
        save_answer(spec.storage, _command(flow), fields, result, flow=flow.name)


def cached_result(flow, spec) -> Any | None:
    """The flow's result if every artifact it needs is in the store (no flow run, no server), else None."""
    try:
        with lookups_only():
            return flow.fn(spec)
    except NotCached as miss:
        log.debug("look-up pass: %s must be computed; starting a flow run", miss)
        return None


def run_command(flow, spec_cls, fields: dict, *, say: Callable[[str], None] = print,
                check: Callable[[Any], None] | None = None) -> tuple[Any | None, Any]:
    """A CLI command: ``(spec, result)`` of ``flow`` on ``spec_cls(**fields)``, answered from its record
    when it holds (step 0: then the spec is None, since validating it would import the heads' settings
    and torch; the record was made from the same fields, validated then), else :func:`run_flow`.

    ``fields`` are the command's validated-by-typer values (``storage`` resolved); ``check(spec)`` runs
    before any server or work (the data check). Under ``--on-error skip`` every command runs its look-up
    pass (the skipped files' lines come from the manifests)."""
    from usseg_core.spec import build

    local = "://" not in str(fields["storage"])  # an object store's commits are looked up on the bucket
    if local and answers_enabled() and fields.get("on_error") != "skip":
        result = answered(flow, fields, str(fields["storage"]), say=say)
        if result is not None:
            return None, result
    spec = build(spec_cls, **fields)
    return spec, run_flow(flow, spec, say=say, check=check, fields=fields)


def run_flow(flow, spec, *, say: Callable[[str], None] = print,
             check: Callable[[Any], None] | None = None, fields: dict | None = None) -> Any:
    """Run ``flow(spec)`` the cheapest way that keeps its records (see the module docstring).

    ``flow`` is a flow or ``"module:attr"`` naming one; ``check(spec)`` runs before any server or work
    (the data check). The answer is recorded under ``fields`` (the command's, default: the spec's).
    ``spec.storage`` (resolved) names the store whose ``usseg up`` service is looked for."""
    fields = spec.model_dump(mode="json") if fields is None else fields
    if check is not None:
        check(spec)
    flow = _flow(flow)
    from orchestration.service import service_api, using_api

    configured = api_configured()
    api = None if configured else service_api(spec.storage)
    if configured:
        prepare_flow_process(temporary_server=False)
        return flow(spec)
    with using_api(api) if api else nullcontext():
        if os.environ.get(FLOW_RUN_ENV) != "always":
            result = cached_result(flow, spec)
            if result is not None:
                say("every artifact was already in the store: answered by look-ups, no flow run started")
                _record_answer(flow, spec, result, fields)
                return result
        # only now, on a miss: importing Prefect's server module alone takes seconds (bench/rehearsal.py)
        prepare_flow_process(temporary_server=not api)
        if api:
            say(f"flow run on the running usseg service at {api} (usseg up)")
        result = flow(spec)
        if os.environ.get(FLOW_RUN_ENV) != "always":
            _record_answer(flow, spec, None, fields)
        return result
