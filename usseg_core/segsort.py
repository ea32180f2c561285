"""Per-image segments of an embedding map (SegSort / HSG, docs/methods/hsg.md §1.1–1.3).

- :func:`grid_kmeans`: spherical k-means of every map of a batch *separately*, initialised from a
  spatial grid (cluster ``k`` starts as the mean of grid cell ``k``: SegSort's initialisation, which HSG
  inherits; the paper only says "4 x 4 segments per crop", reading it as a grid is docs/methods/hsg.md §1.1's
  inference). HSG's G0 in training (4 x 4, 15 iterations) and at test time (n0 = a grid per dataset).
  Two options give [code:HSG]'s own clustering (``hsg/utils/segsort/common.py``, docs/methods/hsg.md,
  Deviations): ``init="reference"``, the grid of ``initialize_cluster_labels`` (cell of row y =
  round(y (gh − 1) / (h − 1)), so the edge cells are half as tall as the others), and ``location=True``,
  k-means on the renormalised concatenation [unit embedding, (y − 0.5, x − 0.5)] with y, x evenly spaced
  in [0, 1] (``segment_by_kmeans``); a cluster emptied on the way then keeps a zero prototype, as there.
- :func:`compact_ids` / :func:`segment_means`: segment ids made contiguous and their L2-normalised
  mean embeddings u_s (HSG Eq. 3's segment feature).

All functions are batched torch code (CPU or CUDA), no Python loop over pixels or segments.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["GRID_INITS", "grid_init_labels", "location_features", "grid_kmeans", "compact_ids", "segment_means"]

# The test-time n0 of each dataset is part of its protocol (``DatasetProtocol.hsg_test_grid``, HSG [001] §1.3:
# 6 x 6 for VOC / COCO-stuff / Potsdam, 12 x 24 for Cityscapes, 6 x 12 for KITTI-STEP).


GRID_INITS = ("floor", "reference")


def _grid_cells(n: int, g: int, init: str, device=None) -> Tensor:
    # (n,) long cell index along one axis in [0, g)
    if init == "floor":  # g equal cells: floor(i g / n)
        return (torch.arange(n, device=device) * g) // n
    # [code:HSG] initialize_cluster_labels: round(linspace(0, g - 1, n)), edge cells half-size
    return torch.linspace(0, g - 1, n, device=device).round().long()


def grid_init_labels(h: int, w: int, grid: tuple[int, int], device=None, init: str = "floor") -> Tensor:
    """(h, w) long: the index ``row * gw + col`` of the grid cell containing each pixel.

    ``init="floor"``: gh x gw equal cells (ours); ``"reference"``: [code:HSG]'s rounded linspace (the
    first and last rows / columns of cells half as large). The reference numbers a cell ``row + gh * col``;
    the partition is the same.
    """
    if init not in GRID_INITS:
        raise ValueError(f"init must be one of {GRID_INITS}, got {init!r}")
    gh, gw = grid
    return _grid_cells(h, gh, init, device)[:, None] * gw + _grid_cells(w, gw, init, device)[None, :]


def location_features(h: int, w: int, device=None, dtype=torch.float32) -> Tensor:
    """(h*w, 2) [code:HSG]'s pixel location features (y − 0.5, x − 0.5), y and x evenly spaced in [0, 1]."""
    ys = torch.linspace(0, 1, h, device=device, dtype=dtype) - 0.5
    xs = torch.linspace(0, 1, w, device=device, dtype=dtype) - 0.5
    return torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).reshape(-1, 2)


def _means(x: Tensor, labels: Tensor, k: int) -> tuple[Tensor, Tensor]:
    # x (B, N, D), labels (B, N) in [0, k) -> sums (B, k, D), counts (B, k)
    onehot = F.one_hot(labels, k).to(x.dtype)  # (B, N, k)
    return onehot.transpose(1, 2) @ x, onehot.sum(1)


