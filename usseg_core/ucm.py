"""Oriented watershed transform + ultrametric contour map (OWT-UCM; Arbelaez et al., PAMI 2011).

Pipeline (all on one image):

1. Watershed of the edge strength from its local minima (4-connected flooding, no watershed line):
   a partition of the pixels into fine regions, whose inter-pixel boundaries follow the edge ridges.
2. Oriented re-weighting (the "O" of OWT). Watershed arcs over weak, noisy ridges wander; OWT
   replaces each arc pixel's strength by the edge strength *in the arc's direction*. With one
   orientation per pixel this is E(p) * |cos(alpha - theta(p))|, where alpha is the arc's local
   tangent and theta the edge tangent. alpha is measured on the double-resolution boundary map
   (Hessian ridge direction of the Gaussian-smoothed boundary indicator, `arc_sigma` pixels), a local
   version of Arbelaez's recursive straight-segment fit.
3. Greedy agglomeration on the region adjacency graph: repeatedly merge the two adjacent regions
   whose common boundary has the lowest *mean* oriented strength (union of their arcs' pixels), with
   a heap and lazy invalidation. Every initial arc between two regions that merge at level L gets L.
   Levels are non-decreasing (a merged boundary's mean is a mean of values >= the current minimum;
   we also take a running max against float round-off), so the map is an ultrametric.
4. ucm2 in the BSDS layout, (2H+1, 2W+1): pixel (i, j) sits at (2i+1, 2j+1) with value 0; the
   boundary between horizontal neighbours (i, j)|(i, j+1) at (2i+1, 2j+2), between vertical
   neighbours at (2i+2, 2j+1); a crossing (even, even) holds the max of its 4 incident boundaries;
   the outer frame repeats its inner neighbour row/column (contours run through the frame), exactly
   as in the BSDS `ucm2` files.

Thresholding: `ucm_labels(ucm2, k)` = connected components of ucm2 <= k (BSDS: bwlabel(ucm2 <= k)
sampled at the pixel sites), so a boundary disappears once k reaches its level.
"""
from __future__ import annotations

import heapq
from pathlib import Path

import numpy as np
from scipy import io as sio
from scipy import ndimage as ndi
from skimage.segmentation import watershed

from usseg_core.edges import EdgeMap
from usseg_core.edges.orientation import ridge_tangent
from usseg_core.errors import InputError

__all__ = ["owt_ucm", "ucm_labels", "save_ucm2_mat", "load_ucm2_mat", "initial_regions"]


def initial_regions(strength: np.ndarray) -> np.ndarray:
    """Watershed basins of `strength` (H, W) from its local minima; int32 labels 0..N-1."""
    lab = watershed(strength, markers=None, connectivity=1, watershed_line=False)  # 1..N
    return (lab - 1).astype(np.int32)


def _boundary_sites(labels: np.ndarray):
    """Inter-pixel boundaries of a label map.

    Returns (rows2, cols2, p, q): double-resolution coordinates of every boundary site and the flat
    indices of the two pixels it separates. Horizontal-neighbour sites come first, then vertical.
    """
    h, w = labels.shape
    idx = np.arange(h * w).reshape(h, w)
    hi, hj = np.nonzero(labels[:, :-1] != labels[:, 1:])  # (i, j) | (i, j+1)
    vi, vj = np.nonzero(labels[:-1, :] != labels[1:, :])  # (i, j) / (i+1, j)
    rows2 = np.concatenate([2 * hi + 1, 2 * vi + 2])
    cols2 = np.concatenate([2 * hj + 2, 2 * vj + 1])
    p = np.concatenate([idx[hi, hj], idx[vi, vj]])
    q = np.concatenate([idx[hi, hj + 1], idx[vi + 1, vj]])
    return rows2, cols2, p, q


