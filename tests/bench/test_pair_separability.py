"""The separability diagnostic's AUC and pair statistics against brute force / constructed cases."""
from __future__ import annotations

import itertools

import numpy as np
import torch

from bench.pair_separability import cell_labels, pair_stats, roc_auc


def test_roc_auc_matches_brute_force_pair_count():
    rng = np.random.default_rng(0)
    score = rng.normal(size=60)
    y = rng.random(60) < 0.3
    pos, neg = score[y], score[~y]
    brute = np.mean([float(p > n) for p, n in itertools.product(pos, neg)])
    assert abs(roc_auc(score, y) - brute) < 1e-12
    assert roc_auc([0.1, 0.9], [False, True]) == 1.0
    assert roc_auc([0.9, 0.1], [False, True]) == 0.0
    assert np.isnan(roc_auc([0.1, 0.2], [True, True]))


def test_cell_labels_samples_cell_centres():
    label = np.repeat(np.arange(4)[None, :], 2, axis=0).repeat(2, axis=1)  # (2, 8): 0 0 1 1 2 2 3 3
    assert cell_labels(label, (1, 4)).tolist() == [[0, 1, 2, 3]]


def test_pair_stats_perfect_features_and_shift_counts():
    # features = one-hot of the class (+ a little noise): cosine separates same / different class perfectly
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (6, 8, 8), generator=g)
    labels[0, 0, 0] = -1  # an ignore pixel is excluded from every count
    feats = torch.nn.functional.one_hot(labels.clamp(min=0), 3).permute(0, 3, 1, 2).float()
    feats = feats + 0.01 * torch.rand(feats.shape, generator=g)
    pairs = {"self": [(i, i) for i in range(6)], "knn": [(i, (i + 1) % 6) for i in range(6)],
             "random": [(i, (i + 3) % 6) for i in range(6)]}
    out = pair_stats(feats, labels, pairs, {"self": 0.5, "knn": 0.5, "random": 2.0}, points=16)
    for term in ("self", "knn", "random"):
        assert out[term]["auc_cosine"] > 0.999
        assert 0.2 < out[term]["same_class_rate"] < 0.6
    assert out["random"]["frac_above_shift"] == 0.0 and out["random"]["recall_above_shift"] == 0.0
    # with a shift between the two cosine levels, the above-shift pairs are exactly the same-class ones
    # (centring moves a row by its mean, so precision is high but need not be exactly 1)
    assert out["self"]["precision_above_shift"] > 0.9
