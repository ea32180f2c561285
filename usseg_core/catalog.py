"""Read-only views over an :class:`~usseg_core.store.ArtifactStore`: lineage trees, sizes per stage and
garbage-collection plans. Nothing here decides which artifacts exist; ``remove`` deletes what a plan lists.

An artifact's ``meta.json`` records ``upstream``: a mapping role -> value where the value is either another
artifact's key or an external identity (a backbone weight fingerprint, ``"raw"``, ``"none"``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from usseg_core.store import Artifact, ArtifactStore


def index(store: ArtifactStore) -> dict[str, Artifact]:
    """Every artifact folder (complete or not) by key."""
    return {art.key: art for art in store.iter_artifacts()}


@dataclass
class LineageNode:
    """One node of a lineage tree: an artifact, or an external input when ``artifact`` is None."""

    role: str
    value: str
    artifact: Artifact | None = None
    children: list["LineageNode"] = field(default_factory=list)

    def keys(self) -> set[str]:
        """Keys of every artifact in the tree (this node included)."""
        out = {self.value} if self.artifact is not None else set()
        for child in self.children:
            out |= child.keys()
        return out


def lineage(store: ArtifactStore, key: str, arts: dict[str, Artifact] | None = None) -> LineageNode:
    """The tree of upstream artifacts of ``key`` (a unique key prefix is enough)."""
    arts = arts if arts is not None else index(store)
    root = store.find(key)
    return _node("self", root.key, arts, frozenset())


def _node(role: str, value: str, arts: dict[str, Artifact], seen: frozenset[str]) -> LineageNode:
    art = arts.get(value)
    node = LineageNode(role, value, art)
    if art is None or value in seen:  # external input, or a cycle (never written by the store)
        return node
    for child_role, child_value in sorted(art.meta.get("upstream", {}).items()):
        node.children.append(_node(child_role, str(child_value), arts, seen | {value}))
    return node


def downstream(arts: dict[str, Artifact]) -> dict[str, set[str]]:
    """key -> keys of the artifacts that list it upstream."""
    users: dict[str, set[str]] = {}
    for art in arts.values():
        for value in art.meta.get("upstream", {}).values():
            if str(value) in arts:
                users.setdefault(str(value), set()).add(art.key)
    return users


@dataclass
class StageUsage:
    """Artifacts and bytes of one stage."""

    stage: str
    n_complete: int = 0
    n_incomplete: int = 0
    bytes: int = 0


def usage(store: ArtifactStore) -> list[StageUsage]:
    """Size per stage (complete artifacts use the size recorded at completion; others are measured)."""
    out: dict[str, StageUsage] = {}
    for art in store.iter_artifacts():
        row = out.setdefault(art.stage, StageUsage(art.stage))
        if art.complete:
            row.n_complete += 1
        else:
            row.n_incomplete += 1
        row.bytes += store.size_of(art)
    return [out[s] for s in sorted(out)]


@dataclass
class GcItem:
    """An artifact a gc plan would remove, and why."""

    artifact: Artifact
    reason: str
    bytes: int


def gc_plan(store: ArtifactStore, referenced: set[str], *, unreferenced: bool = False,
            min_age_s: float = 3600.0, now: float | None = None) -> list[GcItem]:
    """What ``gc`` removes.

    - incomplete artifacts untouched for ``min_age_s`` seconds (a younger one may still be written by a
      running flow);
    - with ``unreferenced``: complete artifacts that no other artifact lists upstream and no run
      references (``referenced``: keys named by run records). One pass: removing a leaf may make its
      upstream unreferenced on the next pass.
    """
    now = time.time() if now is None else now
    arts = index(store)
    users = downstream(arts)
    plan: list[GcItem] = []
    for art in arts.values():
        if not art.complete:
            if now - store.modified(art) >= min_age_s:
                plan.append(GcItem(art, "incomplete", store.size_of(art)))
        elif unreferenced and art.key not in referenced and not users.get(art.key):
            plan.append(GcItem(art, "unreferenced", store.size_of(art)))
    return plan


def remove(store: ArtifactStore, plan: list[GcItem]) -> int:
    """Delete the artifacts of ``plan``; returns the bytes freed."""
    freed = 0
    for item in plan:
        store.discard(item.artifact.stage, item.artifact.key)
        freed += item.bytes
    return freed
