"""What a stage does when it fails: a full disk named (the storage, the artifact, what was written and what
was needed), and no empty artifact folder left behind (:func:`tasks.stage.run_stage` calls both)."""
from __future__ import annotations

import numpy as np

from usseg_core.errors import DiskFull, disk_full_cause
from usseg_core.store import META, ArtifactStore, folder_size


def disk_full(exc: BaseException, store: ArtifactStore, stage: str, key: str) -> DiskFull | None:
    """The :class:`DiskFull` error of an artifact whose writing failed for want of space, else None (a
    :class:`DiskFull` of a nested stage is returned as it is)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, DiskFull):
            return seen
        seen = seen.__cause__ or seen.__context__
    err = disk_full_cause(exc)
    if err is None:
        return None
    folder = store.path(stage, key)
    return DiskFull.of(err, store.root, f"{stage}/{key}", folder_size(folder), array_bytes(folder))


def array_bytes(folder) -> int | None:
    """Uncompressed bytes of the Zarr arrays under ``folder`` (what a stage writing them will need at most,
    before compression), or None when it holds none."""
    import json
    from math import prod

    total = None
    for meta in sorted(folder.rglob("zarr.json")) if folder.is_dir() else ():
        try:
            doc = json.loads(meta.read_text())
            if doc.get("node_type") == "array":
                total = (total or 0) + prod(doc["shape"]) * np.dtype(doc["data_type"]).itemsize
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return total


def drop_if_empty(store: ArtifactStore, stage: str, key: str) -> None:
    """Remove an artifact folder this run began when a failure left nothing in it but its ``meta.json``
    (a manifest refused on a bad file, a KNN table refused for its size): an empty folder would only show
    as an incomplete artifact. A folder holding partial work (feature chunks, checkpoints) is kept: a
    rerun resumes from it."""
    folder = store.path(stage, key)
    try:
        names = {p.name for p in folder.iterdir()}
    except OSError:
        return
    if names <= {META}:
        store.discard(stage, key)
