"""Approximate all-pairs cosine top-k for ``usseg_core.knn``: our list-major IVF (torch) and faiss HNSW.

Both search every row of ``x`` among all rows (queries = database) and return (N, width) candidate ids
by decreasing cosine; ``knn.mine_knn`` measures their recall on a sample against exact search and raises
the effort (``IvfSearch.scan`` / ``HnswSearch.search``) until the sample recall reaches its floor.

Why our own IVF rather than ``faiss.IndexIVFFlat`` (measured at N = 100k, dim 384, k 31, 2 threads, on
bench/knn.py's clustered features): faiss IVF1024 at nprobe 8 spent 18 CPU-s training (its k-means runs
on the wheel's OpenBLAS, see knn.py), 4 adding and 18 searching (recall@7 0.998): it scans one query at
a time, reading ~1.5 KB per candidate from memory, ~190 ns per candidate. Here the search is
*list-major*: all queries that probe list c are one matrix product with c's members (MKL or cuBLAS), and
a candidate only enters the top-k merge when it beats the query's current k-th similarity, so the
selection touches few elements: the same inverted file and the same recall at equal nprobe, ~5 CPU-s in
all (nlist 494, nprobe 4, recall@7 0.998). faiss HNSW is slower still on these data: M 16 /
efConstruction 40 built in 11 CPU-s and reached 0.93 recall@7 at efSearch 128 (26 CPU-s); M 32 /
efConstruction 80 built in 23 CPU-s, 0.988 at efSearch 64 (20 CPU-s), 0.995 at 128 (33 CPU-s). Hence
IVF is the approximate method of ``auto``.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import torch

_MATMUL_BYTES = 1 << 28  # bound of one (rows x centroids) product buffer: 256 MiB


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _blocks(n_rows: int, n_cols: int) -> int:
    return max(1, min(n_rows, _MATMUL_BYTES // (4 * max(1, n_cols))))


def spherical_kmeans(x: torch.Tensor, n_centroids: int, iters: int, rng: np.random.Generator,
                     sample: int, workers: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(n_centroids, C) unit centroids of ``sample`` random rows of unit ``x`` (N, C): cosine k-means,
    and (n_centroids,) the training rows each had in the last assignment.

    Lloyd steps with argmax-cosine assignment and renormalised means; an emptied centroid is re-seeded
    on a random training row. Every draw comes from ``rng``, so the centroids are a function of the seed.
    """
    n = x.shape[0]
    idx = torch.from_numpy(np.sort(rng.choice(n, min(n, sample), replace=False))).to(x.device)
    train = x[idx]  # (S, C)
    cent = train[torch.from_numpy(rng.choice(train.shape[0], n_centroids, replace=False)).to(x.device)].clone()
    for _ in range(iters):
        assign = nearest_centroids(train, cent, 1, workers)[:, 0]  # (S,)
        sums = torch.zeros_like(cent).index_add_(0, assign, train)  # (K, C)
        empty = torch.bincount(assign, minlength=n_centroids) == 0
        if empty.any():
            reseed = rng.choice(train.shape[0], int(empty.sum()), replace=False)
            sums[empty] = train[torch.from_numpy(reseed).to(x.device)]
        cent = _unit_rows(sums)
    return cent, torch.bincount(nearest_centroids(train, cent, 1, workers)[:, 0], minlength=n_centroids)


