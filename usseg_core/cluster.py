"""Clustering of code vectors, docs/methods/protocol.md S6(a).

STEGO's paper calls its cluster probe a "cosine-distance mini-batch k-means". ``spherical_kmeans`` is a
streaming cosine recipe (a faiss spherical init on a reservoir sample, then per-batch running-count
updates, renormalised), so it can fit centroids on codes that do not fit in memory; ``assign_clusters`` /
``cluster_logits`` apply centroids to vectors or (B, D, h, w) code maps.

[code:PiCIE]'s own k-means is Euclidean, not spherical: ``reference_kmeans`` (``euclidean_kmeans`` on every
init pixel, then ``running_mean_update`` per group of pixels, raw centroids never renormalised),
PiCIE's ``kmeans="reference"`` (docs/methods/picie.md §2.2).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from usseg_core.device import resolve_device
from usseg_core.errors import ConfigError


def _normalise_rows(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1, eps=1e-12)


def _as_tensor(batch) -> torch.Tensor:
    """A batch of rows as a tensor, where it is (a device tensor stays on its device)."""
    return batch if isinstance(batch, torch.Tensor) else torch.as_tensor(np.asarray(batch))


def _reservoir(batches: Iterable[np.ndarray], size: int, rng: np.random.Generator) -> np.ndarray:
    """Uniform sample of up to ``size`` unit rows from one pass (Vitter's algorithm R, vectorised)."""
    store: np.ndarray | None = None
    filled = 0
    seen = 0
    for batch in batches:
        # The seeded reservoir runs on the host, so the sample (hence the init) does not depend on the
        # device; only this init pass copies batches back; the update passes stay on the device.
        x = _normalise_rows(_as_tensor(batch).cpu()).numpy()  # (n, D)
        if store is None:
            store = np.empty((size, x.shape[1]), dtype=np.float32)  # (S, D)
        take = min(size - filled, x.shape[0])
        store[filled : filled + take] = x[:take]
        filled += take
        rest = x[take:]
        if rest.shape[0]:
            # The j-th item overall (0-based) replaces slot r ~ U{0..j} when r < size.
            slots = rng.integers(0, seen + take + np.arange(rest.shape[0]) + 1)  # (n - take,)
            hit = np.flatnonzero(slots < size)
            # Later items win a slot contested within one batch, as in the sequential algorithm.
            last = len(hit) - 1 - np.unique(slots[hit][::-1], return_index=True)[1]
            store[slots[hit][last]] = rest[hit][last]
        seen += x.shape[0]
    if store is None:
        raise ConfigError("spherical_kmeans: the batches callable yielded no data")
    return store[:filled]


def _kmeanspp_torch(x: torch.Tensor, k: int, n_iter: int, generator: torch.Generator) -> torch.Tensor:
    """Fallback init: k-means++ seeding (cosine distance) + ``n_iter`` spherical Lloyd steps."""
    n = x.shape[0]
    centroids = x[torch.randint(n, (1,), generator=generator, device="cpu").to(x.device)]  # (1, D)
    dist = (1 - x @ centroids.T).clamp_min(0).squeeze(1)  # (n,)
    for _ in range(1, k):
        probs = dist / dist.sum() if dist.sum() > 0 else torch.full_like(dist, 1.0 / n)
        pick = torch.multinomial(probs.cpu(), 1, generator=generator).to(x.device)
        centroids = torch.cat([centroids, x[pick]])  # (c+1, D)
        dist = torch.minimum(dist, (1 - x @ x[pick].T).clamp_min(0).squeeze(1))
    for _ in range(n_iter):
        labels = (x @ centroids.T).argmax(1)  # (n,)
        sums = torch.zeros_like(centroids).index_add_(0, labels, x)  # (k, D)
        filled = sums.norm(dim=1) > 0
        centroids[filled] = _normalise_rows(sums[filled])
    return centroids


def _init_centroids(sample: np.ndarray, k: int, n_iter: int, seed: int, device: str) -> torch.Tensor:
    """Centroids (k, D) from faiss spherical k-means on the sample, or the torch fallback."""
    try:
        import faiss
    except ImportError:
        faiss = None
    if faiss is not None:
        km = faiss.Kmeans(
            sample.shape[1],
            k,
            niter=n_iter,
            spherical=True,
            seed=seed,
            # The sample is already a subsample: let faiss use all of it instead of re-subsampling.
            max_points_per_centroid=sample.shape[0] // k + 1,
            verbose=False,
        )
        km.train(np.ascontiguousarray(sample, dtype=np.float32))
        return _normalise_rows(torch.from_numpy(km.centroids.copy())).to(device)
    generator = torch.Generator().manual_seed(seed)
    return _kmeanspp_torch(torch.from_numpy(sample).to(device), k, n_iter, generator)


def spherical_kmeans(
    batches: Callable[[], Iterable[np.ndarray]],
    k: int,
    *,
    n_epochs: int = 2,
    init_samples: int = 100_000,
    n_init_iter: int = 20,
    seed: int = 0,
    device: str = "auto",
    init_centroids: np.ndarray | None = None,
) -> np.ndarray:
    """Streamed cosine mini-batch k-means.

    Pass 0 draws a reservoir sample of up to ``init_samples`` points and initialises with
    ``faiss.Kmeans(spherical=True)`` (20 iterations, as [code:PiCIE]'s Euclidean init) or a torch k-means++
    fallback. Each of ``n_epochs`` further passes assigns every batch by cosine and moves each
    centroid towards its batch mean with per-centroid rate (batch count / running count) (Sculley's
    mini-batch k-means, PiCIE-style running counts), then renormalises. After each pass, clusters that
    received no point are re-seeded with the points farthest from their centroid.

    Args:
        batches: callable returning a fresh iterable of (n, D) float arrays or tensors (on any device)
            per call (one pass each); rows need not be unit norm.
        k: number of clusters.
        n_epochs: update passes after the init pass.
        init_samples: reservoir size for the init.
        n_init_iter: k-means iterations of the init.
        seed: seeds the reservoir, the init and nothing else (results are deterministic per seed on
            one device).
        device: "auto" (cuda if available), "cpu" or "cuda[:i]".
        init_centroids: optional (k, D) starting centroids, skipping pass 0 (tests, warm starts).

    Returns:
        (k, D) float32 unit-norm centroids.
    """
    if k < 1:
        raise ConfigError(f"spherical_kmeans: k must be >= 1, got {k}")
    device = str(resolve_device(device))
    if init_centroids is not None:
        centroids = _normalise_rows(torch.as_tensor(np.asarray(init_centroids))).to(device)  # (k, D)
        if centroids.shape[0] != k:
            raise ConfigError(f"spherical_kmeans: init_centroids has {centroids.shape[0]} rows, k={k}")
    else:
        sample = _reservoir(batches(), init_samples, np.random.default_rng(seed))  # (S, D)
        if sample.shape[0] < k:
            raise ConfigError(f"spherical_kmeans: k={k} clusters but only {sample.shape[0]} points")
        centroids = _init_centroids(sample, k, n_init_iter, seed, device)  # (k, D)

    counts = torch.zeros(k, dtype=torch.float64, device=device)  # running counts over all passes
    for _ in range(n_epochs):
        seen = torch.zeros(k, dtype=torch.int64, device=device)  # points per cluster this pass
        far_sim = torch.empty(0, device=device)  # best-cosine of the k worst-fit points so far
        far_pts = torch.empty(0, centroids.shape[1], device=device)
        for batch in batches():
            x = _normalise_rows(_as_tensor(batch).to(device))  # (n, D)
            best_sim, labels = (x @ centroids.T).max(dim=1)  # (n,), (n,)
            batch_counts = torch.bincount(labels, minlength=k)  # (k,)
            sums = torch.zeros_like(centroids).index_add_(0, labels, x)  # (k, D)
            seen += batch_counts
            counts += batch_counts
            hit = batch_counts > 0
            # c <- c + (sum - b c) / N  ==  (1 - b/N) c + (b/N) mean, with lr b/N per centroid.
            step = (sums[hit] - batch_counts[hit, None] * centroids[hit]) / counts[hit, None].float()
            centroids[hit] = _normalise_rows(centroids[hit] + step)
            # Keep the k least well-fitted points of the pass as re-seeding candidates.
            far_sim = torch.cat([far_sim, best_sim])
            far_pts = torch.cat([far_pts, x])
            keep = far_sim.argsort()[:k]
            far_sim, far_pts = far_sim[keep], far_pts[keep]
        empty = torch.nonzero(seen == 0).squeeze(1)  # (E,)
        if empty.numel():
            n_new = min(empty.numel(), far_pts.shape[0])
            centroids[empty[:n_new]] = far_pts[:n_new]
            counts[empty[:n_new]] = 0  # the next batch it wins replaces it outright
    return centroids.cpu().numpy().astype(np.float32)


def assign_clusters(x: np.ndarray | torch.Tensor, centroids: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """Label = argmax cosine to the centroids.

    Args:
        x: (n, D) vectors or (B, D, h, w) code maps, numpy or torch.
        centroids: (K, D).

    Returns:
        (n,) or (B, h, w) int64 labels, numpy if ``x`` is numpy, else a torch tensor on x's device.
    """
    as_numpy = not isinstance(x, torch.Tensor)
    xt = torch.as_tensor(np.asarray(x)) if as_numpy else x
    c = _normalise_rows(torch.as_tensor(np.asarray(centroids)) if not isinstance(centroids, torch.Tensor) else centroids)
    c = c.to(xt.device)  # (K, D); the norm of x does not change its argmax
    if xt.ndim == 2:
        labels = (xt.float() @ c.T).argmax(dim=1)  # (n,)
    elif xt.ndim == 4:
        labels = torch.einsum("bdhw,kd->bkhw", xt.float(), c).argmax(dim=1)  # (B, h, w)
    else:
        raise ValueError(f"assign_clusters expects (n, D) or (B, D, h, w), got shape {tuple(xt.shape)}")
    return labels.cpu().numpy().astype(np.int64) if as_numpy else labels


def cluster_logits(codes: torch.Tensor, centroids: np.ndarray | torch.Tensor, alpha: float = 2.0) -> torch.Tensor:
    """Cluster-probe logits ``alpha * cosine(code, centroid)``.

    [code:STEGO] feeds ``log_softmax(2 * cos)`` of its cluster probe to the CRF; these are the logits
    before that softmax.

    Args:
        codes: (B, D, h, w) head codes.
        centroids: (K, D).
        alpha: inverse temperature (STEGO: 2).

    Returns:
        (B, K, h, w) float logits on codes' device.
    """
    c = centroids if isinstance(centroids, torch.Tensor) else torch.as_tensor(np.asarray(centroids))
    c = _normalise_rows(c.to(codes.device))  # (K, D)
    z = F.normalize(codes.float(), dim=1, eps=1e-12)  # (B, D, h, w)
    return alpha * torch.einsum("bdhw,kd->bkhw", z, c)  # (B, K, h, w)


# --- [code:PiCIE]'s Euclidean k-means (PicieConfig.kmeans = "reference") ---------------------------------

def nearest_euclidean(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Label = argmin ||x - c||² = argmax (2 x·c − |c|²): (n, D) rows, (K, D) raw centroids -> (n,) int64."""
    c = centroids.to(x.device, torch.float32)
    return (2 * x.float() @ c.T - (c * c).sum(1)).argmax(1)


def _split_empty(centroids: torch.Tensor, sizes: torch.Tensor, generator: torch.Generator) -> None:
    """faiss's empty-cluster handling (``split_clusters``), in place: each empty cluster takes a copy of a
    cluster drawn with probability (size − 1) / (n − K), the two pushed apart by ±1/1024 on alternate
    dimensions, and the size is halved between them."""
    eps = 1.0 / 1024
    n, k = int(sizes.sum()), sizes.shape[0]
    sign = torch.tensor([1.0 if d % 2 == 0 else -1.0 for d in range(centroids.shape[1])], device=centroids.device)
    for ci in torch.nonzero(sizes == 0).squeeze(1).tolist():
        probs = (sizes.double() - 1).clamp_min(0) / max(n - k, 1)
        if float(probs.sum()) <= 0:
            return  # every cluster holds at most one point: nothing to split
        cj = int(torch.multinomial(probs.cpu(), 1, generator=generator))
        centroids[ci] = centroids[cj] * (1 + eps * sign)
        centroids[cj] = centroids[cj] * (1 - eps * sign)
        sizes[ci] = sizes[cj] // 2
        sizes[cj] -= sizes[ci]


def euclidean_kmeans(x: torch.Tensor, k: int, *, n_iter: int = 20, seed: int = 0) -> torch.Tensor:
    """[code:PiCIE]'s k-means init: Euclidean (not spherical) k-means on every row of ``x``.

    faiss ``Clustering(spherical=False)`` with ``n_iter`` iterations, ``k`` random distinct rows as the
    start and no subsampling; where faiss is missing, the same recipe in torch (Lloyd steps, faiss's
    splitting of empty clusters). Centroids are the raw cluster means, never normalised.

    Args:
        x: (n, D) rows on any device, n >= k. k: clusters. n_iter: iterations. seed: the start and splits.
    Returns:
        (k, D) float32 centroids on ``x``'s device.
    """
    if x.shape[0] < k:
        raise ConfigError(f"euclidean_kmeans: k={k} clusters but only {x.shape[0]} points")
    try:
        import faiss
    except ImportError:
        faiss = None
    if faiss is not None:
        clus = faiss.Clustering(x.shape[1], k)
        clus.niter, clus.seed, clus.spherical, clus.verbose = n_iter, seed, False, False
        clus.max_points_per_centroid = x.shape[0]  # every point, as [code:PiCIE]'s 10,000,000
        clus.min_points_per_centroid = 1  # only silences faiss's warning on small inputs
        data = np.ascontiguousarray(x.detach().float().cpu().numpy())
        index = faiss.IndexFlatL2(x.shape[1])
        clus.train(data, index)
        return torch.from_numpy(faiss.vector_to_array(clus.centroids).reshape(k, -1).copy()).to(x.device)
    generator = torch.Generator().manual_seed(seed)
    xf = x.float()
    centroids = xf[torch.randperm(x.shape[0], generator=generator)[:k].to(x.device)].clone()  # (k, D)
    for _ in range(n_iter):
        labels = nearest_euclidean(xf, centroids)  # (n,)
        sizes = torch.bincount(labels, minlength=k)  # (k,)
        sums = torch.zeros_like(centroids).index_add_(0, labels, xf)  # (k, D)
        used = sizes > 0
        centroids[used] = sums[used] / sizes[used, None].float()
        _split_empty(centroids, sizes, generator)
    return centroids


def running_mean_update(centroids: torch.Tensor, counts: torch.Tensor, x: torch.Tensor,
                        labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One [code:PiCIE] update group: for each cluster k hit by n_k rows, N_k += n_k and
    c_k <- (1 − n_k/N_k) c_k + (n_k/N_k) mean_k (an exact running mean when N_k started as the init
    count); clusters not hit keep their centroid; no renormalisation, no empty-cluster handling.

    Args:
        centroids: (K, D) float. counts: (K,) float64 running counts N. x: (n, D) rows. labels: (n,) int64.
    Returns:
        New (centroids, counts); the inputs are not modified.
    """
    k = centroids.shape[0]
    n = torch.bincount(labels, minlength=k).to(counts)  # (K,)
    sums = torch.zeros_like(centroids).index_add_(0, labels, x.to(centroids))  # (K, D)
    total = counts + n
    hit = n > 0
    rate = torch.where(hit, n / total.clamp_min(1), torch.zeros_like(n))  # (K,) n_k / N_k
    means = sums / n.clamp_min(1)[:, None].to(sums)
    new = torch.where(hit[:, None], (1 - rate[:, None]).to(centroids) * centroids + rate[:, None].to(centroids) * means,
                      centroids)
    return new, total


def reference_kmeans(init_points: torch.Tensor, update_groups: Iterable[torch.Tensor], k: int, *,
                     n_iter: int = 20, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """[code:PiCIE]'s mini-batch k-means: :func:`euclidean_kmeans` on ``init_points``, counts seeded by
    assigning every init point to the init centroids, then one :func:`running_mean_update` per group
    (each group assigned by Euclidean distance to the centroids from before its update).

    Args:
        init_points: (n, D) every pixel of the init images. update_groups: (m, D) pixels of each later group.
    Returns:
        (centroids (K, D) float32 raw, counts (K,) float64) on ``init_points``' device.
    """
    centroids = euclidean_kmeans(init_points, k, n_iter=n_iter, seed=seed)
    counts = torch.bincount(nearest_euclidean(init_points, centroids), minlength=k).double()
    for x in update_groups:
        x = x.to(centroids.device).float()
        centroids, counts = running_mean_update(centroids, counts, x, nearest_euclidean(x, centroids))
    return centroids, counts
