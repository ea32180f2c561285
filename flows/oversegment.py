"""Flow ``oversegment``: manifest -> edges -> OWT-UCM -> HSG threshold schedule, sharded over workers."""
from __future__ import annotations

from prefect import flow

from tasks.common import DataRef
from tasks.oversegment import ensure_oversegmentation
from usseg_core.config import storage_root
from usseg_core.overseg import OversegSchedule, schedule_for_dataset


@flow(name="oversegment")
def oversegment_flow(dataset: str, data_root: str, split: str = "train", detector: str = "classical",
                     weights: str | None = None, t0: float | None = None, max_regions: int | None = None,
                     storage: str | None = None, dataset_options: dict | None = None) -> dict:
    """Edge maps, BSDS-format UCMs and HSG oversegmentations of a dataset split (cached, resumable)."""
    base = schedule_for_dataset(dataset)
    schedule = OversegSchedule(t0 if t0 is not None else base.t0,
                               max_regions if max_regions is not None else base.max_regions, base.step)
    data = DataRef(dataset, str(data_root), split, dataset_options or {})
    return ensure_oversegmentation(str(storage_root(storage)), data, detector, weights, schedule)
