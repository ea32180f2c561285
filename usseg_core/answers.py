"""Answers: what a fully cached command printed, recorded so that the next identical command is answered
without importing torch, Prefect, timm or the heads (docs/architecture.md, "Answers").

A command's look-up pass (``commands/launch.py``) costs the imports of every flow and task module: about
as long as ``python -c "import torch, prefect"``. Once a command has run, its all-cached result (the one
a look-up pass returns) is written to ``<storage>/_answers/<id>.json`` with the artifacts it names. The
next command with the same id is answered from that record when, and only when, every input it stood on
is unchanged:

- the id: sha256 of the command, its fields as given (the spec is validated from them when it runs, so
  the same fields validate the same way; a relative path adds the working folder), usseg's code version, the ``USSEG_*`` environment
  variables, the size and mtime of every existing file the fields name (``--weights``, ``--names``), and the
  machine's CUDA devices as seen without torch (:func:`device_probe`: what ``auto`` devices resolve by);
- each data split the answer read: its listing signature (every file's path, size and mtime, or its
  sha256 under ``USSEG_VERIFY_CONTENT=1``) is computed again, exactly as the manifest stage does, and must
  equal the one its manifest was keyed by;
- every path outside the storage the answer names (``usseg segment --out``'s copy) still exists;
- each artifact the answer names: complete, its ``meta.json`` readable, and its recorded files checked
  exactly as a cache hit checks them (:func:`usseg_core.store.check_files`: a damaged one raises
  :class:`~usseg_core.errors.DamagedArtifact`, exit 4, naming the folder to delete).

Anything else (no record, another id, a changed split, a deleted or incomplete artifact, an unreadable
record) is a miss: the command runs its look-up pass or its flow as before, and records the answer again.
The run record users inspect (``<storage>/_runs/``) is written for an answered command too.

This module imports neither torch nor Prefect (a test checks it).
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from usseg_core.runs import produced, runs_folder
from usseg_core.store import (MARKER, META, Artifact, atomic_write_json, canonical_json, check_files, code_version,
                              now_iso)

ANSWERS_FOLDER = "_answers"
ANSWER_FORMAT = 1
# Environment variables that are about how a command runs, not what it computes: left out of the id.
UNKEYED_ENV = frozenset({"USSEG_FLOW_RUN", "USSEG_STATE", "USSEG_STORAGE"})


def _env() -> dict[str, str]:
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("USSEG_") and k not in UNKEYED_ENV}


def device_probe() -> dict[str, Any]:
    """What decides ``--device auto`` / ``--precision auto`` (bf16 features on CUDA), read without torch: the
    visible CUDA devices (``CUDA_VISIBLE_DEVICES``) and the NVIDIA device files of this machine. A machine that
    gains or loses a GPU gets other answer ids (its ``auto`` may resolve otherwise, and so may its keys)."""
    import glob

    return {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "nvidia": sorted(os.path.basename(p) for p in glob.glob("/dev/nvidia[0-9]*"))}


def _path_strings(obj: Any) -> Iterator[str]:
    """Every string (or path) in the nested mappings and lists of ``obj`` that could name a file."""
    if isinstance(obj, Mapping):
        for value in obj.values():
            yield from _path_strings(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _path_strings(value)
    elif isinstance(obj, (str, Path)) and 0 < len(str(obj)) < 4096 and "\0" not in str(obj):
        yield str(obj)


def answer_id(command: str, fields: Mapping[str, Any]) -> str:
    """The id of a command's answer: its fields as given (before validation), see the module docstring."""
    files = {}
    for name in sorted({p for p in _path_strings(fields) if os.path.isfile(p)}):  # weights, names.yaml
        st = os.stat(name)
        files[str(Path(name).resolve())] = [st.st_size, st.st_mtime_ns]
    # a relative path that exists: the working folder is part of the id
    relative = any(not os.path.isabs(p) and os.path.exists(p) for p in _path_strings(fields))
    payload = canonical_json({"format": ANSWER_FORMAT, "command": command, "fields": dict(fields),
                              "cwd": os.getcwd() if relative else None,
                              "code": code_version(), "env": _env(), "files": files, "devices": device_probe()})
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def answers_folder(storage: str | Path) -> Path:
    from usseg_core.store import local_root

    return local_root(storage) / ANSWERS_FOLDER


