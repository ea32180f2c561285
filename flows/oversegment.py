"""Flow ``oversegment``: manifest -> edges -> OWT-UCM -> HSG threshold schedule, sharded over workers."""
from __future__ import annotations

from prefect import flow

from orchestration.runner import SettingTaskRunner
from orchestration.settings import data_root as resolve_data_root
from orchestration.settings import storage_root
from tasks.common import DataRef
from tasks.oversegment import ensure_oversegmentation
from usseg_core.overseg import OversegSettings


@flow(name="oversegment", task_runner=SettingTaskRunner())
def oversegment_flow(dataset: str, data_root: str | None = None, split: str = "train", detector: str = "classical",
                     weights: str | None = None, t0: float | None = None, max_regions: int | None = None,
                     storage: str | None = None, dataset_options: dict | None = None,
                     task_runner: str = "threads") -> dict:
    """Edge maps, BSDS-format UCMs and HSG oversegmentations of a dataset split (cached, resumable)."""
    schedule = OversegSettings(detector, weights, t0, max_regions).schedule(dataset)
    storage = str(storage_root(storage))
    data = DataRef(dataset, resolve_data_root(dataset, data_root, storage), split, dataset_options or {})
    return ensure_oversegmentation(storage, data, detector, weights, schedule)
