"""Which backbone a run uses (:class:`BackboneRef`): built once per process, fingerprinted by its weights."""
from __future__ import annotations

import functools
import json
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

from usseg_core.store import atomic_write_json, local_root


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
    path = local_root(storage) / "_fingerprints.json"
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
