"""Which data a run reads (:class:`DataRef`) and the stage that fingerprints it: the split's manifest."""
from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tasks.stage import ManifestRef, Work, declare, logger, run_stage, stage_task
from usseg_core.datasets import get_dataset
from usseg_core.datasets.manifest import Manifest, build_manifest
from usseg_core.store import canonical_json

MANIFEST_VERSION = 1


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

    def add(line: str) -> None:  # a name that is not valid UTF-8 keeps its bytes (os.fsencode's surrogates)
        h.update(line.encode("utf-8", "surrogateescape"))

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
                    add(f"{rel}\0{size}\0{sha}\n")
                else:
                    st = os.stat(path)
                    add(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n")
            except (OSError, InputError) as err:
                problem = err.problem if isinstance(err, InputError) else (err.strerror or str(err))
                add(f"{rel}\0missing\0{problem}\n")
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
