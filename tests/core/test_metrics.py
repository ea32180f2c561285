"""ConfusionMatrix / hungarian_scores / identity_scores against hand-computed values."""
import numpy as np
import pytest
import torch

from usseg_core.metrics import ConfusionMatrix, hungarian_scores, identity_scores


def test_confusion_matrix_counts_and_ignores():
    pred = np.array([[0, 1, 2], [2, 1, 0]])
    label = np.array([[0, -1, 2], [1, 1, -1]])
    cm = ConfusionMatrix(3, 3)
    cm.update(pred, label)
    expected = np.zeros((3, 3), np.int64)
    expected[0, 0] = expected[2, 2] = expected[2, 1] = expected[1, 1] = 1
    np.testing.assert_array_equal(cm.matrix, expected)
    assert cm.matrix.dtype == np.int64
    # torch input, merge of shards = one big update
    other = ConfusionMatrix(3, 3)
    other.update(torch.tensor([0, 0, 2]), torch.tensor([1, 1, -1]))
    cm.merge(other)
    expected[0, 1] += 2
    np.testing.assert_array_equal(cm.matrix, expected)


def test_confusion_matrix_rejects_bad_ids():
    cm = ConfusionMatrix(2, 3)
    with pytest.raises(ValueError, match="pred"):
        cm.update(np.array([0, 2]), np.array([0, 1]))  # 2 >= n_pred
    with pytest.raises(ValueError, match="pred"):
        cm.update(np.array([-1, 0]), np.array([-1, 1]))  # negative pred even on an ignored pixel
    with pytest.raises(ValueError, match="label"):
        cm.update(np.array([0, 1]), np.array([0, 3]))
    with pytest.raises(ValueError, match="shape"):
        cm.update(np.array([0, 1]), np.array([0, 1, 1]))
    with pytest.raises(ValueError):
        cm.merge(ConfusionMatrix(3, 3))
    assert cm.matrix.sum() == 0  # failed updates leave no partial counts


def test_hungarian_square_hand_computed():
    cm = np.array([[10, 2, 0],
                   [1, 0, 8],
                   [3, 7, 1]])
    s = hungarian_scores(cm)
    np.testing.assert_array_equal(s.assignment, [0, 2, 1])
    assert s.accuracy == pytest.approx(25 / 32)
    np.testing.assert_allclose(s.iou, [10 / 16, 7 / 13, 8 / 10])
    assert s.miou == pytest.approx((10 / 16 + 7 / 13 + 8 / 10) / 3)
    np.testing.assert_array_equal(s.matrix, [[10, 2, 0], [3, 7, 1], [1, 0, 8]])


def test_permuted_perfect_prediction_scores_one():
    rng = np.random.default_rng(0)
    label = rng.integers(-1, 5, size=(4, 32, 32))  # includes ignore pixels
    perm = rng.permutation(5)
    pred = perm[np.clip(label, 0, None)]
    pred[label < 0] = rng.integers(0, 5, size=(label < 0).sum())  # anything at ignored pixels
    cm = ConfusionMatrix(5, 5)
    cm.update(pred, label)
    s = hungarian_scores(cm.matrix)
    assert s.accuracy == 1.0 and s.miou == 1.0
    np.testing.assert_array_equal(s.assignment[perm], np.arange(5))


OVER = np.array([[10, 0, 0],
                 [0, 8, 1],
                 [0, 0, 6],
                 [4, 1, 0],
                 [0, 3, 2]])  # 5 clusters, 3 classes, 35 pixels


def test_overclustering_unmatched_wrong():
    s = hungarian_scores(OVER, overcluster="unmatched-wrong")
    np.testing.assert_array_equal(s.assignment, [0, 1, 2, -1, -1])
    assert s.accuracy == pytest.approx(24 / 35)  # unmatched pixels stay in the denominator
    np.testing.assert_allclose(s.iou, [10 / 14, 8 / 13, 6 / 9])
    assert s.miou == pytest.approx((10 / 14 + 8 / 13 + 6 / 9) / 3)


def test_overclustering_majority():
    s = hungarian_scores(OVER, overcluster="majority")
    np.testing.assert_array_equal(s.assignment, [0, 1, 2, 0, 1])
    assert s.accuracy == pytest.approx(31 / 35)
    np.testing.assert_allclose(s.iou, [14 / 15, 11 / 15, 6 / 9])
    np.testing.assert_array_equal(s.matrix, [[14, 1, 0], [0, 11, 3], [0, 0, 6]])
    assert s.miou == pytest.approx((14 / 15 + 11 / 15 + 6 / 9) / 3)