def plain(obj: Any) -> Any:
    """``obj`` as plain JSON values (mappings such as ``ArtifactRef`` become dicts, tuples lists)."""
    if isinstance(obj, Mapping):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, Path):
        return obj.as_posix()
    if hasattr(obj, "item") and callable(obj.item):  # a numpy scalar
        return obj.item()
    return obj


def _artifacts(result: Any) -> list[dict]:
    """``[{"stage", "key", "path"}]`` of every artifact a result names (:func:`usseg_core.runs.produced`),
    ``path`` being the artifact's folder."""
    def folder(path: str, key: str) -> str:  # a file the result names inside its artifact -> the artifact
        parts = Path(path).parts
        return str(Path(*parts[:parts.index(key) + 1]))

    return [{"stage": a["stage"], "key": a["key"], "path": folder(a["path"], a["key"])} for a in produced(result)]


def _outside(result: Any, storage: Path) -> list[str]:
    """Existing paths a result names outside the storage (``usseg segment --out``'s copy, absolute or
    relative)."""
    found = {Path(p).resolve() for p in _path_strings(result) if os.path.sep in p}
    return sorted(str(p) for p in found if not p.is_relative_to(storage) and p.exists())


def _digest(body: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical_json(body).encode()).hexdigest()


def save_answer(storage: str | Path, command: str, fields: Mapping[str, Any], result: Any, *,
                flow: str) -> Path:
    """Record the all-cached ``result`` of ``command`` on ``spec`` (what a look-up pass returned)."""
    result = plain(result)
    body = {"format": ANSWER_FORMAT, "command": command, "flow": flow, "created": now_iso(),
            "code_version": code_version(), "result": result, "artifacts": _artifacts(result),
            "outside": _outside(result, Path(storage).resolve())}
    path = answers_folder(storage) / f"{answer_id(command, fields)}.json"
    atomic_write_json(path, {**body, "sha256": _digest(body)})
    return path


def _split_unchanged(art: Artifact) -> bool:
    """Whether the split a manifest artifact was keyed by still has the same listing signature."""
    from usseg_core.datasets import get_dataset
    from usseg_core.datasets.manifest import listing_signature, verify_content
    from usseg_core.errors import UssegError

    params = art.meta.get("params") or {}
    try:
        ds = get_dataset(params["dataset"], params["root"], params["split"], **(params.get("options") or {}))
        return listing_signature(ds, content=verify_content()) == params["listing"]
    except (KeyError, TypeError, OSError, UssegError):
        return False  # the split is gone or cannot be read: the flow says why


def load_answer(storage: str | Path, command: str, fields: Mapping[str, Any]) -> dict | None:
    """The recorded answer if every input it stood on is unchanged (module docstring), else None.

    Raises:
        DamagedArtifact: an artifact the answer names is complete but one of its files was damaged.
    """
    path = answers_folder(storage) / f"{answer_id(command, fields)}.json"
    try:
        record = json.loads(path.read_text())
        body = {k: v for k, v in record.items() if k != "sha256"}
        if record.get("sha256") != _digest(body) or record.get("format") != ANSWER_FORMAT:
            return None
        arts = [Artifact(a["stage"], a["key"], Path(a["path"])) for a in record["artifacts"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    for art in arts:
        if not (art.path / MARKER).exists():
            return None
        try:
            art.meta = json.loads((art.path / META).read_text())
        except (OSError, ValueError):
            return None
    if not all(os.path.exists(p) for p in record.get("outside", [])):
        return None  # a copy it made outside the storage is gone: the flow makes it again
    for art in arts:
        if art.stage == "manifest" and not _split_unchanged(art):
            return None
    for art in arts:
        check_files(art)
    return record


def write_run_record(storage: str | Path, record: Mapping[str, Any]) -> Path:
    """The run record of an answered command, beside the flow runs' (``usseg storage gc`` keeps its keys)."""
    run_id = f"{now_iso()}-answer-{secrets.token_hex(3)}"
    path = runs_folder(storage) / f"{run_id}.json"
    atomic_write_json(path, {"flow": record["flow"], "flow_run_id": None, "answered_from": record["command"],
                             "created": now_iso(), "storage": str(storage),
                             "keys": [a["key"] for a in record["artifacts"]]})
    return path