@torch.no_grad()
def grid_kmeans(emb: Tensor, grid: tuple[int, int], iters: int = 15,
                mask: Tensor | None = None, init: str = "floor",
                location: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Spherical k-means of each map of ``emb`` (B, D, h, w) (rows L2-normalised) with K = gh * gw.

    Args:
        emb: unit-norm embeddings per pixel.
        grid: (gh, gw) initial partition; K = gh * gw clusters.
        iters: assignment / update rounds after the grid initialisation (HSG: 15).
        mask: optional (B, h, w) bool, pixels that take part (others get label -1).
        init: the initial grid, "floor" (equal cells, ours) or "reference" (:func:`grid_init_labels`).
        location: cluster the renormalised [embedding, (y − 0.5, x − 0.5)] ([code:HSG]
            ``segment_by_kmeans``) instead of the embedding alone. Then, as there, a cluster emptied
            during the iterations has a zero prototype (similarity 0 to every pixel) and a cell empty
            from the start takes no part.

    Returns:
        labels (B, h, w) long in [0, K) (or -1 outside ``mask``), centroids (B, K, D) unit norm *of the
        embedding alone* (the mean of ``emb`` over each final cluster, also with ``location``), counts
        (B, K) pixels per cluster at the end. Without ``location`` an emptied cluster keeps its last
        centroid (count 0), so ids stay stable and the count says which clusters exist.
    """
    B, D, h, w = emb.shape
    K = grid[0] * grid[1]
    x = emb.flatten(2).transpose(1, 2)  # (B, N, D)
    valid = None if mask is None else mask.reshape(B, -1)
    labels = grid_init_labels(h, w, grid, emb.device, init).reshape(1, -1).expand(B, -1)  # (B, N)
    if location:
        return _located_kmeans(x, labels, K, iters, valid, (h, w))

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


def _located_kmeans(x: Tensor, labels: Tensor, K: int, iters: int, valid: Tensor | None,
                    hw: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
    # [code:HSG] segment_by_kmeans + kmeans_with_initial_labels on x (B, N, D), initial labels (B, N)
    B = x.shape[0]

    def tagged(lab: Tensor) -> Tensor:  # pixels outside the mask go to a spare cluster K
        return lab if valid is None else torch.where(valid, lab, torch.full_like(lab, K))

    loc = location_features(*hw, device=x.device, dtype=x.dtype)  # (N, 2)
    xl = F.normalize(torch.cat([x, loc[None].expand(B, -1, -1)], dim=-1), dim=-1)  # (B, N, D + 2)
    live = _means(xl, tagged(labels), K + 1)[1][:, :K] > 0  # (B, K): the cells that exist at the start
    for _ in range(iters):  # M-step, then E-step, as the reference's loop
        sums, _ = _means(xl, tagged(labels), K + 1)
        protos = F.normalize(sums[:, :K], dim=-1)  # (B, K, D + 2); an emptied cluster: zero
        sim = (xl @ protos.transpose(1, 2)).masked_fill(~live[:, None, :], float("-inf"))  # (B, N, K)
        labels = sim.argmax(-1)
    sums, counts = _means(x, tagged(labels), K + 1)  # centroids of the embedding alone
    if valid is not None:
        labels = torch.where(valid, labels, torch.full_like(labels, -1))
    return labels.reshape(B, *hw), F.normalize(sums[:, :K], dim=-1), counts[:, :K]


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


def segment_means(emb: Tensor, seg: Tensor, n_segments: int, normalize: bool = True) -> tuple[Tensor, Tensor]:
    """u_s = normalize(mean of the embeddings of segment s) for every segment id in [0, n_segments).

    Args:
        emb: (N, D) pixel embeddings (any norm); differentiable.
        seg: (N,) long segment id per pixel, -1 = no segment.
        normalize: False gives the plain means (e.g. of position embeddings, [code:HSG] ``segment_mean``).
    Returns:
        (S, D) unit prototypes (or means; zero rows for empty ids) and (S,) pixel counts.
    """
    keep = seg >= 0
    sums = torch.zeros(n_segments, emb.shape[1], dtype=emb.dtype, device=emb.device)
    sums = sums.index_add(0, seg[keep], emb[keep])
    counts = torch.bincount(seg[keep], minlength=n_segments)
    if not normalize:
        return sums / counts.clamp_min(1)[:, None].to(sums.dtype), counts
    return F.normalize(sums, dim=-1), counts
