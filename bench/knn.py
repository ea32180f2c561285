"""Benchmark KNN mining: each ``mine_knn`` method against the reference's chunked N x N approach.

Two kinds of features (N, dim), both L2-normalised, top-(k+1) cosine neighbours (self included):

* ``structured`` (the default, what pooled image features look like): a mixture of N / 100 clusters with
  lognormal sizes, grouped under 50 super-clusters, a shared mean direction, within-cluster spread in a
  64-d subspace plus isotropic noise (:func:`structured_features`). Calibration: EfficientNet-Lite0
  five-crop pooled features of CamVid train (1835 rows) have mean cosine 0.93 / 0.87 / 0.81 at ranks
  1 / 7 / 31, 0.45 between random pairs and 90% of their variance in 71 principal components; these
  features give 0.88 / 0.86 / 0.84, 0.42 and 120 components: flatter neighbour ranks and more dimensions,
  i.e. harder for approximate search than the real ones.
* ``random``: i.i.d. Gaussian directions, no structure at all: the worst case of approximate search
  (every approximate method must fall back to exact there, or miss its recall floor).

Each method runs in a fresh subprocess on the same saved features, so that peak memory (VmHWM, reset
just before the call) belongs to that method alone; reported memory is the peak resident set minus the
resident set just before the call (features already loaded). ``recall@7`` is over every row against ``exact`` in the same
run: the mean fraction of each row's exact ranks 1..7 (self excluded, STEGO's positives) found among the
method's ranks 1..7. Speed ratios are against ``stego`` at the same N and data in the same run.

    PYTHONPATH=. python bench/knn.py --sizes 20000 100000 --dim 384 --k 30 --threads 2 --out knn_bench.json
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BASELINE, REFERENCE = "stego", "exact"
METHODS = {
    "auto": "mine_knn() (the default: knn.method=auto)",
    "exact": "mine_knn(knn.method=exact) (torch blockwise)",
    "ivf": "mine_knn(knn.method=ivf)",
    "hnsw": "mine_knn(knn.method=hnsw) (faiss IndexHNSWFlat)",
    "faiss": "mine_knn(knn.method=exact, backend=faiss) (faiss IndexFlatIP)",
    "stego": "stego_chunked_knn(n_chunks=16)",
}
DATA = ("structured", "random")


def _unit(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def structured_features(n: int, dim: int, seed: int, per_cluster: int = 100, n_super: int = 50, rank: int = 64,
                        mean_w: float = 1.0, sub_w: float = 0.8, within: float = 0.6, iso: float = 0.25) -> np.ndarray:
    """(n, dim) unit rows clustered like pooled image features (see the module docstring)."""
    rng = np.random.default_rng(seed)
    n_c = max(1, n // per_cluster)
    supers = _unit(rng.standard_normal((n_super, dim)))
    centres = _unit(supers[rng.integers(0, n_super, n_c)] + sub_w * _unit(rng.standard_normal((n_c, dim))))
    sizes = rng.lognormal(0.0, 1.0, n_c)
    member = rng.choice(n_c, n, p=sizes / sizes.sum())
    basis = np.linalg.qr(rng.standard_normal((dim, rank)))[0]  # (dim, rank) within-cluster subspace
    mean = _unit(rng.standard_normal(dim))
    x = (mean_w * mean + centres[member] + within * (rng.standard_normal((n, rank)) @ basis.T) / np.sqrt(rank)
         + iso * rng.standard_normal((n, dim)) / np.sqrt(dim))
    return _unit(x).astype(np.float32)


def random_features(n: int, dim: int, seed: int) -> np.ndarray:
    return _unit(np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32)).astype(np.float32)


def _data_stats(x: np.ndarray, k: int, seed: int) -> dict:
    """Mean cosine at ranks 1, 7 and k of 1000 sample rows, and between random pairs."""
    import torch

    rows = np.random.default_rng(seed).choice(len(x), min(1000, len(x)), replace=False)
    t = torch.from_numpy(x)
    sims = t[torch.from_numpy(rows)] @ t.T  # (S, N)
    top = sims.topk(k + 1, dim=1).values
    return {"rank1": float(top[:, 1].mean()), "rank7": float(top[:, 7].mean()), f"rank{k}": float(top[:, k].mean()),
            "random_pair": float(sims.mean())}


def _rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _reset_peak() -> bool:
    """Reset the process's peak resident set (VmHWM) to the current one; False where Linux does not allow it.

    ``ru_maxrss`` cannot be used alone: Linux keeps it across fork and execve, so a worker would start
    with the parent's peak (the bench process holding every method's table).
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _peak_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB -> MiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _worker(args: argparse.Namespace) -> None:
    """Run one method once on the saved features and print a JSON line; called in a fresh interpreter."""
    import torch

    from usseg_core.knn import KnnSettings, search_knn, stego_chunked_knn

    torch.set_num_threads(args.threads)
    if args.worker in ("hnsw", "faiss"):
        import faiss

        faiss.omp_set_num_threads(args.threads)
    x = np.load(args.features)
    if not _reset_peak():
        raise RuntimeError("bench/knn.py needs Linux's /proc/self/clear_refs to measure each method's peak")
    before = _rss_mib()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    meta = {}
    if args.worker == "stego":
        knn = stego_chunked_knn(x, args.k + 1, n_chunks=16)  # reference stores top-30 incl. self
    else:
        method = {"auto": "auto", "faiss": "exact"}.get(args.worker, args.worker)
        res = search_knn(x, args.k, KnnSettings(method=method), device=args.device,
                         backend="faiss" if args.worker == "faiss" else "auto")
        knn, meta = res.table, {k: v for k, v in res.meta.items() if k != "settings"}
    seconds = time.perf_counter() - start
    end = resource.getrusage(resource.RUSAGE_SELF)
    # CPU seconds are less sensitive than wall time to other processes sharing the cores.
    cpu_seconds = (end.ru_utime + end.ru_stime) - (usage.ru_utime + usage.ru_stime)
    peak = _peak_mib()
    np.save(args.save, knn)
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds, "peak_extra_mib": peak - before,
                      "peak_mib": peak, "meta": meta}))


