"""HSG's edge-based oversegmentation: edges -> OWT-UCM -> one partition per image (METHODS.md §1.1, S4).

Threshold schedule (HSG `[001]` §5.8): start at an initial UCM threshold t0 and raise it until the
number of regions drops below a cap. The paper does not state the step; we use 0.01 (inferred: the
UCM levels live in [0, 1] and 0.01 is the granularity of the BSDS threshold grid; a finer step only
moves the chosen level within the same UCM gap). Because the region count is monotone in the
threshold we find the first schedule step below the cap by bisection over the step grid, which is
exactly the linear scan's answer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from usseg_core.edges import EdgeDetector, EdgeMap
from usseg_core.errors import ConfigError
from usseg_core.ucm import owt_ucm, ucm_labels

__all__ = ["OversegSchedule", "SCHEDULES", "schedule_for_dataset", "OversegResult", "oversegment", "choose_level"]


@dataclass(frozen=True)
class OversegSchedule:
    """Raise the UCM threshold from t0 in `step`s until fewer than `max_regions` regions remain."""

    t0: float  # initial threshold (HSG [001] §5.8)
    max_regions: int  # stop when #regions < max_regions (HSG [001] §5.8)
    step: float = 0.01  # not stated in HSG; inferred (see module docstring)

    def __post_init__(self) -> None:
        if not 0.0 <= self.t0 <= 1.0:
            raise ConfigError(f"OversegSchedule.t0 must be in [0, 1], got {self.t0}")
        if self.max_regions < 2:
            raise ConfigError(f"OversegSchedule.max_regions must be >= 2, got {self.max_regions}")
        if not self.step > 0:
            raise ConfigError(f"OversegSchedule.step must be > 0, got {self.step}")


# METHODS.md §1.1 table; the pairing of the PMI values by order is inferred there.
SCHEDULES: dict[str, OversegSchedule] = {
    "coco": OversegSchedule(0.25, 48),  # MSCOCO / COCO-stuff, SE edges
    "cityscapes": OversegSchedule(0.05, 1024),  # Cityscapes / KITTI-STEP, PMI edges
    "potsdam": OversegSchedule(0.5, 128),  # Potsdam, PMI edges
}

# Dataset registry names -> schedule. CamVid (road scenes like Cityscapes, no HSG setting of its
# own) uses the Cityscapes schedule: same domain and the same kind of many-small-objects scenes; at
# 480x360 the 1024-region cap still gives ~170-pixel regions, a fine oversegmentation. Our choice.
_DATASET_SCHEDULE = {
    "coco": "coco", "cocostuff": "coco", "cocostuff27": "coco", "cocostuff171": "coco", "mscoco": "coco",
    "cityscapes": "cityscapes", "cityscapes27": "cityscapes", "kitti-step": "cityscapes", "kitti_step": "cityscapes",
    "camvid": "cityscapes", "camvid11": "cityscapes",
    "potsdam": "potsdam", "potsdam3": "potsdam", "potsdam6": "potsdam",
}


def schedule_for_dataset(dataset_name: str) -> OversegSchedule:
    """Schedule for a dataset registry name (e.g. "cocostuff27"); unknown names get the COCO one."""
    key = dataset_name.lower()
    if key in SCHEDULES:
        return SCHEDULES[key]
    return SCHEDULES[_DATASET_SCHEDULE.get(key, "coco")]


@dataclass
class OversegResult:
    """One image's oversegmentation.

    Attributes:
        edges: the detector output.
        ucm2: (2H+1, 2W+1) ultrametric contour map (BSDS layout).
        labels: (H, W) int32 regions 0..n_regions-1 at `threshold`.
        threshold: the level chosen by the schedule.
        n_regions: number of regions at that level.
    """

    edges: EdgeMap
    ucm2: np.ndarray
    labels: np.ndarray
    threshold: float
    n_regions: int


def choose_level(ucm2: np.ndarray, schedule: OversegSchedule) -> tuple[float, np.ndarray]:
    """First threshold t0 + k*step (k >= 0) with fewer than max_regions regions, and its labels.

    At t >= max(ucm2) a single region remains, so the search ends by k = ceil((max - t0)/step).
    """
    k_hi = max(0, math.ceil((float(ucm2.max()) - schedule.t0) / schedule.step))
    cache: dict[int, np.ndarray] = {}

    def labels_at(k: int) -> np.ndarray:
        if k not in cache:
            cache[k] = ucm_labels(ucm2, schedule.t0 + k * schedule.step)
        return cache[k]

    def ok(k: int) -> bool:
        return int(labels_at(k).max()) + 1 < schedule.max_regions

    lo, hi = 0, k_hi  # invariant: ok(hi); answer in [lo, hi]
    if ok(lo):
        hi = lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return round(schedule.t0 + hi * schedule.step, 10), labels_at(hi)


def oversegment(image: np.ndarray, detector: EdgeDetector, schedule: OversegSchedule) -> OversegResult:
    """Edges -> OWT-UCM -> labels at the schedule's level, for one (H, W, 3) uint8 RGB image."""
    edges = detector(image)
    ucm2 = owt_ucm(edges)
    t, labels = choose_level(ucm2, schedule)
    return OversegResult(edges=edges, ucm2=ucm2, labels=labels, threshold=t, n_regions=int(labels.max()) + 1)
