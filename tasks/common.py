"""Shared pieces of the tasks layer: dataset references, manifests and backbone fingerprints.

Tasks resolve artifact keys, skip work whose artifact is complete, call the core and record lineage, all
through the one scaffold of ``tasks/stage.py``. What passes between tasks is plain data and frozen
dataclasses (data and backbone references here, artifact references in ``tasks/stage.py``), so that tasks
can run on Dask workers.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

from prefect import Task
from prefect.cache_policies import NO_CACHE

from usseg_core.datasets import get_dataset
from usseg_core.datasets.manifest import Manifest, build_manifest
from tasks.stage import ManifestRef, Work, declare, logger, run_stage
from usseg_core.store import atomic_write_json, canonical_json, lookups_only_active

MANIFEST_VERSION = 1


class Done:
    """The already-computed result of a stage task called under ``lookups_only`` (a future's API)."""

    def __init__(self, value) -> None:
        self.value = value

    def result(self, *args, **kwargs):
        return self.value

    def wait(self, *args, **kwargs) -> None:
        return None


def _resolved(obj):
    """``obj`` with every :class:`Done` in it (nested in lists, tuples, dicts) replaced by its value, as
    Prefect resolves futures passed to a task."""
    if isinstance(obj, Done):
        return obj.value
    if isinstance(obj, (list, tuple)):
        return type(obj)(_resolved(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _resolved(v) for k, v in obj.items()}
    return obj


class StageTask(Task):
    """A stage's Prefect task (``ensure_*``: find the artifact or compute it).

    Under :func:`usseg_core.store.lookups_only` it runs inline, without Prefect: a look-up needs no task
    run, and a miss raises ``NotCached`` before any work. Otherwise it is an ordinary task.
    """

    def __call__(self, *args, **kwargs):
        if lookups_only_active():
            return self.fn(*_resolved(args), **_resolved(kwargs))
        return super().__call__(*args, **kwargs)

    def submit(self, *args, **kwargs):
        if lookups_only_active():
            return Done(self.fn(*_resolved(args), **_resolved(kwargs)))
        return super().submit(*args, **kwargs)


def stage_task(name: str, **options):
    """``@stage_task("kmeans")``: the :class:`StageTask` of an ``ensure_*`` function (never Prefect-cached:
    the artifact store is the cache)."""
    return lambda fn: StageTask(fn=fn, name=name, cache_policy=NO_CACHE, **options)


def worker_id() -> str:
    """``host:pid`` of the process running a task (recorded by shards and trainings: where work ran)."""
    import socket

    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class DataRef:
    """Which data: a registry name, a root folder, a split and dataset options."""

    name: str
    root: str
    split: str
    options: dict = field(default_factory=dict)
    on_error: str = "raise"

    def dataset(self):
        return _dataset(self.name, self.root, self.split, canonical_json(self.options))

    def as_dict(self) -> dict:
        return asdict(self)


@functools.lru_cache(maxsize=32)
def _dataset(name: str, root: str, split: str, options_json: str):
    return get_dataset(name, root, split, **json.loads(options_json))


VERIFY_CONTENT_ENV = "USSEG_VERIFY_CONTENT"


def verify_content() -> bool:
    """True when ``USSEG_VERIFY_CONTENT`` is set to 1/true/yes: manifests are keyed by file contents."""
    return os.environ.get(VERIFY_CONTENT_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _listing_signature(ds, *, content: bool = False) -> str:
    """Identity of a split's files: decides whether a manifest (and everything keyed by it) is reused.

    The rule: by default it covers every file's relative path, byte size and mtime (ns) — a stat() per
    file. A file whose bytes change while its size and mtime stay the same (a tool restoring the mtime,
    ``os.utime``) is therefore *not* noticed and the old manifest and features are reused. With
    ``content=True`` (``USSEG_VERIFY_CONTENT=1``) it covers each file's sha256 instead, so changing any
    byte changes the manifest hash and every downstream key, at the cost of reading every file.

    A file that the index names but that does not exist (an image without its label) enters the
    signature as missing instead of raising: :func:`build_manifest` then reports it as an InputError
    naming the file, or lists it in ``skipped`` under ``on_error="skip"``.
    """
    from usseg_core.datasets.manifest import file_sha256
    from usseg_core.errors import InputError

    h = hashlib.sha256()
    if content:  # the default keeps the signature (and manifest keys) of earlier versions
        h.update(b"content\n")
    for id_ in ds.ids():
        for rel in (ds.image_relpath(id_), ds.label_relpath(id_)):
            if rel is None:
                continue
            path = Path(ds.root) / rel
            try:
                if content:
                    size, sha = file_sha256(path)
                    h.update(f"{rel}\0{size}\0{sha}\n".encode())
                else:
                    st = os.stat(path)
                    h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            except (OSError, InputError) as err:
                problem = err.problem if isinstance(err, InputError) else (err.strerror or str(err))
                h.update(f"{rel}\0missing\0{problem}\n".encode())
    return h.hexdigest()


MANIFEST = declare("manifest", MANIFEST_VERSION, "usseg_core.datasets.manifest.build_manifest",
                   unkeyed={"validate": "always True: every file is opened and checked",
                            "progress": "a progress bar"})


@stage_task("manifest")
def ensure_manifest(data: DataRef, storage: str) -> ManifestRef:
    """The split's manifest (id, path, size, sha256 per file); rebuilt only when the files changed.

    "Changed" follows :func:`_listing_signature`: a path, byte size or mtime differs — or, with
    ``USSEG_VERIFY_CONTENT=1``, any byte differs.
    """
    ds = data.dataset()
    content = verify_content()
    params = {"dataset": data.name, "root": str(Path(data.root).resolve()), "split": data.split,
              "options": data.options, "on_error": data.on_error,
              "listing": _listing_signature(ds, content=content)}

    def body(work: Work) -> dict:
        manifest = work.core(build_manifest, ds, on_error=data.on_error, validate=True, progress=True)
        manifest.to_json(work.art.file("manifest.json"))
        logger().info("manifest %s: %d files, %d skipped", work.art.key, len(manifest), len(manifest.skipped))
        return {"n_items": len(manifest), "skipped": manifest.skipped, "manifest_hash": manifest.hash}

    def ref(art, hit: bool) -> ManifestRef:
        return ManifestRef.of(art, str(art.file("manifest.json")), hit, hash=art.meta["manifest_hash"],
                              n=art.meta["n_items"], skipped=art.meta.get("skipped", []))

    return run_stage(storage, MANIFEST, params, None, body, ref, info={"dataset": data.name, "split": data.split})


def load_manifest(info: ManifestRef) -> Manifest:
    return Manifest.from_json(info["path"])


# --- backbones -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BackboneRef:
    """Which backbone: registry name, optional weights file, random-init flag and seed."""

    name: str
    weights: str | None = None
    random_weights: bool = False
    seed: int = 0
    device: str = "auto"

    def as_dict(self) -> dict:
        return asdict(self)

    def identity(self) -> str:
        """What decides the weights (not the device): the fingerprint-cache key."""
        if self.random_weights:
            return f"{self.name}|random|{self.seed}"
        if self.weights:
            st = os.stat(self.weights)
            return f"{self.name}|{Path(self.weights).resolve()}|{st.st_size}|{st.st_mtime_ns}"
        return f"{self.name}|default"


_lock = threading.Lock()


@functools.lru_cache(maxsize=4)
def load_backbone(ref: BackboneRef):
    """The backbone, built once per process (tasks on one worker share it)."""
    from usseg_core.backbones import get_backbone

    with _lock:
        return get_backbone(ref.name, weights=ref.weights, random_weights=ref.random_weights,
                            device=ref.device, seed=ref.seed)


def backbone_fingerprint(ref: BackboneRef, storage: str) -> str:
    """sha256 of the backbone's weights, memoised in ``<storage>/_fingerprints.json`` by file identity.

    A cache hit therefore costs a stat() and no backbone work; a replaced weights file (new size or
    mtime) is hashed again.
    """
    path = Path(storage) / "_fingerprints.json"
    identity = ref.identity()
    with _lock:
        known = json.loads(path.read_text()) if path.exists() else {}
    if identity in known:
        return known[identity]
    fp = load_backbone(ref).fingerprint
    with _lock:
        known = json.loads(path.read_text()) if path.exists() else {}
        known[identity] = fp
        atomic_write_json(path, known)
    return fp


def input_multiple(name: str) -> int:
    """Input-size multiple of a backbone, read from its torch-free spec row (no timm import)."""
    from usseg_core.backbones.specs import backbone_spec

    return backbone_spec(name).input_multiple