def nearest_centroids(x: torch.Tensor, cent: torch.Tensor, n: int, workers: int = 1) -> torch.Tensor:
    """(N, n) ids of each row's ``n`` most similar centroids, most similar first (blockwise products)."""
    out = torch.empty(x.shape[0], n, dtype=torch.long, device=x.device)
    step = max(1, min(_blocks(x.shape[0], cent.shape[0]), -(-x.shape[0] // (4 * workers))))

    def block(s: int) -> None:
        sims = x[s : s + step] @ cent.T  # (b, K)
        out[s : s + step] = sims.argmax(1, keepdim=True) if n == 1 else sims.topk(n, dim=1).indices  # (b, n)

    parallel_map(block, range(0, x.shape[0], step), workers)
    return out


@contextmanager
def one_torch_thread() -> Iterator[int]:
    """torch's intra-op pool at one thread inside the block; yields the thread count it had.

    IVF's work is thousands of small products and selections. With torch's OpenMP pool each is a
    fork-join over every core, and the pool's threads spin between them: measured at N = 20k on this
    2-core machine (shared with other work), IVF took 3.6 s and 3.6 CPU-s with two threads, 1.0 s and
    1.0 CPU-s with one. So IVF runs single-threaded ops, spread over Python threads (:func:`parallel_map`;
    torch releases the GIL inside ops). The setting is process-wide while the block runs.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield threads
    finally:
        torch.set_num_threads(threads)


def parallel_map(fn: Callable, items: Sequence, workers: int) -> list:
    """``[fn(i) for i in items]`` over ``workers`` Python threads (in order; sequential for one worker)."""
    items = list(items)
    if workers <= 1 or len(items) < 2:
        return [fn(i) for i in items]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items, chunksize=max(1, len(items) // (8 * workers))))


def _merge_top(best_v: torch.Tensor, best_i: torch.Tensor, q: torch.Tensor, ids: torch.Tensor,
               vals: torch.Tensor, layer: int = 32) -> None:
    """Per row, keep in ``best_v`` / ``best_i`` (N, width) the ``width`` largest of them and the new
    (q, id, value) triples (in place).

    The triples are grouped by row (one integer sort) and laid into (rows, ``layer``) padded slabs, each
    merged with those rows' current best by one top-k; a row with more than ``layer`` new candidates goes
    through several slabs. Only the rows that have candidates are touched.
    """
    n, width = best_v.shape
    order = torch.argsort(q, stable=True)
    q, ids, vals = q[order], ids[order], vals[order]
    counts = torch.bincount(q, minlength=n)
    rank = torch.arange(q.shape[0], device=q.device) - (torch.cumsum(counts, 0) - counts)[q]
    slot_of = torch.empty(n, dtype=torch.long, device=q.device)
    start = 0
    while q.numel():
        now = rank < start + layer
        rows = (counts > start).nonzero(as_tuple=True)[0]  # (R,) rows with candidates in this slab
        slot_of[rows] = torch.arange(rows.shape[0], device=q.device)
        pad_v = torch.full((rows.shape[0], layer), -torch.inf, device=q.device)
        pad_i = torch.full((rows.shape[0], layer), -1, dtype=torch.long, device=q.device)
        pad_v[slot_of[q[now]], rank[now] - start] = vals[now]
        pad_i[slot_of[q[now]], rank[now] - start] = ids[now]
        v, j = torch.cat([best_v[rows], pad_v], 1).topk(width, dim=1)  # (R, width + layer) -> (R, width)
        best_v[rows], best_i[rows] = v, torch.cat([best_i[rows], pad_i], 1).gather(1, j)
        later = ~now
        q, ids, vals, rank = q[later], ids[later], vals[later], rank[later]
        start += layer


class IvfSearch:
    """Inverted-file search of every row among all rows, scanned list by list (see the module docstring).

    Construction trains the lists (cosine k-means) and assigns every row to its nearest one; rows are then
    kept sorted by list (position p holds row ``order[p]``), so a list's members are one contiguous slice.
    :meth:`predicted_recall` says, before any scan, what recall a given nprobe will reach on sample rows
    whose exact neighbours are known; :meth:`scan` searches; :meth:`table` is the current result.
    """

    def __init__(self, x: torch.Tensor, width: int, nlist: int, nprobe: int, seed: int, *, workers: int = 1,
                 kmeans_iters: int = 8, train_per_list: int = 16) -> None:
        n = x.shape[0]
        self.workers = workers if x.device.type == "cpu" else 1  # Python threads (one_torch_thread)
        self.width, self.nlist = width, max(1, min(nlist, n))
        rng = np.random.default_rng(seed)
        sample = min(n, train_per_list * self.nlist)
        cent, counts = spherical_kmeans(x, self.nlist, kmeans_iters, rng, sample, self.workers)
        # Lists expected to hold fewer rows than width are dropped (their rows join the next nearest list):
        # a row whose own list holds fewer than width rows has no k-th similarity after the first scan, no
        # bar for candidates, and sends every row it compares into the merge.
        keep = counts.double() * (n / sample) >= width
        self.centroids = cent[keep] if keep.any() else cent
        self.nlist = self.centroids.shape[0]
        first = max(1, min(nprobe, self.nlist))
        self._near: torch.Tensor | None = nearest_centroids(x, self.centroids, first, self.workers)  # (N, P) by row
        self.list_of_row = self._near[:, 0]  # (N,) a row's list is its probe rank 0
        self.order = torch.argsort(self.list_of_row, stable=True)  # (N,) position -> row
        self.x = x[self.order]  # (N, C) rows sorted by list
        self.sizes = torch.bincount(self.list_of_row, minlength=self.nlist)  # (nlist,)
        self.starts = [0, *torch.cumsum(self.sizes, 0).tolist()]  # list c = positions starts[c]:starts[c+1]
        self.own = self.list_of_row[self.order]  # (N,) list of each position
        self.best_v = torch.full((n, width), -torch.inf, device=x.device)  # (N, width) by position
        self.best_i = torch.full((n, width), -1, dtype=torch.long, device=x.device)  # positions
        # (position, list) pairs scanned beyond the own list, coded position * nlist + list: a list is
        # never scanned twice for a row, whatever the float ties between centroid similarities.
        self._scanned: list[torch.Tensor] = []
        self.compared = 0.0  # row pairs compared so far
        self.nprobe = 0  # lists scanned per row so far

    def _probe_order(self, rows: torch.Tensor) -> torch.Tensor:
        """(S, nlist) the lists by decreasing centroid similarity for each of ``rows`` (row ids)."""
        return (self._x_rows(rows) @ self.centroids.T).argsort(dim=1, descending=True)

    def _x_rows(self, rows: torch.Tensor) -> torch.Tensor:
        pos = torch.empty_like(self.order)
        pos[self.order] = torch.arange(self.order.shape[0], device=self.order.device)
        return self.x[pos[rows]]

    def predicted_recall(self, rows: torch.Tensor, neighbours: torch.Tensor, nprobe: int) -> tuple[float, float]:
        """(recall, scanned fraction) that :meth:`scan` to ``nprobe`` will reach on ``rows`` (S,).

        ``neighbours`` (S, r) are the rows' exact top-r neighbours (self excluded). Within the scanned
        lists the similarities are exact, so a true neighbour of rank j <= width is returned exactly when
        its list is one of the query's first ``nprobe`` lists: recall is known before the scan.
        """
        probe = self._probe_order(rows)  # (S, nlist)
        rank_of_list = torch.empty_like(probe)
        rank_of_list.scatter_(1, probe, torch.arange(self.nlist, device=probe.device).expand_as(probe))
        found = rank_of_list.gather(1, self.list_of_row[neighbours]) < nprobe  # (S, r)
        scanned = self.sizes[probe[:, :nprobe]].double().sum(1).mean() / self.x.shape[0]
        return float(found.double().mean()), float(scanned)

    def _own_lists(self) -> None:
        """Probe rank 0: each list against itself, one (m, m) product per list."""
        def own(c: int) -> None:
            s, e = self.starts[c], self.starts[c + 1]
            w = min(self.width, e - s)
            v, i = (self.x[s:e] @ self.x[s:e].T).topk(w, dim=1)  # (m, m) -> (m, w)
            self.best_v[s:e, :w], self.best_i[s:e, :w] = v, i + s  # disjoint rows per list

        parallel_map(own, [c for c in range(self.nlist) if self.starts[c + 1] > self.starts[c]], self.workers)

    def scan(self, nprobe: int) -> None:
        """Search each row among the members of its ``nprobe`` nearest lists (those not scanned yet)."""
        nprobe = max(1, min(nprobe, self.nlist))
        if self.nprobe == 0:
            self._own_lists()
            self.compared = float((self.sizes.double() ** 2).sum())
            self.nprobe = 1
        if nprobe <= self.nprobe:
            return
        if self._near is not None and self._near.shape[1] >= nprobe:
            near = self._near[self.order, :nprobe]  # the probes computed with the lists; rows -> positions
        else:
            near = nearest_centroids(self.x, self.centroids, nprobe, self.workers)  # (N, nprobe) by position
        self._near = None
        self._scan(near)

    def _scan(self, near: torch.Tensor) -> None:
        """Scan the lists ``near`` (N, P) by position, list by list, skipping those already scanned.

        Probe ranks go in doubling passes (..2, ..4, ..8): each pass raises the rows' k-th similarity, the
        bar the next pass's candidates must clear, so few of them reach the merge (at N = 100k, nprobe 8:
        ~15, 4 and 1 candidates a row in the three passes, against ~1400 rows compared).
        """
        n, device = near.shape[0], near.device
        codes = torch.arange(n, device=device)[:, None] * self.nlist + near  # (N, P)
        fresh = near != self.own[:, None]
        if self._scanned:
            fresh &= ~torch.isin(codes, torch.cat(self._scanned))
        self._scanned.append(codes[fresh])
        lo, hi = 0, max(2, self.nprobe)
        while lo < near.shape[1]:
            hi = min(hi, near.shape[1])
            self._scan_pass(near[:, lo:hi], fresh[:, lo:hi])
            lo, hi = hi, 2 * hi
        self.nprobe = near.shape[1]

    def _scan_pass(self, near: torch.Tensor, fresh: torch.Tensor) -> None:
        """Compare each row with the members of its ``fresh`` lists in ``near`` (N, P), list by list."""
        device = near.device
        queries, lists = fresh.nonzero(as_tuple=True)[0], near[fresh]  # (Q,), (Q,) row-major order
        self.compared += float(self.sizes[lists].double().sum())
        by_list = torch.argsort(lists, stable=True)
        lists, queries = lists[by_list], queries[by_list]
        q_starts = [0, *torch.cumsum(torch.bincount(lists, minlength=self.nlist), 0).tolist()]
        threshold = self.best_v[:, -1]  # (N,) a candidate must beat the current width-th best

        def probe(c: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            rows = queries[q_starts[c] : q_starts[c + 1]]  # (b,) rows probing list c
            s, e = self.starts[c], self.starts[c + 1]
            sims = self.x[rows] @ self.x[s:e].T  # (b, m)
            r, col = (sims > threshold[rows, None]).nonzero(as_tuple=True)
            return rows[r], col + s, sims[r, col]

        active = [c for c in range(self.nlist) if q_starts[c + 1] > q_starts[c] and self.starts[c + 1] > self.starts[c]]
        found = parallel_map(probe, active, self.workers)
        if found:
            q, i, v = (torch.cat(t) for t in zip(*found))
            if q.numel():
                _merge_top(self.best_v, self.best_i, q, i, v)

    def scanned_fraction(self) -> float:
        """Fraction of all row pairs compared so far (the search effort; 1 = exhaustive)."""
        return self.compared / float(self.x.shape[0]) ** 2

    def table(self) -> np.ndarray:
        """(N, width) int64 row ids by decreasing cosine, by row; -1 where fewer than width were seen."""
        ids = self.best_i.clone()
        seen = ids >= 0
        ids[seen] = self.order[ids[seen]]  # positions -> rows
        out = torch.empty_like(ids)
        out[self.order] = ids  # position order -> row order
        return out.cpu().numpy()


class HnswSearch:
    """faiss ``IndexHNSWFlat`` (inner product) over unit rows; :meth:`search` at a given efSearch."""

    def __init__(self, x: np.ndarray, width: int, m: int, ef_construction: int) -> None:
        import faiss

        self.x, self.width = x, width
        self.index = faiss.IndexHNSWFlat(x.shape[1], m, faiss.METRIC_INNER_PRODUCT)
        self.index.hnsw.efConstruction = ef_construction
        self.index.add(x)

    def search(self, ef_search: int) -> np.ndarray:
        """(N, width) int64 ids (faiss pads with -1 where the graph walk found fewer)."""
        self.index.hnsw.efSearch = max(ef_search, self.width)
        return self.index.search(self.x, self.width)[1].astype(np.int64)