def _arc_tangent(shape2: tuple[int, int], rows2: np.ndarray, cols2: np.ndarray, sigma2: float) -> np.ndarray:
    """Local tangent (radians) of the watershed boundary at each site, from its double-res drawing."""
    b = np.zeros(shape2, dtype=np.float32)
    b[rows2, cols2] = 1.0
    # close the curve through the crossings so diagonal runs read as one line, not dots
    cross = ndi.maximum_filter(b, footprint=np.array([[0, 1, 0], [1, 0, 1], [0, 1, 0]], bool))
    b[0::2, 0::2] = np.maximum(b[0::2, 0::2], cross[0::2, 0::2])
    return ridge_tangent(b, sigma2)[rows2, cols2]


def _agglomerate(n_regions: int, pa: np.ndarray, pb: np.ndarray, sums: np.ndarray, cnts: np.ndarray) -> np.ndarray:
    """Greedy mean-boundary merging over the region adjacency graph.

    Args:
        n_regions: number of initial regions.
        pa, pb: (P,) the two regions of each initial arc (adjacent pair).
        sums, cnts: (P,) sum and number of oriented boundary strengths on each arc.
    Returns:
        (P,) level at which each initial arc disappears.
    """
    n_arcs = len(pa)
    adj: list[dict[int, int] | None] = [dict() for _ in range(n_regions)]
    end_a, end_b = pa.tolist(), pb.tolist()
    for k, (a, b) in enumerate(zip(end_a, end_b)):
        adj[a][b] = k
        adj[b][a] = k
    arc_sum, arc_cnt = sums.astype(np.float64).tolist(), cnts.astype(np.int64).tolist()
    members: list[list[int]] = [[k] for k in range(n_arcs)]
    alive = [True] * n_arcs
    heap = [(arc_sum[k] / arc_cnt[k], k, arc_cnt[k]) for k in range(n_arcs)]
    heapq.heapify(heap)
    level_of = np.zeros(n_arcs, dtype=np.float64)
    level = 0.0
    while heap:
        mean, k, c = heapq.heappop(heap)
        if not alive[k] or arc_cnt[k] != c:  # stale entry: arc merged away or its mean changed
            continue
        alive[k] = False
        level = max(level, mean)
        level_of[members[k]] = level
        a, b = end_a[k], end_b[k]
        if len(adj[a]) < len(adj[b]):  # absorb the smaller neighbourhood into the larger
            a, b = b, a
        del adj[a][b]
        nb = adj[b]
        adj[b] = None
        for cc, kb in nb.items():
            if cc == a:
                continue
            del adj[cc][b]
            ka = adj[a].get(cc)
            if ka is None:  # arc b-cc becomes a-cc unchanged
                adj[a][cc] = kb
                adj[cc][a] = kb
                if end_a[kb] == b:
                    end_a[kb] = a
                else:
                    end_b[kb] = a
                continue
            # a-cc and b-cc are now one boundary: pool their pixels
            arc_sum[ka] += arc_sum[kb]
            arc_cnt[ka] += arc_cnt[kb]
            if len(members[ka]) < len(members[kb]):
                members[ka], members[kb] = members[kb], members[ka]
            members[ka].extend(members[kb])
            members[kb] = []
            alive[kb] = False
            heapq.heappush(heap, (arc_sum[ka] / arc_cnt[ka], ka, arc_cnt[ka]))
    return level_of


