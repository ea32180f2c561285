"""Image-level nearest neighbours over global features (METHODS.md S3, STEGO KNN mining).

Each (five-cropped) training image is represented by the L2-normalised global average pool of its
frozen backbone features; STEGO stores the cosine top-30 of each image and samples its positive pair
uniformly from ranks 1..7 ([code:STEGO] ``precompute_knns.py``, ``num_neighbors: 7``).

``mine_knn`` is exact search, blockwise over queries so memory stays bounded, on faiss (GPU when
available) or torch; ``stego_chunked_knn`` re-implements the reference's approach (full N x N cosine
matrix in 16 row chunks on CPU) only as the baseline of ``bench/knn.py``.
"""
from __future__ import annotations

import numpy as np
import torch

from usseg_core.device import resolve_device
from usseg_core.errors import ConfigError


def _faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def l2_normalise(features: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """(N, C) -> (N, C) float32 C-contiguous rows of unit norm (all-zero rows stay zero)."""
    x = np.asarray(features, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)  # (N, 1)
    return np.ascontiguousarray(x / np.maximum(norms, eps), dtype=np.float32)


def _self_first(candidates: np.ndarray, query_ids: np.ndarray) -> np.ndarray:
    """Force each query's own index into column 0.

    ``candidates`` (b, k+1) are the top-(k+1) ids by similarity. Self normally comes first, but a
    duplicate image ties with it (sim 1) and may come first instead, or, with more than k duplicates,
    push self out of the list altogether. Either way the result is [self, the other candidates in
    order], truncated to k+1 columns.
    """
    b, width = candidates.shape
    is_self = candidates == query_ids[:, None]  # (b, k+1)
    others = np.empty((b, width - 1), dtype=np.int64)  # (b, k)
    has_self = is_self.any(axis=1)
    # Rows with self inside: drop its (first) occurrence, keep the order of the rest.
    rows = np.flatnonzero(has_self)
    if rows.size:
        keep = ~is_self[rows]  # exactly one False per row: indices are unique within a row
        others[rows] = candidates[rows][keep].reshape(rows.size, width - 1)
    # Rows without self: the last candidate makes room for it.
    rows = np.flatnonzero(~has_self)
    others[rows] = candidates[rows, : width - 1]
    return np.concatenate([query_ids[:, None].astype(np.int64), others], axis=1)  # (b, k+1)


def _knn_torch(x: np.ndarray, width: int, block: int, device: str) -> np.ndarray:
    """Exact top-``width`` inner-product search with torch, one block of queries at a time."""
    db = torch.from_numpy(x).to(device)  # (N, C)
    out = np.empty((x.shape[0], width), dtype=np.int64)
    for start in range(0, x.shape[0], block):
        sims = db[start : start + block] @ db.T  # (b, N): the only O(block * N) buffer
        out[start : start + block] = sims.topk(width, dim=1).indices.cpu().numpy()  # (b, width)
        del sims
    return out


def _knn_faiss(x: np.ndarray, width: int, block: int, device: str) -> np.ndarray:
    """Exact top-``width`` inner-product search with a flat faiss index (GPU index when possible)."""
    import faiss

    dim = x.shape[1]
    if device.startswith("cuda") and hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0:
        resources = faiss.StandardGpuResources()
        index = faiss.GpuIndexFlatIP(resources, dim)
    else:
        index = faiss.IndexFlatIP(dim)
    index.add(x)
    out = np.empty((x.shape[0], width), dtype=np.int64)
    for start in range(0, x.shape[0], block):
        _, ids = index.search(x[start : start + block], width)  # (b, width), faiss blocks internally too
        out[start : start + block] = ids
    return out


def mine_knn(
    features: np.ndarray,
    k: int = 30,
    *,
    block: int = 8192,
    device: str = "auto",
    backend: str = "auto",
) -> np.ndarray:
    """Exact cosine k-nearest neighbours of every row among all rows.

    Args:
        features: (N, C) global features (L2-normalised here; all-zero rows stay zero).
        k: neighbours per row besides itself ([code:STEGO] stores 30).
        block: queries per step; peak extra memory is about 4 * block * N bytes with torch
            (faiss blocks internally and needs less).
        device: "auto" (cuda if available), "cpu" or "cuda[:i]".
        backend: "faiss" (IndexFlatIP; GPU index if faiss has GPUs and device is cuda), "torch"
            (blockwise matmul + topk) or "auto" (faiss if importable, else torch).

    Returns:
        (N, k+1) int64 indices by decreasing cosine; column 0 is always the row itself, even when
        duplicate rows tie with it.
    """
    x = l2_normalise(features)  # (N, C)
    n = x.shape[0]
    if k < 0 or k + 1 > n:
        raise ConfigError(f"mine_knn: k={k} needs k+1 <= N rows, got N={n} features")
    if block < 1:
        raise ConfigError(f"mine_knn: block must be >= 1, got {block}")
    if backend == "auto":
        backend = "faiss" if _faiss_available() else "torch"
    device = str(resolve_device(device))
    if backend == "faiss":
        candidates = _knn_faiss(x, k + 1, block, device)
    elif backend == "torch":
        candidates = _knn_torch(x, k + 1, block, device)
    else:
        raise ConfigError(f"mine_knn: backend must be 'auto', 'faiss' or 'torch', got {backend!r}")
    return _self_first(candidates, np.arange(n, dtype=np.int64))  # (N, k+1)


def stego_chunked_knn(features: np.ndarray, k: int, n_chunks: int = 16) -> np.ndarray:
    """The reference's KNN (baseline for ``bench/knn.py`` only): CPU torch, N x N cosine in row chunks.

    Each of ``n_chunks`` row chunks materialises a (N / n_chunks, N) similarity matrix before
    ``topk(k)``; self is included and not forced to column 0. Returns (N, k) int64.
    """
    x = torch.from_numpy(l2_normalise(features))  # (N, C)
    step = max(1, -(-x.shape[0] // n_chunks))
    parts = []
    for start in range(0, x.shape[0], step):
        sims = torch.einsum("nc,mc->nm", x[start : start + step], x)  # (N / n_chunks, N)
        parts.append(sims.topk(k, dim=1).indices)
        del sims
    return torch.cat(parts).numpy().astype(np.int64)  # (N, k)


def sample_knn(knn: np.ndarray, idx: np.ndarray, num_neighbors: int, rng: np.random.Generator) -> np.ndarray:
    """Draw one positive per query uniformly from ranks 1..num_neighbors (rank 0 = self excluded).

    Args:
        knn: (N, k+1) table from ``mine_knn``.
        idx: (B,) query rows.
        num_neighbors: STEGO's ``num_neighbors`` (7); must be in [1, k].
        rng: numpy generator (the caller owns seeding).

    Returns:
        (B,) int64 neighbour indices.
    """
    if not 1 <= num_neighbors < knn.shape[1]:
        raise ConfigError(
            f"num_neighbors must be in [1, {knn.shape[1] - 1}] for a table of {knn.shape[1]} columns, "
            f"got {num_neighbors}"
        )
    idx = np.asarray(idx, dtype=np.int64)
    ranks = rng.integers(1, num_neighbors + 1, size=idx.shape)  # (B,), high exclusive
    return knn[idx, ranks].astype(np.int64)
