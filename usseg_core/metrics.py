"""Segmentation metrics: a streaming confusion matrix and Hungarian / identity scoring (docs/methods/protocol.md S8).

One (n_pred x n_classes) confusion matrix is accumulated over the whole split (never averaged per
image), then scored once:

* ``hungarian_scores`` -- unsupervised protocol of PiCIE / STEGO / OMH: clusters are matched to classes
  by a maximum-weight assignment (``scipy.optimize.linear_sum_assignment(maximize=True)``, as in
  [code:STEGO] ``UnsupervisedMetrics``).
* ``identity_scores`` -- linear probe: prediction index == class index, no matching.

Unlike [code:STEGO], every valid pixel stays in the denominator: with more clusters than classes the
reference drops pixels predicted as an extra cluster (docs/references.md §1.1, "mask bug"); here they count
as errors ("unmatched-wrong", the default) or go to their cluster's majority class ("majority").
"reference-drop" reproduces the reference protocol for comparison with published numbers.

All values are fractions in [0, 1]; multiply by 100 only when printing a table.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from usseg_core.spec import DEFAULT_OVERCLUSTER, OVERCLUSTER_MODES  # the run option's one definition


def _to_numpy_int(a: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    a = np.asarray(a)
    if not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"expected an integer array, got dtype {a.dtype}")
    return a.astype(np.int64, copy=False).ravel()


class ConfusionMatrix:
    """Streaming confusion counts; rows = predicted cluster/class, columns = ground-truth class.

    Args:
        n_pred: number of predicted ids (clusters or probe classes); predictions must lie in [0, n_pred).
        n_classes: number of ground-truth classes; labels < 0 are ignored, labels >= n_classes are an error.
    """

    def __init__(self, n_pred: int, n_classes: int) -> None:
        if n_pred < 1 or n_classes < 1:
            raise ValueError(f"n_pred and n_classes must be >= 1, got {n_pred}, {n_classes}")
        self.n_pred = int(n_pred)
        self.n_classes = int(n_classes)
        self.matrix = np.zeros((self.n_pred, self.n_classes), dtype=np.int64)  # (n_pred, n_classes)

    def update(self, pred: np.ndarray | torch.Tensor, label: np.ndarray | torch.Tensor) -> None:
        """Add one batch. ``pred`` and ``label`` have the same shape (any); label -1 (any negative) = ignore.

        Raises ValueError on a shape mismatch, a prediction outside [0, n_pred) or a label >= n_classes:
        an out-of-range id is a bug upstream and must never be dropped silently.
        """
        if tuple(pred.shape) != tuple(label.shape):
            raise ValueError(f"pred shape {tuple(pred.shape)} != label shape {tuple(label.shape)}")
        p = _to_numpy_int(pred)  # (P,)
        y = _to_numpy_int(label)  # (P,)
        if p.size and (p.min() < 0 or p.max() >= self.n_pred):
            raise ValueError(
                f"pred has values in [{p.min()}, {p.max()}], outside [0, {self.n_pred}) (n_pred={self.n_pred})"
            )
        if y.size and y.max() >= self.n_classes:
            raise ValueError(
                f"label has value {y.max()} >= n_classes={self.n_classes}; use -1 for ignored pixels"
            )
        valid = y >= 0
        flat = p[valid] * self.n_classes + y[valid]  # (P_valid,) row-major index into the matrix
        counts = np.bincount(flat, minlength=self.n_pred * self.n_classes)
        self.matrix += counts.reshape(self.n_pred, self.n_classes)

    def merge(self, other: ConfusionMatrix) -> None:
        """Add the counts of another matrix of the same size (sharded evaluation)."""
        if other.matrix.shape != self.matrix.shape:
            raise ValueError(f"cannot merge a {other.matrix.shape} matrix into a {self.matrix.shape} one")
        self.matrix += other.matrix

    def reset(self) -> None:
        self.matrix[:] = 0


@dataclass
class Scores:
    """Scores of one confusion matrix; all fractions in [0, 1].

    Attributes:
        accuracy: correctly mapped pixels / valid pixels.
        miou: mean IoU over classes present in ground truth or prediction (NaN IoUs excluded).
        iou: (n_classes,) per-class IoU, NaN for a class absent from both ground truth and prediction.
        assignment: (n_pred,) class index each predicted id maps to, -1 if unmatched.
        matrix: (n_classes, n_classes) confusion after mapping (rows = mapped prediction, cols = gt);
            pixels of unmatched clusters are not in it (they count as errors in accuracy and IoU).
    """

    accuracy: float
    miou: float
    iou: np.ndarray
    assignment: np.ndarray
    matrix: np.ndarray

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        """Flat {name: value} for logging; values stay fractions."""
        return {f"{prefix}accuracy": self.accuracy, f"{prefix}miou": self.miou}

    @property
    def miou_over_classes(self) -> float:
        """Σ IoU / n_classes: a class absent from both ground truth and prediction counts as IoU 0
        (:func:`miou_over_classes`; twke18/HSG's benchmark). ``miou`` leaves such a class out."""
        return miou_over_classes(self.iou)


def miou_over_classes(iou: np.ndarray) -> float:
    """twke18/HSG's mIoU (``pyscripts/benchmark/benchmark_by_mIoU.py:90-125``): Σ IoU / n_classes.

    Its IoU is tp / (tp + fp + fn + 1e-12), 0 for a class absent from both ground truth and prediction,
    and the sum is divided by every class. ``iou`` (n_classes,) with NaN for such classes (:class:`Scores`).
    Never above :attr:`Scores.miou`, equal when every class is present.
    """
    iou = np.asarray(iou, dtype=np.float64)
    return float(np.nansum(iou) / iou.size) if iou.size else float("nan")


def _scores_from_assignment(cm: np.ndarray, assignment: np.ndarray) -> Scores:
    """Score ``cm`` (n_pred, n_classes) under a cluster -> class map (-1 = unmatched)."""
    n_pred, n_classes = cm.shape
    total = cm.sum()
    mapped = np.zeros((n_classes, n_classes), dtype=np.int64)  # (n_classes, n_classes)
    matched = assignment >= 0
    # Several clusters may map to one class ("majority" mode): add their rows.
    np.add.at(mapped, assignment[matched], cm[matched])
    tp = np.diag(mapped).astype(np.float64)  # (n_classes,)
    fp = mapped.sum(axis=1) - tp  # predicted as c but labelled otherwise
    # fn from the raw columns so pixels of unmatched clusters are missed, not dropped.
    fn = cm.sum(axis=0) - tp
    denom = tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(denom > 0, tp / np.maximum(denom, 1), np.nan)
    present = ~np.isnan(iou)
    miou = float(iou[present].mean()) if present.any() else float("nan")
    accuracy = float(tp.sum() / total) if total > 0 else float("nan")
    return Scores(accuracy=accuracy, miou=miou, iou=iou, assignment=assignment, matrix=mapped)


def hungarian_scores(cm: np.ndarray, *, overcluster: str = DEFAULT_OVERCLUSTER) -> Scores:
    """Match clusters to classes by maximum-weight assignment, then score.

    Args:
        cm: (n_pred, n_classes) confusion counts, rows = clusters, cols = ground-truth classes.
        overcluster: what to do with clusters left unmatched when n_pred > n_classes:
            "unmatched-wrong" -- their pixels count as errors (kept in the denominator);
            "majority" -- each goes to its majority class (many-to-one);
            "reference-drop" -- [code:STEGO] ``UnsupervisedMetrics``: pixels predicted as a cluster index
            >= n_classes are dropped before anything else (its ``update`` mask), the assignment is computed
            on the remaining (n_pred x n_classes) histogram, clusters < n_classes left unmatched are summed
            into one extra row scored against an all-zero extra column (so when they hold pixels, an extra
            IoU of 0 enters the mean, and their pixels are misses of their classes), and accuracy is over
            the kept pixels only. ``iou`` stays per class (length n_classes).
            With n_pred < n_classes some classes get no cluster and IoU 0 (if present in gt).
    """
    if overcluster not in OVERCLUSTER_MODES:
        raise ValueError(f"overcluster must be one of {OVERCLUSTER_MODES}, got {overcluster!r}")
    cm = np.asarray(cm, dtype=np.int64)
    from scipy.optimize import linear_sum_assignment  # lazy: scipy.optimize is slow to import

    if overcluster == "reference-drop":
        return _reference_drop_scores(cm, linear_sum_assignment)
    rows, cols = linear_sum_assignment(cm, maximize=True)  # min(n_pred, n_classes) pairs
    assignment = np.full(cm.shape[0], -1, dtype=np.int64)  # (n_pred,)
    assignment[rows] = cols
    if overcluster == "majority":
        unmatched = np.flatnonzero((assignment < 0) & (cm.sum(axis=1) > 0))
        assignment[unmatched] = cm[unmatched].argmax(axis=1)
    return _scores_from_assignment(cm, assignment)


def _reference_drop_scores(cm: np.ndarray, linear_sum_assignment) -> Scores:
    """[code:STEGO] ``UnsupervisedMetrics`` (update mask + compute) on a (n_pred, n_classes) matrix."""
    n_pred, n_classes = cm.shape
    kept = cm.copy()
    kept[n_classes:] = 0  # update(): mask = ... & (preds < n_classes)
    rows, cols = linear_sum_assignment(kept, maximize=True)
    assignment = np.full(n_pred, -1, dtype=np.int64)
    assignment[rows] = cols
    sc = _scores_from_assignment(kept, assignment)
    # compute(): unmatched rows summed into an extra row against a zero column -> IoU 0 when non-empty.
    extra = kept[assignment < 0].sum()
    iou_all = np.append(sc.iou, 0.0 if extra > 0 else np.nan)
    present = ~np.isnan(iou_all)
    miou = float(iou_all[present].mean()) if present.any() else float("nan")
    return Scores(accuracy=sc.accuracy, miou=miou, iou=sc.iou, assignment=assignment, matrix=sc.matrix)


def identity_scores(cm: np.ndarray) -> Scores:
    """Score a linear probe: prediction i is class i, no matching. ``cm`` must be square."""
    cm = np.asarray(cm, dtype=np.int64)
    if cm.shape[0] != cm.shape[1]:
        raise ValueError(f"identity scoring needs a square confusion matrix, got {cm.shape}")
    return _scores_from_assignment(cm, np.arange(cm.shape[0], dtype=np.int64))
