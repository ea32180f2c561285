"""Flow ``oversegment``: manifest -> edges -> OWT-UCM -> HSG threshold schedule, sharded over workers."""
from __future__ import annotations

from prefect import flow

from orchestration.publish import publish_run
from orchestration.refs import data_ref, resolved
from orchestration.runner import SettingTaskRunner
from tasks.oversegment import ensure_oversegmentation
from usseg_core.spec import OversegmentSpec


@flow(name="oversegment", task_runner=SettingTaskRunner())
def oversegment_flow(spec: OversegmentSpec) -> dict:
    """Edge maps, BSDS-format UCMs and HSG oversegmentations of a dataset split (cached, resumable)."""
    spec = resolved(spec)
    out = ensure_oversegmentation(spec.storage, data_ref(spec, spec.split), spec.detector, spec.weights,
                                  spec.settings().schedule(spec.dataset))
    publish_run(spec.storage, "oversegment", out)
    return out