def _run_method(method: str, n: int, features: Path, args: argparse.Namespace, save: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", method, "--k", str(args.k), "--threads", str(args.threads),
           "--device", args.device, "--features", str(features), "--save", str(save)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{method} at N={n} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _what_ran(meta: dict) -> str:
    """One short phrase: the method that ran and its effective effort."""
    if not meta:
        return ""
    method, out = meta.get("method", ""), meta.get("method", "")
    detail = meta.get(method) or {}
    if method == "ivf":
        out += f" nlist={detail.get('nlist')} nprobe={detail.get('nprobe')}"
    elif method == "hnsw":
        out += f" ef={detail.get('ef_search')}"
    if meta.get("fallback"):
        out += f" -> {meta['fallback']}"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[20000, 100000])
    parser.add_argument("--dim", type=int, default=384, help="feature size (ViT-S: 384)")
    parser.add_argument("--k", type=int, default=30, help="neighbours besides self (STEGO: 30)")
    parser.add_argument("--methods", nargs="+", default=["auto", "exact", "ivf", "hnsw", "stego"],
                        choices=sorted(METHODS), help="faiss (CPU IndexFlatIP) is slow here: see usseg_core/knn.py")
    parser.add_argument("--data", nargs="+", default=list(DATA), choices=DATA)
    parser.add_argument("--device", default="auto", help="mine_knn device")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write results as JSON here")
    # internal: one method in a fresh process
    parser.add_argument("--worker", choices=sorted(METHODS), help=argparse.SUPPRESS)
    parser.add_argument("--features", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--save", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return

    from usseg_core.knn import _self_first, recall_at

    methods = [REFERENCE] + [m for m in args.methods if m not in (BASELINE, REFERENCE)] + [BASELINE]
    rows, stats = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for data in args.data:
            for n in args.sizes:
                make = structured_features if data == "structured" else random_features
                x = make(n, args.dim, args.seed)
                features = Path(tmp) / f"{data}_{n}.npy"
                np.save(features, x)
                stats[f"{data}/{n}"] = _data_stats(x, args.k, args.seed)
                del x
                results, outputs = {}, {}
                for method in methods:
                    save = Path(tmp) / f"{method}.npy"
                    results[method] = r = _run_method(method, n, features, args, save)
                    table = np.load(save)
                    if method == BASELINE:  # self first, as mine_knn returns it (the reference does not)
                        table = _self_first(table, np.arange(n, dtype=np.int64))
                    outputs[method] = table
                    print(f"{data:>10} N={n:>7} {method:>6}: {r['seconds']:8.2f} s, {r['cpu_seconds']:8.1f} cpu-s, "
                          f"+{r['peak_extra_mib']:7.0f} MiB  {_what_ran(r['meta'])}", flush=True)
                base, exact = results[BASELINE], outputs[REFERENCE]
                for method in methods:
                    r = results[method]
                    rows.append({
                        "data": data, "n": n, "method": method, "what": METHODS[method], **r,
                        "ran": _what_ran(r["meta"]),
                        "recall_at_7_vs_exact": recall_at(outputs[method], exact, 7),
                        "speedup_vs_stego": base["seconds"] / r["seconds"],
                        "cpu_speedup_vs_stego": base["cpu_seconds"] / r["cpu_seconds"],
                        "memory_ratio_vs_stego": r["peak_extra_mib"] / max(base["peak_extra_mib"], 1e-9),
                    })
                features.unlink()

    header = (f"{'data':>10} {'N':>7} {'method':>6} {'seconds':>8} {'cpu s':>7} {'extra MiB':>9} {'vs stego':>8} "
              f"{'cpu vs':>7} {'mem ratio':>9} {'recall@7':>8}  ran")
    print("\n" + header + "\n" + "-" * (len(header) + 24))
    for r in rows:
        print(f"{r['data']:>10} {r['n']:>7} {r['method']:>6} {r['seconds']:>8.2f} {r['cpu_seconds']:>7.1f} "
              f"{r['peak_extra_mib']:>9.0f} {r['speedup_vs_stego']:>7.2f}x {r['cpu_speedup_vs_stego']:>6.2f}x "
              f"{r['memory_ratio_vs_stego']:>9.3f} {r['recall_at_7_vs_exact']:>8.4f}  {r['ran']}")
    print("neighbour cosine (rank 1 / 7 / k, random pair): " + "; ".join(
        f"{key} {s['rank1']:.2f} / {s['rank7']:.2f} / {s[f'rank{args.k}']:.2f}, {s['random_pair']:.2f}"
        for key, s in stats.items()))
    print(f"dim={args.dim} k={args.k} threads={args.threads}; ratios are against stego_chunked_knn in this run; "
          f"load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    if args.out:
        args.out.write_text(json.dumps({"dim": args.dim, "k": args.k, "threads": args.threads, "data_stats": stats,
                                        "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
