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
