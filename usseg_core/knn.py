"""Image-level nearest neighbours over global features (docs/methods/protocol.md S3, STEGO KNN mining).

Each (five-cropped) training image is represented by the L2-normalised global average pool of its
frozen backbone features; STEGO stores the cosine top-30 of each image and samples its positive pair
uniformly from ranks 1..7 ([code:STEGO] ``precompute_knns.py``, ``num_neighbors: 7``).

``mine_knn`` picks the search by size and device (:class:`KnnSettings`, ``--set knn.<field>=...``):

* ``exact``: blockwise matrix product + top-k, on torch (MKL / cuBLAS), or faiss-gpu's flat index on a
  GPU when faiss has GPUs. Blocks hold at most min(N / 16, 2^28 / N) query rows, so the one (block, N)
  similarity buffer is never larger than STEGO's (N / 16, N) chunk and never over 1 GiB.
* ``ivf``: our list-major inverted file (``knn_approx.IvfSearch``, why not faiss's: see there);
* ``hnsw``: faiss ``IndexHNSWFlat``;
* ``auto`` (default): exact up to ``auto_threshold`` rows, IVF above.

An approximate search is checked against exact search on a sample of rows (sample x N products, cheap):
its recall of ranks 1..7, the ranks STEGO samples from, must reach ``recall_floor``; below it the effort
doubles (nprobe / efSearch), and where the floor would need more than a quarter of all pairs compared
the search falls back to exact. Requested settings are the artifact key; what was done (effective
parameters, measured recall, the effort ladder) is the artifact's metadata.

Why not faiss's exact ``IndexFlatIP`` on CPU (measured here, 2 threads, dim 384, k 31): the faiss-cpu
wheel bundles its own OpenBLAS 0.3.15, which does not recognise this machine's CPU (a virtualised Xeon
with AVX-512) and falls back to its "Prescott" (SSE3) kernels (``openblas_get_corename()``). Its sgemm
reaches 19.7 GFLOP per CPU-second against 98.4 for torch's MKL and 93.6 for the same OpenBLAS forced to
``OPENBLAS_CORETYPE=SkylakeX``; IndexFlatIP at N = 20k took 17.4 CPU-s, and 3.4 with SkylakeX forced.
That, not threads, is the 567 s at N = 100k: faiss's k-selection costs nothing at k = 31 (k = 1 took
the same time; only above ``distance_compute_min_k_reservoir`` = 100 does the reservoir cost show:
+30% at k = 128, 2x at 512), ``distance_compute_blas_query_bs`` / ``database_bs`` (4096 / 1024) moved
it by less than the noise, one thread or two changed CPU-seconds by under 10%, and an active torch
OpenMP pool (torch and faiss each ship a libgomp) added ~10% CPU-s, not a factor. The variable must be
set before faiss is first imported, and forcing a core type can crash on another CPU, so exact search
on CPU uses torch; ``backend="faiss"`` remains for comparison (bench/knn.py).

``stego_chunked_knn`` re-implements the reference's approach (full N x N cosine matrix in 16 row chunks
on CPU) only as the baseline of ``bench/knn.py``.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch

from usseg_core.device import resolve_device
from usseg_core.errors import ConfigError

METHODS = ("auto", "exact", "ivf", "hnsw")
RECALL_RANKS = 7  # ranks 1..7: STEGO's num_neighbors ([code:STEGO] train_config.yml)
# auto: exact search up to this many rows. CPU, measured (torch 2 threads, dim 384, k 30, clustered
# features as in bench/knn.py; seconds exact / IVF): 5k 0.52 / 0.48, 10k 1.3 / 0.7, 20k 5.6 / 1.2,
# 50k 30 / 3.6. Up to 10k exact costs about a second, so exactness wins there; above, IVF is 2x to 10x
# faster and grows faster. GPU (not measured: no GPU in that session): an exact (N, N) product of 384-d
# rows at ~50 TFLOP/s takes ~15 s at 1M rows, so exact up to 1M.
AUTO_EXACT_MAX = {"cpu": 10_000, "cuda": 1_000_000}
MAX_SCANNED_FRACTION = 0.25  # an approximate search comparing more of the pairs than this is exact's cost
HNSW_MAX_EF = 1024  # efSearch doubling stops here (then exact)
_SIMILARITY_BYTES = 1 << 30  # one (block, N) similarity buffer of exact search: at most 1 GiB


def _faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class KnnSettings:
    """How ``mine_knn`` searches (``--set knn.<field>=...``); fields of other methods must stay default."""

    k: int = 30  # neighbours kept per item (column 0 = self is extra); STEGO draws positives from ranks 1..7
    method: str = "auto"  # exact | ivf | hnsw | auto (exact up to auto_threshold rows, else ivf)
    auto_threshold: int | None = None  # auto: rows above which it goes approximate; None: AUTO_EXACT_MAX
    nlist: int | None = None  # ivf: inverted lists; None: 1.6 sqrt(N) (506 at 100k), lists of >= 64 rows on average
    nprobe: int = 4  # ivf: lists searched per row, where the effort ladder starts (measured: 4 at 100k)
    m: int = 32  # hnsw: links per node (faiss IndexHNSWFlat M); 16 reached only 0.93 at efSearch 128 (100k)
    ef_construction: int = 80  # hnsw: build effort (faiss's default 40 with M 16: see m)
    ef_search: int = 128  # hnsw: where the efSearch ladder starts (100k clustered: 64 -> 0.988, 128 -> 0.995)
    recall_floor: float = 0.99  # approximate: sample recall of ranks 1..7 below which the effort doubles
    recall_sample: int = 1000  # approximate: rows searched exactly to measure recall
    seed: int = 0  # approximate: k-means initialisation and the recall sample

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"knn.method={self.method!r}: unknown; valid: {', '.join(METHODS)}")
        for name in ("k", "nprobe", "m", "ef_construction", "ef_search", "recall_sample", "nlist", "auto_threshold"):
            value = getattr(self, name)
            if value is None and name in ("nlist", "auto_threshold"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"knn.{name} must be an integer >= 1, got {value!r}")
        if self.m < 2:
            raise ConfigError(f"knn.m must be >= 2, got {self.m}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"knn.seed must be an integer, got {self.seed!r}")
        f = self.recall_floor
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 < f <= 1.0:
            raise ConfigError(f"knn.recall_floor must be a number in (0, 1], got {f!r}")
        unused = [x.name for x in fields(self)
                  if x.name not in ("k", *self._used()) and getattr(self, x.name) != x.default]
        if unused:
            raise ConfigError(f"knn.{unused[0]} does not apply to knn.method={self.method}; its fields: "
                              + ", ".join(f"knn.{n}" for n in self._used()))

    def _used(self) -> tuple[str, ...]:
        """The fields this method reads: exactly the artifact key's parameters."""
        checked = ("recall_floor", "recall_sample", "seed")
        ivf = ("nlist", "nprobe", *checked)
        return {"exact": ("method",), "ivf": ("method", *ivf), "auto": ("method", "auto_threshold", *ivf),
                "hnsw": ("method", "m", "ef_construction", "ef_search", *checked)}[self.method]

    def key_params(self) -> dict:
        """The requested method and the parameters it reads (the KNN artifact key's part; ``k`` is keyed
        by the stage itself, as it was before it became a setting)."""
        return {name: getattr(self, name) for name in self._used()}

    def resolve(self, n: int, device: torch.device) -> str:
        """The method that runs on ``n`` rows on ``device``: ``auto`` becomes exact or ivf."""
        if self.method != "auto":
            return self.method
        limit = self.auto_threshold or AUTO_EXACT_MAX["cuda" if device.type == "cuda" else "cpu"]
        return "exact" if n <= limit else "ivf"


