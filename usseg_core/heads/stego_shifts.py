"""Automatic STEGO shifts b from the data's own feature-correlation statistics.

STEGO's shifts (paper Eq. 4-5) were tuned by hand per dataset and backbone, to keep the mean KNN code
correlation near 0.3 and random-pair code correlation near 0.0; users cannot reproduce them
(docs/references.md §3: STEGO #23, #63). In L = −max(S, 0)(F^SC − b) a pixel pair attracts exactly when its
centred feature correlation exceeds b, so b fixes *which fraction* of pairs attract. We measure F^SC for
self, KNN and random pairs on a sample of the training set and set each b to the (1 − target) quantile,
so that ``target`` of that term's pairs attract. The targets are configurable (StegoConfig.auto_targets).
The measurement uses the features without dropout; training computes F on dropped-out features
(Dropout2d p = 0.1), which moves individual cosines slightly but barely moves the quantiles.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from usseg_core.errors import ConfigError
from usseg_core.heads.stego import TERMS, derangement, feature_correlation, sample_points

# Quantile levels kept in the summary; 1 − target is linearly interpolated between them. Every
# multiple of 0.005 (e.g. target 0.15 or 0.25) is exact.
QUANTILE_LEVELS = np.linspace(0.0, 1.0, 201)


def summarize_correlations(values: dict[str, np.ndarray]) -> dict:
    """Per-term summary (mean, std, min, max, quantiles at QUANTILE_LEVELS) of correlation samples."""
    out: dict = {"quantile_levels": QUANTILE_LEVELS.tolist()}
    for term in TERMS:
        v = np.asarray(values[term], dtype=np.float64).ravel()
        out[term] = {
            "mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()), "max": float(v.max()),
            "count": int(v.size), "quantiles": np.quantile(v, QUANTILE_LEVELS).tolist(),
        }
    return out


def measure_correlations(features: Sequence, knn: np.ndarray, *, n_pairs: int = 256,
                         feature_samples: int = 11, pointwise: bool = True, seed: int = 0,
                         num_neighbors: int = 7, batch_size: int = 16) -> dict:
    """Centred feature correlations F^SC of self, KNN and random pairs, exactly as the loss sees them.

    Args:
        features: indexable, ``features[i]`` -> (C, h, w) array (float16 is converted to float32).
        knn: (N, k) int neighbour table, column 0 = the image itself; positives from columns 1..num_neighbors.
        n_pairs: images sampled (without replacement when N allows).
        feature_samples: S, points per side sampled per image (as training).
        pointwise: spatial centering as training.
        batch_size: pairs per centering batch — the global mean added back by the centering is a batch
            mean in training, so the measurement uses the training batch size.
    Returns:
        summarize_correlations() of the three terms plus the sampling parameters.
    """
    n = len(features)
    if n < 2:
        raise ConfigError(f"measure_correlations needs at least 2 images, got {n}")
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    idx = rng.choice(n, size=n_pairs, replace=n_pairs > n)
    s = feature_samples
    values: dict[str, list[np.ndarray]] = {t: [] for t in TERMS}
    for start in range(0, n_pairs, batch_size):
        b_idx = idx[start:start + batch_size]
        if len(b_idx) < 2:  # a lone leftover image has no random partner
            break
        pos_idx = knn[b_idx, rng.integers(1, num_neighbors + 1, size=len(b_idx))]
        feats = _stack(features, b_idx)  # (B, C, h, w)
        feats_pos = _stack(features, pos_idx)
        b = feats.shape[0]
        coords1 = torch.rand(b, s, s, 2, generator=gen) * 2 - 1  # (B, S, S, 2)
        coords2 = torch.rand(b, s, s, 2, generator=gen) * 2 - 1
        f1 = sample_points(feats, coords1)  # (B, C, S, S)
        f2 = sample_points(feats_pos, coords2)
        # Random partner = another position of the batch (a derangement), as in training. When n_pairs > N
        # the sample repeats images, so a partner is rarely the same image: negligible for a quantile.
        fn = sample_points(feats[derangement(b, gen)], coords2)
        for term, other in (("self", f1), ("knn", f2), ("random", fn)):
            values[term].append(feature_correlation(f1, other, pointwise=pointwise).numpy().ravel())
    stats = summarize_correlations({t: np.concatenate(v) for t, v in values.items()})
    stats.update(n_pairs=int(n_pairs), feature_samples=int(s), pointwise=bool(pointwise),
                 batch_size=int(batch_size), num_neighbors=int(num_neighbors), seed=int(seed))
    return stats


def choose_shifts(stats: dict, targets: Sequence[float] = (0.35, 0.45, 0.06)) -> tuple[float, float, float]:
    """Shift b per term (self, knn, random) such that a ``target`` fraction of F^SC exceeds it.

    b = the (1 − target) quantile, interpolated from the summary of measure_correlations.
    """
    if len(targets) != 3 or any(not 0.0 < t < 1.0 for t in targets):
        raise ConfigError(f"choose_shifts: targets must be three fractions in (0, 1), got {tuple(targets)}")
    levels = np.asarray(stats["quantile_levels"])
    return tuple(  # type: ignore[return-value]
        float(np.interp(1.0 - t, levels, np.asarray(stats[term]["quantiles"])))
        for term, t in zip(TERMS, targets)
    )


def _stack(features: Sequence, indices: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(features[int(i)], dtype=np.float32) for i in indices]))
