"""Flow ``watch-backbones``: fingerprint every configured backbone's weights and emit
``usseg.backbone.changed`` when a fingerprint differs from the last one recorded.

Training deployments carry an event trigger on that event (deployments/prefect.yaml): the triggered run
sees a new backbone fingerprint, hence new keys for exactly the stages below the backbone (features, KNN,
heads, clustering, CRF, evaluation), while manifests, edges and oversegmentations are cache hits.

Fingerprints are memoised by file identity (name, path, size, mtime) in ``<storage>/_fingerprints.json``,
so a watcher run over unchanged files costs a stat() per backbone; the last fingerprint seen per backbone
is recorded in ``<storage>/_backbones.json``.
"""
from __future__ import annotations

import json
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from orchestration.settings import storage_root
from tasks.backbone import BackboneRef, backbone_fingerprint
from tasks.stage import logger
from usseg_core.spec import DEFAULT_BACKBONE
from usseg_core.store import atomic_write_json, local_root, now_iso

EVENT = "usseg.backbone.changed"
RECORD = "_backbones.json"

def watched_flows() -> tuple[str, ...]:
    """Flows whose deployments name the backbones to watch when no explicit list is given (from the registry)."""
    from usseg_core.heads import list_heads

    heads = (f"{kind}-{h}" for kind in ("train", "evaluate") for h in list_heads())
    return (*heads, "compare", "extract-features")


WATCHED_FLOWS = watched_flows()


def resource_id(name: str) -> str:
    """Event resource id of a backbone (what deployment triggers match)."""
    return f"usseg.backbone.{name}"


def configured_backbones() -> list[dict]:
    """Distinct (backbone, weights) of the deployments of the watched flows on the current Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import DeploymentSort

    with get_client(sync_client=True) as client:  # limit/sort explicit: see orchestration/service.py
        deployments = client.read_deployments(flow_filter=FlowFilter(name=FlowFilterName(any_=list(WATCHED_FLOWS))),
                                              limit=500, sort=DeploymentSort.NAME_ASC)
    seen: dict[tuple, dict] = {}
    for dep in deployments:
        params = (dep.parameters or {}).get("spec") or {}  # every watched flow's one parameter
        if params.get("random_weights"):
            continue  # a seeded random init cannot change
        name = params.get("backbone", DEFAULT_BACKBONE)
        seen.setdefault((name, params.get("weights")), {"name": name, "weights": params.get("weights")})
    return list(seen.values())


@task(name="fingerprint-backbone", cache_policy=NO_CACHE)
def fingerprint(storage: str, name: str, weights: str | None) -> str:
    return backbone_fingerprint(BackboneRef(name, weights), storage)


def _emit(name: str, weights: str | None, old: str, new: str) -> None:
    from prefect.events import emit_event

    emit_event(event=EVENT,
               resource={"prefect.resource.id": resource_id(name), "prefect.resource.name": name,
                         "usseg.backbone.name": name, "usseg.backbone.weights": weights or "default"},
               payload={"old": old, "new": new, "weights": weights})


@flow(name="watch-backbones")
def watch_backbones(backbones: list[dict] | None = None, storage: str | None = None) -> list[dict]:
    """Fingerprint ``backbones`` (``[{"name", "weights"}]``; default: those of the deployments) and emit
    one event per changed fingerprint. Returns ``[{"name", "weights", "old", "new", "changed"}]``."""
    storage = str(storage_root(storage))
    backbones = backbones if backbones is not None else configured_backbones()
    record_path = local_root(storage) / RECORD
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    report = []
    for bb in backbones:
        name, weights = bb["name"], bb.get("weights")
        ident = f"{name}|{Path(weights).resolve() if weights else 'default'}"
        new = fingerprint(storage, name, weights)
        old = record.get(ident, {}).get("fingerprint")
        changed = old is not None and old != new
        if changed:
            _emit(name, weights, old, new)
            logger().info("backbone %s changed: %s -> %s (event %s)", name, old[:12], new[:12], EVENT)
        record[ident] = {"name": name, "weights": weights, "fingerprint": new, "checked": now_iso()}
        report.append({"name": name, "weights": weights, "old": old, "new": new, "changed": changed})
    atomic_write_json(record_path, record)
    return report
