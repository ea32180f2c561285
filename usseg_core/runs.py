"""Run records and the artifacts a result names (torch- and Prefect-free).

``<storage>/_runs/`` holds one record per flow run or answered command (``usseg storage gc`` keeps whatever
a record references). Flow runs write theirs through ``orchestration/publish.py``, answered commands
through ``usseg_core/answers.py``; both find a result's artifacts with :func:`produced`.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

RUNS_FOLDER = "_runs"


def runs_folder(storage: str | Path) -> Path:
    from usseg_core.store import local_root

    return local_root(storage) / RUNS_FOLDER


def produced(result: Any) -> list[dict]:
    """Every artifact a flow result names: ``[{"stage", "key", "path", "cache_hit"}]``, first seen first.

    A result names an artifact with a reference (:class:`tasks.stage.ArtifactRef`, what stage tasks
    return, its upstream references inside it included) or a dict holding ``key`` and ``path``; the stage
    is the folder above the key in the path.
    """
    seen: dict[str, dict] = {}
    for item in _walk(result):
        key, path = item["key"], Path(item["path"])
        if key in seen or key not in path.parts:
            continue
        stage = path.parts[path.parts.index(key) - 1]
        seen[key] = {"stage": stage, "key": key, "path": str(path),
                     "cache_hit": item.get("cache_hit")}
    return list(seen.values())


def _walk(obj: Any) -> Iterator[dict]:
    if isinstance(obj, Mapping):  # a dict, or an ArtifactRef (a read-only mapping over its fields)
        if isinstance(obj.get("key"), str) and isinstance(obj.get("path"), str):
            yield obj
        for value in obj.values():
            yield from _walk(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _walk(value)
