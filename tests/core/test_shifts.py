"""Automatic STEGO shifts: quantiles of the centred feature correlations."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from usseg_core.errors import ConfigError
from usseg_core.heads.stego_shifts import QUANTILE_LEVELS, choose_shifts, measure_correlations, summarize_correlations


pytestmark = pytest.mark.usefixtures("one_thread")


def test_choose_shifts_is_the_one_minus_target_quantile_on_grid_levels():
    rng = np.random.default_rng(0)
    values = {"self": rng.uniform(0, 1, 10_001), "knn": rng.normal(0.3, 0.1, 10_001),
              "random": rng.exponential(0.2, 10_001)}
    stats = summarize_correlations(values)
    targets = (0.25, 0.5, 0.15)  # 1 - t = 0.75, 0.5, 0.85 lie on the 0.005 grid: exact
    shifts = choose_shifts(stats, targets)
    for shift, term, t in zip(shifts, ("self", "knn", "random"), targets):
        assert shift == pytest.approx(np.quantile(values[term], 1 - t), abs=1e-12)
        assert np.mean(values[term] > shift) == pytest.approx(t, abs=1e-3)


def test_choose_shifts_interpolates_between_grid_levels():
    rng = np.random.default_rng(1)
    values = {t: rng.normal(0.0, 1.0, 50_000) for t in ("self", "knn", "random")}
    stats = summarize_correlations(values)
    shifts = choose_shifts(stats, (1 / 3, 0.1, 0.01))
    for shift, term, t in zip(shifts, ("self", "knn", "random"), (1 / 3, 0.1, 0.01)):
        assert shift == pytest.approx(np.quantile(values[term], 1 - t), abs=0.01)
        assert np.mean(values[term] > shift) == pytest.approx(t, abs=0.002)
    # larger target -> lower shift (more pairs attract)
    lo, hi = choose_shifts(stats, (0.5, 0.5, 0.5)), choose_shifts(stats, (0.1, 0.1, 0.1))
    assert all(a < b for a, b in zip(lo, hi))


def test_summary_keeps_moments_and_is_json_sized():
    values = {"self": np.array([0.0, 1.0]), "knn": np.array([2.0, 2.0]), "random": np.array([-1.0, 3.0])}
    stats = summarize_correlations(values)
    assert stats["self"]["mean"] == 0.5 and stats["knn"]["std"] == 0.0 and stats["random"]["max"] == 3.0
    assert len(stats["random"]["quantiles"]) == len(QUANTILE_LEVELS) == len(stats["quantile_levels"])


@pytest.mark.parametrize("bad", [(0.3, 0.3), (0.0, 0.3, 0.3), (0.3, 1.2, 0.1)])
def test_choose_shifts_rejects_bad_targets(bad):
    stats = summarize_correlations({t: np.arange(10.0) for t in ("self", "knn", "random")})
    with pytest.raises(ConfigError):
        choose_shifts(stats, bad)


def _two_class_features(n=20, c=12, h=6, seed=0):
    rng = np.random.default_rng(seed)
    protos = rng.normal(size=(2, c))
    feats = []
    for i in range(n):
        lab = np.zeros((h, h), int)
        lab[:, rng.integers(1, h - 1):] = 1
        if i % 2:
            lab = 1 - lab
        feats.append((protos[lab].transpose(2, 0, 1) + 0.5 * rng.normal(size=(c, h, h))).astype(np.float16))
    g = np.stack([f.astype(np.float32).mean((1, 2)) for f in feats])
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    knn = np.argsort(-g @ g.T, axis=1)[:, :8]
    return feats, knn


def test_measure_correlations_counts_determinism_and_ordering():
    feats, knn = _two_class_features()
    stats = measure_correlations(feats, knn, n_pairs=32, feature_samples=3, seed=0, batch_size=8)
    for term in ("self", "knn", "random"):
        assert stats[term]["count"] == 32 * 3 ** 4  # every (query, key) pair of every sampled image
        assert stats[term]["min"] <= stats[term]["mean"] <= stats[term]["max"]
    # an image agrees with itself more than with a random one (self pairs include F = 1 diagonals)
    assert stats["self"]["mean"] > stats["random"]["mean"]
    again = measure_correlations(feats, knn, n_pairs=32, feature_samples=3, seed=0, batch_size=8)
    assert again["knn"]["quantiles"] == stats["knn"]["quantiles"]
    other = measure_correlations(feats, knn, n_pairs=32, feature_samples=3, seed=1, batch_size=8)
    assert other["knn"]["quantiles"] != stats["knn"]["quantiles"]


def test_spatial_centering_preserves_each_batch_mean():
    """Centering subtracts per-query means and adds back the batch mean: term means are unchanged."""
    feats, knn = _two_class_features()
    kw = dict(n_pairs=32, feature_samples=3, seed=0, batch_size=8)
    centred = measure_correlations(feats, knn, pointwise=True, **kw)
    raw = measure_correlations(feats, knn, pointwise=False, **kw)
    for term in ("self", "knn", "random"):
        assert centred[term]["mean"] == pytest.approx(raw[term]["mean"], abs=1e-5)
        assert centred[term]["std"] < raw[term]["std"] + 1e-6  # removing per-query offsets shrinks spread


def test_measure_correlations_needs_two_images():
    with pytest.raises(ConfigError):
        measure_correlations([np.zeros((2, 3, 3), np.float16)], np.zeros((1, 8), int))
