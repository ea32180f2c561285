"""Which data a run reads (:class:`DataRef`) and the stage that fingerprints it: the split's manifest."""
from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tasks.stage import ManifestRef, Work, declare, logger, run_stage, stage_task
from usseg_core.datasets import get_dataset
from usseg_core.datasets.manifest import Manifest, build_manifest, listing_signature, verify_content

_listing_signature = listing_signature  # the name tests and older code use
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
              "listing": listing_signature(ds, content=content)}

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
