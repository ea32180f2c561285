"""Edge orientation and non-maximum suppression shared by all detectors.

Orientation convention (see `usseg_core.edges`): tangent angle in [0, pi) from +x (columns) towards
+y (rows).
"""
from __future__ import annotations

import numpy as np


def ridge_tangent(strength: np.ndarray, sigma: float = 2.0) -> np.ndarray:
    """Tangent orientation of the ridges of a (H, W) edge map, radians in [0, pi).

    A boundary is a ridge of the edge map. The Hessian of the Gaussian-smoothed map has, on a ridge,
    a strongly negative eigenvalue across the ridge and a ~0 one along it, so the tangent is the
    eigenvector of the *larger* eigenvalue: theta = 0.5 * atan2(2 Hxy, Hxx - Hyy). This is the
    second-derivative orientation used by Structured Edges / PiDiNet post-processing, written in
    closed form. `sigma` (pixels) sets the scale at which the ridge direction is measured.
    """
    from scipy import ndimage as ndi  # lazy: importing the detectors (for a cache key) stays cheap

    s = strength.astype(np.float64)
    hxx = ndi.gaussian_filter(s, sigma, order=(0, 2))  # d2/dx2 (x = columns = axis 1)
    hyy = ndi.gaussian_filter(s, sigma, order=(2, 0))
    hxy = ndi.gaussian_filter(s, sigma, order=(1, 1))
    theta = 0.5 * np.arctan2(2.0 * hxy, hxx - hyy)
    return np.mod(theta, np.pi).astype(np.float32)


def structure_tensor_tangent(gx: np.ndarray, gy: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """Edge tangent from gradient components (C, H, W) summed over channels, radians in [0, pi).

    The dominant eigenvector of the smoothed structure tensor J = sum_c g_c g_c^T is the gradient
    (normal) direction 0.5 * atan2(2 Jxy, Jxx - Jyy); the tangent is perpendicular to it. Summing
    tensors (not gradients) lets opposite-signed channel gradients reinforce instead of cancel.
    """
    from scipy import ndimage as ndi  # lazy: importing the detectors (for a cache key) stays cheap

    jxx = ndi.gaussian_filter((gx * gx).sum(0), sigma)
    jyy = ndi.gaussian_filter((gy * gy).sum(0), sigma)
    jxy = ndi.gaussian_filter((gx * gy).sum(0), sigma)
    normal = 0.5 * np.arctan2(2.0 * jxy, jxx - jyy)
    return np.mod(normal + np.pi / 2, np.pi).astype(np.float32)


def edge_nms(
    strength: np.ndarray,
    orientation: np.ndarray,
    radius: float = 1.0,
    border: int = 5,
    margin: float = 1.01,
) -> np.ndarray:
    """Non-maximum suppression across the edge (the standard thinning before BSDS evaluation).

    A pixel survives if `margin * E(p)` is not below E at p +- radius along the edge *normal*
    (bilinear interpolation). Defaults are Structured Edges' `edgesNms(E, O, 1, 5, 1.01)` as used by
    HED/PiDiNet evaluation: r = 1, a 5-pixel border whose responses are linearly faded (SE fades them
    because padding artefacts make spurious frame edges), multiplier 1.01.

    Args:
        strength: (H, W) float edge map.
        orientation: (H, W) tangent angles (radians).
    Returns:
        (H, W) float32 edge map with non-maxima set to 0.
    """
    from scipy import ndimage as ndi  # lazy: importing the detectors (for a cache key) stays cheap

    e = strength.astype(np.float32)
    h, w = e.shape
    nx = np.cos(orientation + np.pi / 2).astype(np.float32)  # normal, x component (columns)
    ny = np.sin(orientation + np.pi / 2).astype(np.float32)
    rows, cols = np.mgrid[0:h, 0:w].astype(np.float32)
    keep = np.ones_like(e, dtype=bool)
    for sgn in (-1.0, 1.0):
        coords = np.stack([rows + sgn * radius * ny, cols + sgn * radius * nx])  # (2, H, W)
        nb = ndi.map_coordinates(e, coords, order=1, mode="nearest")
        keep &= margin * e >= nb
    out = np.where(keep, e, 0.0).astype(np.float32)
    if border > 0:
        b = min(border, h // 2, w // 2)
        for k in range(b):
            f = k / float(border)
            out[k, :] *= f
            out[h - 1 - k, :] *= f
            out[:, k] *= f
            out[:, w - 1 - k] *= f
    return out
