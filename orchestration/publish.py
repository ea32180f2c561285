"""What a flow run produced, published twice: as Prefect artifacts (for the UI) and as a run record in
``<storage>/_runs/`` (for ``usseg storage gc``, which keeps whatever a run references).
"""
from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from usseg_core.runs import produced, runs_folder
from usseg_core.store import atomic_write_json, now_iso

PICTURES = ("confusion.png", "overlays.png")
_RECORDING = contextvars.ContextVar("usseg_run_record", default=True)


@contextlib.contextmanager
def no_run_record() -> Iterator[None]:
    """Inside: :func:`publish_run` writes no run record (the CLI's second look-up pass after a flow run,
    which only reads what that run already recorded: commands/launch.py)."""
    token = _RECORDING.set(False)
    try:
        yield
    finally:
        _RECORDING.reset(token)


def in_flow_run() -> bool:
    """Whether this code runs inside a Prefect flow run (not the CLI's look-up pass, see commands/launch.py)."""
    from prefect.context import FlowRunContext

    return FlowRunContext.get() is not None


def publish_run(storage: str, flow_name: str, result: Any) -> list[dict]:
    """Write the run record and the Prefect artifacts of one flow run; returns the produced artifacts.

    Outside a flow run (the CLI's look-up pass) the run record is written with a timestamp id and
    there are no Prefect artifacts."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact
    from prefect.context import FlowRunContext

    items = produced(result)
    if not _RECORDING.get():
        return items
    ctx = FlowRunContext.get()
    run_id = str(ctx.flow_run.id) if ctx is not None and ctx.flow_run is not None else now_iso()
    atomic_write_json(runs_folder(storage) / f"{run_id}.json",
                      {"flow": flow_name, "flow_run_id": run_id, "created": now_iso(),
                       "storage": str(storage), "keys": [i["key"] for i in items]})
    if ctx is None:
        return items
    create_table_artifact(key="usseg-outputs", table=[
        {"stage": i["stage"], "key": i["key"], "cache hit": i["cache_hit"], "path": i["path"]} for i in items],
        description=f"{flow_name}: artifacts used or produced (inspect with `usseg storage show KEY`)")
    lines = [f"# {flow_name}: outputs", "", f"storage: `{storage}`", ""]
    for i in items:
        hit = "" if i["cache_hit"] is None else (" (cache hit)" if i["cache_hit"] else " (computed)")
        lines.append(f"- **{i['stage']}** `{i['key']}`{hit}: [{i['path']}](file://{i['path']})")
        folder = Path(i["path"]) if Path(i["path"]).is_dir() else Path(i["path"]).parent
        for name in PICTURES:
            if (folder / name).exists():
                lines.append(f"  - [{name}](file://{folder / name})")
    create_markdown_artifact(key="usseg-outputs-summary", markdown="\n".join(lines),
                             description=f"{flow_name}: outputs")
    return items