def test_underclustering_leaves_class_at_zero():
    cm = np.array([[5, 1, 0],
                   [0, 2, 7]])
    s = hungarian_scores(cm)
    np.testing.assert_array_equal(s.assignment, [0, 2])
    assert s.accuracy == pytest.approx(12 / 15)
    np.testing.assert_allclose(s.iou, [5 / 6, 0.0, 7 / 9])
    assert s.miou == pytest.approx((5 / 6 + 7 / 9) / 3)


def test_identity_scores_and_absent_class_is_nan():
    cm = np.array([[3, 1, 0],
                   [0, 4, 0],
                   [0, 0, 0]])
    s = identity_scores(cm)
    assert s.accuracy == pytest.approx(7 / 8)
    assert np.isnan(s.iou[2])
    assert s.miou == pytest.approx((3 / 4 + 4 / 5) / 2)
    # identity does not permute: a permuted perfect prediction scores 0
    assert identity_scores(np.array([[0, 5], [5, 0]])).accuracy == 0.0
    with pytest.raises(ValueError):
        identity_scores(OVER)


def test_bad_overcluster_mode():
    with pytest.raises(ValueError, match="overcluster"):
        hungarian_scores(OVER, overcluster="drop")


def _reference_unsupervised_metrics(cm: np.ndarray) -> tuple[float, float]:
    """[code:STEGO] src/utils.py UnsupervisedMetrics, transcribed literally, with a brute-force assignment.

    ``cm`` is (n_pred, n_classes) = STEGO's ``stats`` before its update() mask; returns (mIoU, accuracy).
    """
    import itertools

    n_pred, n_classes = cm.shape
    stats = cm.astype(np.float64).copy()
    stats[n_classes:] = 0  # update(): (preds >= 0) & (preds < n_classes)
    # brute-force maximum-weight assignment of classes to distinct clusters (no ties in the fixtures)
    best = max(itertools.permutations(range(n_pred), n_classes),
               key=lambda perm: sum(stats[perm[c], c] for c in range(n_classes)))
    matched_rows = list(best)  # assignments_t[1]: the cluster of each class
    histogram = stats[matched_rows, :]
    missing = sorted(set(range(n_pred)) - set(matched_rows))
    new_row = stats[missing, :].sum(0, keepdims=True)
    histogram = np.concatenate([histogram, new_row], axis=0)
    histogram = np.concatenate([histogram, np.zeros((n_classes + 1, 1))], axis=1)
    tp = np.diag(histogram)
    fp = histogram.sum(0) - tp
    fn = histogram.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = tp / (tp + fp + fn)
    return float(iou[~np.isnan(iou)].mean()), float(tp.sum() / histogram.sum())


@pytest.mark.parametrize("cm", [
    # 4 clusters, 2 classes; cluster 3 (>= n_classes) holds pixels that the reference drops
    np.array([[50, 4], [3, 40], [0, 0], [7, 9]]),
    # the dropped clusters 2 and 3 would win class 1 under the default; the reference matches cluster 1
    np.array([[60, 2], [20, 1], [1, 30], [5, 5]]),
    # 3 classes, 5 clusters, every kind of leftover
    np.array([[40, 2, 1], [3, 35, 2], [9, 1, 2], [2, 2, 30], [6, 7, 8]]),
])
def test_reference_drop_matches_stego_unsupervised_metrics(cm):
    s = hungarian_scores(cm, overcluster="reference-drop")
    miou, acc = _reference_unsupervised_metrics(cm)
    assert s.miou == pytest.approx(miou, abs=1e-12)
    assert s.accuracy == pytest.approx(acc, abs=1e-12)
    # and it really differs from the stricter default on these inputs
    d = hungarian_scores(cm, overcluster="unmatched-wrong")
    assert (d.miou, d.accuracy) != pytest.approx((s.miou, s.accuracy))


def test_miou_over_classes_is_hsg_benchmark_sum_over_num_classes():
    from usseg_core.metrics import miou_over_classes

    # rows = prediction, cols = ground truth; class 2 absent from both, class 3 predicted but absent in gt
    cm = np.array([[4, 1, 0, 0],
                   [0, 3, 0, 0],
                   [0, 0, 0, 0],
                   [1, 0, 0, 0]])
    sc = identity_scores(cm)
    # IoU: c0 = 4 / (4 + 1 + 1) = 2/3, c1 = 3 / (3 + 0 + 1) = 3/4, c2 = 0/0, c3 = 0 / (0 + 1 + 0) = 0
    assert sc.miou == pytest.approx((2 / 3 + 3 / 4 + 0) / 3)  # ours: the absent class left out
    assert sc.miou_over_classes == pytest.approx((2 / 3 + 3 / 4 + 0 + 0) / 4)  # HSG: Σ IoU / 4
    assert miou_over_classes(sc.iou) == sc.miou_over_classes
    assert identity_scores(np.eye(3, dtype=int)).miou_over_classes == pytest.approx(1.0)
