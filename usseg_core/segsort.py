"""Per-image segments of an embedding map (SegSort / HSG, docs/methods/hsg.md §1.1–1.3).

- :func:`grid_kmeans`: spherical k-means of every map of a batch *separately*, initialised from a
  spatial grid (cluster ``k`` starts as the mean of grid cell ``k``: SegSort's initialisation, which HSG
  inherits; the paper only says "4 x 4 segments per crop", reading it as a grid is docs/methods/hsg.md §1.1's
  inference). HSG's G0 in training (4 x 4, 15 iterations) and at test time (n0 = a grid per dataset).
- :func:`compact_ids` / :func:`segment_means`: segment ids made contiguous and their L2-normalised
  mean embeddings u_s (HSG Eq. 3's segment feature).

All functions are batched torch code (CPU or CUDA), no Python loop over pixels or segments.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["grid_init_labels", "grid_kmeans", "compact_ids", "segment_means"]

# The test-time n0 of each dataset is part of its protocol (``DatasetProtocol.hsg_test_grid``, HSG [001] §1.3:
# 6 x 6 for VOC / COCO-stuff / Potsdam, 12 x 24 for Cityscapes, 6 x 12 for KITTI-STEP).


def grid_init_labels(h: int, w: int, grid: tuple[int, int], device=None) -> Tensor:
    """(h, w) long: the index ``row * gw + col`` of the grid cell containing each pixel."""
    gh, gw = grid
    ry = (torch.arange(h, device=device) * gh) // h  # (h,)
    rx = (torch.arange(w, device=device) * gw) // w  # (w,)
    return ry[:, None] * gw + rx[None, :]


def _means(x: Tensor, labels: Tensor, k: int) -> tuple[Tensor, Tensor]:
    # x (B, N, D), labels (B, N) in [0, k) -> sums (B, k, D), counts (B, k)
    onehot = F.one_hot(labels, k).to(x.dtype)  # (B, N, k)
    return onehot.transpose(1, 2) @ x, onehot.sum(1)


@torch.no_grad()
def grid_kmeans(emb: Tensor, grid: tuple[int, int], iters: int = 15,
                mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Spherical k-means of each map of ``emb`` (B, D, h, w) (rows L2-normalised) with K = gh * gw.

    Args:
        emb: unit-norm embeddings per pixel.
        grid: (gh, gw) initial partition; K = gh * gw clusters.
        iters: assignment / update rounds after the grid initialisation (HSG: 15).
        mask: optional (B, h, w) bool, pixels that take part (others get label -1).

    Returns:
        labels (B, h, w) long in [0, K) (or -1 outside ``mask``), centroids (B, K, D) unit norm, counts
        (B, K) pixels per cluster at the end. An emptied cluster keeps its last centroid (count 0), so
        ids stay stable and the count says which clusters exist.
    """
    B, D, h, w = emb.shape
    K = grid[0] * grid[1]
    x = emb.flatten(2).transpose(1, 2)  # (B, N, D)
    valid = None if mask is None else mask.reshape(B, -1)
    labels = grid_init_labels(h, w, grid, emb.device).reshape(1, -1).expand(B, -1)  # (B, N)

    def update(lab: Tensor, prev: Tensor | None) -> tuple[Tensor, Tensor]:
        if valid is not None:
            lab = torch.where(valid, lab, torch.full_like(lab, K))  # a spare cluster K collects the rest
        sums, counts = _means(x, lab, K + 1)
        sums, counts = sums[:, :K], counts[:, :K]
        cents = F.normalize(sums, dim=-1)
        if prev is not None:
            cents = torch.where(counts[..., None] > 0, cents, prev)
        return cents, counts

    cents, counts = update(labels, None)
    for _ in range(iters):
        sim = x @ cents.transpose(1, 2)  # (B, N, K)
        sim = sim.masked_fill(counts[:, None, :] == 0, float("-inf")) if (counts == 0).any() else sim
        labels = sim.argmax(-1)
        cents, counts = update(labels, cents)
    if valid is not None:
        labels = torch.where(valid, labels, torch.full_like(labels, -1))
    return labels.reshape(B, h, w), cents, counts


def compact_ids(ids: Tensor) -> tuple[Tensor, Tensor]:
    """Contiguous relabelling of integer ids (any shape; negative = none, kept as -1).

    Returns (new ids, same shape, in [0, S)), and the S original ids in increasing order.
    """
    flat = ids.reshape(-1)
    keep = flat >= 0
    uniq, inv = torch.unique(flat[keep], return_inverse=True)
    out = torch.full_like(flat, -1)
    out[keep] = inv
    return out.reshape(ids.shape), uniq


def segment_means(emb: Tensor, seg: Tensor, n_segments: int) -> tuple[Tensor, Tensor]:
    """u_s = normalize(mean of the embeddings of segment s) for every segment id in [0, n_segments).

    Args:
        emb: (N, D) pixel embeddings (any norm); differentiable.
        seg: (N,) long segment id per pixel, -1 = no segment.
    Returns:
        (S, D) unit prototypes (zero rows for empty ids) and (S,) pixel counts.
    """
    keep = seg >= 0
    sums = torch.zeros(n_segments, emb.shape[1], dtype=emb.dtype, device=emb.device)
    sums = sums.index_add(0, seg[keep], emb[keep])
    counts = torch.bincount(seg[keep], minlength=n_segments)
    return F.normalize(sums, dim=-1), counts