def owt_ucm(edges: EdgeMap, *, oriented: bool = True, arc_sigma: float = 1.5) -> np.ndarray:
    """Ultrametric contour map of an edge map, BSDS `ucm2` layout (see module docstring).

    Args:
        edges: EdgeMap with (H, W) strength in [0, 1] and tangent orientation.
        oriented: apply the OWT |cos| re-weighting (False: plain watershed-UCM on the strength).
        arc_sigma: pixels; scale at which the watershed arcs' tangent is measured.
    Returns:
        (2H+1, 2W+1) float64 ucm2; boundary sites hold the level in [0, 1] at which they vanish.
    """
    s = np.asarray(edges.strength, dtype=np.float64)
    h, w = s.shape
    ucm2 = np.zeros((2 * h + 1, 2 * w + 1), dtype=np.float64)
    labels = initial_regions(s)
    n = int(labels.max()) + 1
    if n > 1:
        rows2, cols2, p, q = _boundary_sites(labels)
        sf, of = s.ravel(), np.asarray(edges.orientation, dtype=np.float64).ravel()
        if oriented:
            alpha = _arc_tangent(ucm2.shape, rows2, cols2, 2.0 * arc_sigma)
            # strength along the arc direction at both pixels; the ridge pixel dominates via max
            e = np.maximum(sf[p] * np.abs(np.cos(alpha - of[p])), sf[q] * np.abs(np.cos(alpha - of[q])))
        else:
            e = np.maximum(sf[p], sf[q])
        lp, lq = labels.ravel()[p].astype(np.int64), labels.ravel()[q].astype(np.int64)
        key = np.minimum(lp, lq) * n + np.maximum(lp, lq)  # one key per adjacent region pair
        pairs, inv = np.unique(key, return_inverse=True)
        sums = np.bincount(inv, weights=e, minlength=len(pairs))
        cnts = np.bincount(inv, minlength=len(pairs))
        levels = _agglomerate(n, pairs // n, pairs % n, sums, cnts)
        ucm2[rows2, cols2] = levels[inv]
        cr = ucm2[2:-1:2, 2:-1:2]  # crossings: max of the 4 incident boundary sites
        cr[...] = np.maximum.reduce(
            [ucm2[1:-2:2, 2:-1:2], ucm2[3::2, 2:-1:2], ucm2[2:-1:2, 1:-2:2], ucm2[2:-1:2, 3::2]]
        )
    ucm2[0, :], ucm2[-1, :] = ucm2[1, :], ucm2[-2, :]  # frame repeats its neighbours (BSDS files)
    ucm2[:, 0], ucm2[:, -1] = ucm2[:, 1], ucm2[:, -2]
    return ucm2


def ucm_labels(ucm2: np.ndarray, threshold: float) -> np.ndarray:
    """Regions of a ucm2 at `threshold`: (H, W) int32 labels 0..R-1 (raster order of first pixel).

    BSDS convention: labels = bwlabel(ucm2 <= threshold) at the pixel sites [1::2, 1::2]. Because a
    crossing holds the max of its incident boundaries, 4- and 8-connectivity give the same result on
    a valid ucm2; we use 4.
    """
    lab, _ = ndi.label(ucm2 <= threshold)
    lab = lab[1::2, 1::2]
    _, dense = np.unique(lab, return_inverse=True)  # 0..R-1, robust to gaps
    return dense.reshape(lab.shape).astype(np.int32)


def save_ucm2_mat(path: str | Path, ucm2: np.ndarray) -> None:
    """Write `ucm2` to a MATLAB v5 .mat file under key "ucm2" (readable like the BSDS files)."""
    sio.savemat(str(path), {"ucm2": np.asarray(ucm2, dtype=np.float64)}, do_compression=True)


def load_ucm2_mat(path: str | Path) -> np.ndarray:
    """Read the "ucm2" array of a .mat file (ours or BSDS's); InputError naming the file otherwise."""
    p = Path(path)
    try:
        data = sio.loadmat(str(p))
    except (OSError, ValueError, NotImplementedError) as exc:
        raise InputError(p, f"cannot read as a MATLAB .mat file ({exc})") from exc
    if "ucm2" not in data:
        raise InputError(p, f"no 'ucm2' variable (found: {sorted(k for k in data if not k.startswith('__'))})")
    u = np.asarray(data["ucm2"], dtype=np.float64)
    if u.ndim != 2 or u.shape[0] % 2 != 1 or u.shape[1] % 2 != 1:
        raise InputError(p, f"'ucm2' must be a (2H+1, 2W+1) array, got {u.shape}")
    return u