@dataclass
class KnnResult:
    """``table`` (N, k+1) int64 (column 0 = self); ``meta`` what ran (JSON-able); ``sample`` the rows the
    recall was measured on (empty for exact search)."""

    table: np.ndarray
    meta: dict
    sample: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


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


def exact_block(n: int) -> int:
    """Query rows per exact-search step: min(N / 16, 2^28 / N), so (block, N) float32 <= STEGO's chunk, 1 GiB."""
    return max(1, min(-(-n // 16), _SIMILARITY_BYTES // (4 * max(1, n))))


def _topk_torch(db: torch.Tensor, rows: torch.Tensor | None, width: int, block: int) -> np.ndarray:
    """Exact top-``width`` inner products of ``db[rows]`` (all rows if None) among ``db``, blockwise."""
    n = db.shape[0] if rows is None else rows.shape[0]
    out = np.empty((n, width), dtype=np.int64)
    for start in range(0, n, block):
        q = db[start : start + block] if rows is None else db[rows[start : start + block]]
        sims = q @ db.T  # (b, N): the only O(block * N) buffer
        out[start : start + block] = sims.topk(width, dim=1).indices.cpu().numpy()  # (b, width)
        del sims
    return out


def _topk_faiss(x: np.ndarray, width: int, block: int, device: torch.device) -> np.ndarray:
    """Exact top-``width`` inner products with a flat faiss index (the GPU index when faiss has GPUs)."""
    import faiss

    if device.type == "cuda" and hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0:
        index = faiss.GpuIndexFlatIP(faiss.StandardGpuResources(), x.shape[1])
    else:
        index = faiss.IndexFlatIP(x.shape[1])  # OpenBLAS, slow here: see the module docstring
    index.add(x)
    out = np.empty((x.shape[0], width), dtype=np.int64)
    for start in range(0, x.shape[0], block):
        out[start : start + block] = index.search(x[start : start + block], width)[1]  # (b, width)
    return out


def _exact(x: np.ndarray, width: int, block: int, device: torch.device, backend: str) -> np.ndarray:
    if backend == "auto":
        gpu_faiss = device.type == "cuda" and _faiss_available()
        if gpu_faiss:
            import faiss

            gpu_faiss = hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0
        backend = "faiss" if gpu_faiss else "torch"
    if backend == "faiss":
        return _topk_faiss(x, width, block, device)
    if backend == "torch":
        return _topk_torch(torch.from_numpy(x).to(device), None, width, block)
    raise ConfigError(f"mine_knn: backend must be 'auto', 'faiss' or 'torch', got {backend!r}")


def recall_at(approx: np.ndarray, exact: np.ndarray, ranks: int = RECALL_RANKS) -> float:
    """Mean fraction of each row's exact ranks 1..``ranks`` found among its approximate ranks 1..``ranks``.

    Both tables (S, >= ranks + 1) hold ids by decreasing similarity with self in column 0.
    """
    a, e = approx[:, 1 : ranks + 1], exact[:, 1 : ranks + 1]  # (S, r)
    return float((e[:, :, None] == a[:, None, :]).any(axis=2).mean())


def recall_sample(n: int, size: int, seed: int) -> np.ndarray:
    """The sorted rows whose exact neighbours measure an approximate search's recall."""
    return np.sort(np.random.default_rng(seed).choice(n, min(n, size), replace=False)).astype(np.int64)


def _fill_missing(table: np.ndarray, db: torch.Tensor, block: int) -> int:
    """Rows where the approximate search saw fewer than ``width`` rows (-1 ids) redone exactly; their count."""
    rows = np.flatnonzero((table < 0).any(axis=1))
    if rows.size:
        table[rows] = _topk_torch(db, torch.from_numpy(rows).to(db.device), table.shape[1], block)
    return int(rows.size)


def _ivf(db: torch.Tensor, width: int, s: KnnSettings, sample: np.ndarray, truth: np.ndarray, block: int):
    """IVF search raised until the sample recall reaches the floor: (table or None for 'use exact', meta)."""
    from usseg_core.knn_approx import one_torch_thread

    with one_torch_thread() as workers:
        return _ivf_ladder(db, width, s, sample, truth, block, workers)


def _ivf_ladder(db: torch.Tensor, width: int, s: KnnSettings, sample: np.ndarray, truth: np.ndarray, block: int,
                workers: int):
    from usseg_core.knn_approx import IvfSearch

    n = db.shape[0]
    nlist = s.nlist or max(1, min(round(1.6 * math.sqrt(n)), n // 64))
    search = IvfSearch(db, width, nlist, s.nprobe, s.seed, workers=workers)
    rows = torch.from_numpy(sample).to(db.device)
    ranks = min(RECALL_RANKS, width - 1)
    neighbours = torch.from_numpy(truth[:, 1 : ranks + 1]).to(db.device)
    nprobe, ladder, table, recall = min(s.nprobe, search.nlist), [], None, 0.0
    while True:
        predicted, fraction = search.predicted_recall(rows, neighbours, nprobe)
        step = {"nprobe": nprobe, "predicted_recall": predicted, "scanned_fraction": fraction}
        ladder.append(step)
        if fraction > MAX_SCANNED_FRACTION:
            break
        if predicted >= s.recall_floor or nprobe == search.nlist:
            search.scan(nprobe)
            table = search.table()
            recall = step["recall"] = recall_at(_self_first(table[sample], sample), truth, ranks)
            if recall >= s.recall_floor or nprobe == search.nlist:
                break
        nprobe = min(2 * nprobe, search.nlist)
    meta = {"nlist": search.nlist, "nprobe": search.nprobe, "scanned_fraction": search.scanned_fraction(),
            "effort": ladder}
    if table is None or recall < s.recall_floor:
        return None, meta
    meta["rows_redone_exactly"] = _fill_missing(table, db, block)
    return table, {**meta, "recall_at_7": recall}


def _hnsw(x: np.ndarray, width: int, s: KnnSettings, sample: np.ndarray, truth: np.ndarray, block: int,
          exact_seconds: float):
    """faiss HNSW with efSearch doubled until the sample recall reaches the floor: (table or None, meta).

    Doubling stops (and exact search takes over) when the next search, about twice the last, would take
    the time spent past ``exact_seconds`` (exact search's estimated cost), or when a doubling did not halve
    the shortfall (the floor is then several ever dearer doublings away).
    """
    if not _faiss_available():
        raise ConfigError("knn.method=hnsw needs faiss (pip install faiss-cpu)")
    from usseg_core.knn_approx import HnswSearch

    start = time.perf_counter()
    search = HnswSearch(x, width, s.m, s.ef_construction)
    ranks = min(RECALL_RANKS, width - 1)
    ef, ladder, shortfall = s.ef_search, [], 1.0
    while True:
        begun = time.perf_counter()
        table = search.search(ef)
        recall = recall_at(_self_first(table[sample], sample), truth, ranks)
        now = time.perf_counter()
        ladder.append({"ef_search": ef, "recall": recall, "seconds": now - begun})
        if (recall >= s.recall_floor or ef >= HNSW_MAX_EF or s.recall_floor - recall > shortfall / 2
                or now - start + 2 * (now - begun) > exact_seconds):
            break
        shortfall, ef = s.recall_floor - recall, min(2 * ef, HNSW_MAX_EF)
    meta = {"m": s.m, "ef_construction": s.ef_construction, "ef_search": ef, "effort": ladder,
            "exact_seconds_estimate": exact_seconds}
    if recall < s.recall_floor:
        return None, meta
    meta["rows_redone_exactly"] = _fill_missing(table, torch.from_numpy(x), block)
    return table, {**meta, "recall_at_7": recall}


def search_knn(features: np.ndarray, k: int = 30, settings: KnnSettings | None = None, *,
               device: str = "auto", block: int | None = None, backend: str = "auto") -> KnnResult:
    """Cosine k-nearest neighbours of every row among all rows, by the method ``settings`` pick.

    Args:
        features: (N, C) global features (L2-normalised here; all-zero rows stay zero).
        k: neighbours per row besides itself ([code:STEGO] stores 30).
        settings: method and parameters (default :class:`KnnSettings`: auto).
        device: "auto" (cuda if available), "cpu" or "cuda[:i]".
        block: exact search's query rows per step (default :func:`exact_block`); peak extra memory is
            about 4 * block * N bytes.
        backend: exact search's engine: "torch", "faiss" (IndexFlatIP, the GPU index on cuda) or "auto"
            (faiss-gpu on a GPU when faiss has GPUs, else torch; see the module docstring for CPU faiss).

    Returns:
        :class:`KnnResult`; its table is (N, k+1) int64 by decreasing cosine, column 0 always the row
        itself, even when duplicate rows tie with it.
    """
    settings = settings or KnnSettings()
    x = l2_normalise(features)  # (N, C)
    n, width = x.shape[0], k + 1
    if k < 0 or width > n:
        raise ConfigError(f"mine_knn: k={k} needs k+1 <= N rows, got N={n} features")
    block = exact_block(n) if block is None else block
    if block < 1:
        raise ConfigError(f"mine_knn: block must be >= 1, got {block}")
    dev = resolve_device(device)
    method = settings.resolve(n, dev)
    start = time.perf_counter()
    meta = {"method_requested": settings.method, "method": method, "settings": asdict(settings),
            "device": str(dev), "n": n, "dim": int(x.shape[1]), "k": k}
    sample = np.zeros(0, dtype=np.int64)
    table = None
    if method in ("ivf", "hnsw"):
        sample = recall_sample(n, settings.recall_sample, settings.seed)
        db = torch.from_numpy(x).to(dev)
        begun = time.perf_counter()
        truth = _self_first(_topk_torch(db, torch.from_numpy(sample).to(dev), width, block), sample)
        exact_seconds = (time.perf_counter() - begun) * n / len(sample)  # what exact search would cost
        if method == "ivf":
            table, meta[method] = _ivf(db, width, settings, sample, truth, block)
        else:
            table, meta[method] = _hnsw(x, width, settings, sample, truth, block, exact_seconds)
        del db
        meta["recall_at_7"] = meta[method].get("recall_at_7")
        if table is None:
            meta["fallback"] = "exact"  # the floor was out of reach at a reasonable effort
    if table is None:
        table = _exact(x, width, block, dev, backend)
        meta["recall_at_7"] = 1.0
    meta["seconds"] = time.perf_counter() - start
    return KnnResult(_self_first(table, np.arange(n, dtype=np.int64)), meta, sample)


def mine_knn(features: np.ndarray, k: int = 30, settings: KnnSettings | None = None, *,
             device: str = "auto", block: int | None = None, backend: str = "auto") -> np.ndarray:
    """The (N, k+1) table of :func:`search_knn` (column 0 = self)."""
    return search_knn(features, k, settings, device=device, block=block, backend=backend).table


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
