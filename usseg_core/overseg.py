"""HSG's edge-based oversegmentation: edges -> OWT-UCM -> one partition per image (docs/methods/hsg.md §1.1, docs/methods/protocol.md S4).

Threshold schedule (HSG `[001]` §5.8): start at an initial UCM threshold t0 and raise it until the
number of regions drops below a cap. The paper does not state the step; we use 0.01 (inferred: the
UCM levels live in [0, 1] and 0.01 is the granularity of the BSDS threshold grid; a finer step only
moves the chosen level within the same UCM gap). Because the region count is monotone in the
threshold we find the first schedule step below the cap by bisection over the step grid, which is
exactly the linear scan's answer.

Reading the stage's artifact back (:class:`SegmentFolder`) lives here too, so the file layout
(``segments/<stem>.png``, :func:`segment_stem`) has one definition for writer and reader.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from usseg_core.datasets.protocol import SCHEDULES, OversegSchedule
from usseg_core.edges import EdgeDetector, EdgeMap
from usseg_core.errors import ConfigError, InputError

__all__ = ["OversegSchedule", "SCHEDULES", "schedule_for_dataset", "OversegSettings", "OversegResult",
           "oversegment", "choose_level", "segment_stem", "SegmentFolder"]


def schedule_for_dataset(dataset_name: str) -> OversegSchedule:
    """The schedule a registered dataset declares (``protocol.overseg_schedule``, e.g. "cocostuff27" -> coco).

    Raises:
        ConfigError: unknown dataset ("unknown dataset 'x'; known: ...").
    """
    from usseg_core.datasets.registry import dataset_protocol  # lazy: the CLI imports this module at start-up

    return SCHEDULES[dataset_protocol(dataset_name).overseg_schedule]


DEFAULT_DETECTOR = "classical"  # the edge detector that needs no weights file


@dataclass(frozen=True)
class OversegSettings:
    """How a pipeline run oversegments its training images (``--set overseg.<field>=...``)."""

    detector: str = DEFAULT_DETECTOR  # edge-detector registry name; "classical" needs no weight file
    weights: str | None = None  # the detector's weights file (learned detectors)
    t0: float | None = None  # initial UCM threshold; None: the dataset's schedule
    max_regions: int | None = None  # region cap; None: the dataset's schedule

    def __post_init__(self) -> None:
        if not isinstance(self.detector, str) or (self.weights is not None and not isinstance(self.weights, str)):
            raise ConfigError(f"overseg.detector / overseg.weights must be strings, got {self.detector!r} / "
                              f"{self.weights!r}")
        if self.t0 is not None and (isinstance(self.t0, bool) or not isinstance(self.t0, (int, float))):
            raise ConfigError(f"overseg.t0 must be a number in [0, 1], got {self.t0!r}")
        m = self.max_regions
        if m is not None and (isinstance(m, bool) or not isinstance(m, int)):
            raise ConfigError(f"overseg.max_regions must be an integer >= 2, got {self.max_regions!r}")
        from usseg_core.edges import BUILTIN_DETECTORS, list_edge_detectors

        # a built-in name is valid without importing the detectors (torch, scipy, scikit-image)
        if self.detector not in BUILTIN_DETECTORS and self.detector not in list_edge_detectors():
            raise ConfigError(f"overseg.detector={self.detector!r}: unknown edge detector; known: "
                              f"{', '.join(list_edge_detectors())}")
        if self.weights is not None and not Path(self.weights).is_file():
            raise InputError(self.weights, "overseg.weights: no such edge-detector weights file")

    def schedule(self, dataset_name: str) -> OversegSchedule:
        """The dataset's schedule (:func:`schedule_for_dataset`) with ``t0`` / ``max_regions`` replaced."""
        base = schedule_for_dataset(dataset_name)
        return OversegSchedule(base.t0 if self.t0 is None else float(self.t0),
                               base.max_regions if self.max_regions is None else int(self.max_regions), base.step)


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
    from usseg_core.ucm import ucm_labels  # lazy: scipy / scikit-image only where a UCM is cut

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
    from usseg_core.ucm import owt_ucm

    ucm2 = owt_ucm(edges)
    t, labels = choose_level(ucm2, schedule)
    return OversegResult(edges=edges, ucm2=ucm2, labels=labels, threshold=t, n_regions=int(labels.max()) + 1)


def segment_stem(image_id: str) -> str:
    """File stem of an image's files in an oversegment artifact (ids may hold "/")."""
    return image_id.replace("/", "__")


class SegmentFolder:
    """The region maps of an oversegment artifact, in the order of ``ids`` (the manifest's order).

    ``folder[i]`` is image ``ids[i]``'s OWT-UCM partition: an (H, W) int32 array of region labels
    0..n-1 at the original image size, read from ``<path>/segments/<stem>.png`` (8- or 16-bit PNG).

    Args:
        path: the artifact folder (``storage/oversegment/<key>``), holding ``segments/``.
        ids: image ids, in the order the consumer indexes them (the view bank's image order).

    Raises:
        InputError: naming the folder when ``segments/`` is absent or lacks an image's PNG (at
            construction), or naming the PNG when it cannot be decoded (at ``folder[i]``).
    """

    def __init__(self, path: str | Path, ids: Sequence[str]) -> None:
        self.path = Path(path)
        self.ids = list(ids)
        self.root = self.path / "segments"
        if not self.root.is_dir():
            raise InputError(self.root, "no segments folder here (expected an oversegment artifact folder)")
        present = {p.name for p in self.root.iterdir()}
        missing = [i for i in self.ids if f"{segment_stem(i)}.png" not in present]
        if missing:
            raise InputError(self.file(self.ids.index(missing[0])),
                             f"missing region map ({len(missing)} of {len(self.ids)} images have none); "
                             "re-run the oversegment stage")
        self._cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.ids)

    def file(self, i: int) -> Path:
        """The PNG of image ``ids[i]``."""
        return self.root / f"{segment_stem(self.ids[i])}.png"

    def _read(self, i: int) -> np.ndarray:
        from PIL import Image

        path = self.file(i)
        try:
            with Image.open(path) as im:
                seg = np.asarray(im)
        except FileNotFoundError:
            raise InputError(path, "missing region map; re-run the oversegment stage") from None
        except Exception as exc:  # noqa: BLE001 - any undecodable file is the same user problem
            raise InputError(path, f"unreadable region map ({exc})") from exc
        if seg.ndim != 2 or seg.dtype.kind not in "iu":
            raise InputError(path, f"not a region map: {seg.ndim}-d {seg.dtype} image, expected one integer channel")
        return seg  # uint8 / uint16 as stored: 1-2 bytes per pixel while cached

    def __getitem__(self, i: int) -> np.ndarray:
        """(H, W) int32 region labels of image ``ids[i]``."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"segment map {i} of {len(self)}")
        i %= len(self)
        seg = self._cache.get(i)
        if seg is None:
            seg = self._read(i)
        return seg.astype(np.int32)

    def load_all(self, max_bytes: int = 2 << 30) -> bool:
        """Keep the region maps in memory (compact dtype) while they fit in ``max_bytes``; True when all do.

        Reads every file once, so it also checks that each one decodes.
        """
        used = sum(a.nbytes for a in self._cache.values())
        for i in range(len(self)):
            if i in self._cache:
                continue
            seg = self._read(i)
            if used + seg.nbytes > max_bytes:
                return False
            self._cache[i] = seg
            used += seg.nbytes
        return True
