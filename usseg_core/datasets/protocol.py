"""The protocol a dataset declares: where its folder is, how usseg trains and evaluates on it.

Every registered dataset class sets ``protocol = DatasetProtocol(...)`` in its own body
(:func:`~usseg_core.datasets.registry.register_dataset` refuses a class without one). The fields have no
defaults, so a dataset cannot forget one and silently inherit another's choice; a test walks every
registered dataset and every built-in head (whose per-dataset presets live in the head's own table,
beside the config they override).

Torch-free: the evaluation view is built on demand (:meth:`DatasetProtocol.eval_view`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from usseg_core.errors import ConfigError

# How segment retrieval labels its memory segments (usseg_core.retrieval): "valid-majority" (ours: majority over
# the labelled pixels) | "reference" (twke18/HSG utils/segsort/common.py:221-267: majority over every pixel, 255
# included, then the segments whose majority is 255 dropped)
RETRIEVAL_LABELS = ("valid-majority", "reference")

if TYPE_CHECKING:  # views imports torch; the protocol stays importable without it
    from usseg_core.views import ViewSpec


# HSG's oversegmentation schedules, one per dataset family (a dataset names its own in its protocol).
@dataclass(frozen=True)
class OversegSchedule:
    """Raise the UCM threshold from t0 in `step`s until fewer than `max_regions` regions remain."""

    t0: float  # initial threshold (HSG [001] §5.8)
    max_regions: int  # stop when #regions < max_regions (HSG [001] §5.8)
    step: float = 0.01  # not stated in HSG; inferred (see usseg_core/overseg.py)

    def __post_init__(self) -> None:
        if not 0.0 <= self.t0 <= 1.0:
            raise ConfigError(f"OversegSchedule.t0 must be in [0, 1], got {self.t0}")
        if self.max_regions < 2:
            raise ConfigError(f"OversegSchedule.max_regions must be >= 2, got {self.max_regions}")
        if not self.step > 0:
            raise ConfigError(f"OversegSchedule.step must be > 0, got {self.step}")


# docs/methods/hsg.md §1.1 table; the pairing of the PMI values by order is inferred there.
SCHEDULES: dict[str, OversegSchedule] = {
    "coco": OversegSchedule(0.25, 48),  # MSCOCO / COCO-stuff, SE edges
    "cityscapes": OversegSchedule(0.05, 1024),  # Cityscapes / KITTI-STEP, PMI edges
    "potsdam": OversegSchedule(0.5, 128),  # Potsdam, PMI edges
}


EVAL_POLICIES = ("center_crop", "full")  # usseg_core.views policies an evaluation may use
TRAIN_POLICIES = ("five_crop", "center_crop")
CROP_RESIZES = ("short_side", "squash")  # usseg_core.views.CROP_RESIZES


@dataclass(frozen=True)
class DatasetProtocol:
    """How usseg trains and evaluates on one dataset.

    Attributes:
        folder: subfolder of ``$USSEG_DATA_ROOT`` holding the dataset, also the dataset part of deployment
            names (``train-stego/camvid``); None for a user's folder, given with ``--data-root`` only.
        eval_policy: evaluation view (docs/methods/protocol.md §5 S8): ``"center_crop"`` (short side to ``eval_size``,
            centre square) or ``"full"`` (the whole frame).
        eval_size: the centre crop's side (STEGO's 320); None for ``"full"`` (the run's resolution).
        train_policy: the five-crop heads' (STEGO, OMH) training view: ``"five_crop"`` or ``"center_crop"``.
        train_crop_resize: how a five-crop becomes square: ``"short_side"`` (STEGO) or ``"squash"``.
        overseg_schedule: HSG's UCM threshold schedule, a key of :data:`SCHEDULES`.
        hsg_test_grid: HSG's test-time n0, the (rows, cols) grid of its per-image k-means (HSG [001] §1.3).
        retrieval_labels: how segment retrieval labels its memory segments (``usseg_core.retrieval.RETRIEVAL_LABELS``):
            ``"reference"`` (twke18/HSG: majority over every pixel, 255 included, then segments whose majority
            is 255 dropped) or ``"valid-majority"`` (ours: majority over the labelled pixels).
    """

    folder: str | None
    eval_policy: str
    eval_size: int | None
    train_policy: str
    train_crop_resize: str
    overseg_schedule: str
    hsg_test_grid: tuple[int, int]
    retrieval_labels: str

    def __post_init__(self) -> None:
        checks = [
            (self.eval_policy in EVAL_POLICIES, f"eval_policy {self.eval_policy!r}: valid {', '.join(EVAL_POLICIES)}"),
            ((self.eval_size is None) == (self.eval_policy == "full"),
             f"eval_size {self.eval_size!r}: a positive side for center_crop, None for full"),
            (self.eval_size is None or self.eval_size > 0, f"eval_size {self.eval_size!r} must be positive"),
            (self.train_policy in TRAIN_POLICIES,
             f"train_policy {self.train_policy!r}: valid {', '.join(TRAIN_POLICIES)}"),
            (self.train_crop_resize in CROP_RESIZES,
             f"train_crop_resize {self.train_crop_resize!r}: valid {', '.join(CROP_RESIZES)}"),
            (self.overseg_schedule in SCHEDULES,
             f"overseg_schedule {self.overseg_schedule!r}: valid {', '.join(SCHEDULES)}"),
            (len(self.hsg_test_grid) == 2 and min(self.hsg_test_grid) >= 1,
             f"hsg_test_grid {self.hsg_test_grid!r}: two positive ints (rows, cols)"),
            (self.retrieval_labels in RETRIEVAL_LABELS,
             f"retrieval_labels {self.retrieval_labels!r}: valid {', '.join(RETRIEVAL_LABELS)}"),
        ]
        wrong = [message for ok, message in checks if not ok]
        if wrong:
            raise ConfigError("dataset protocol: " + "; ".join(wrong))
        object.__setattr__(self, "hsg_test_grid", (int(self.hsg_test_grid[0]), int(self.hsg_test_grid[1])))

    @property
    def eval_policy_name(self) -> str:
        """The legacy one-word form, ``"center_crop_320"`` or ``"full"`` (``Dataset.eval_policy``)."""
        return "full" if self.eval_policy == "full" else f"center_crop_{self.eval_size}"

    def eval_view(self, resolution: int | None = None) -> ViewSpec:
        """The evaluation view, optionally at another resolution (``None``: the protocol's own size).

        At the training resolution it is also the view bank's base frame: the whole evaluation frame, smaller.
        """
        from usseg_core.views import ViewSpec

        if self.eval_policy == "full":
            return ViewSpec("full", resolution)
        return ViewSpec("center_crop", resolution or self.eval_size)
