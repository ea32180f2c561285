"""Benchmark KNN mining: ``mine_knn`` against the reference's chunked N x N approach.

Random unit features (N, dim), top-(k+1) cosine neighbours (self included), each method in a fresh
subprocess so that peak memory (``ru_maxrss``) belongs to that method alone. Reported memory is the
peak resident set minus the resident set just before the call (features already in memory), so the
shared input does not count. Agreement = fraction of rows whose neighbour set equals the baseline's.

    PYTHONPATH=. python bench/knn.py --sizes 20000 100000 --dim 384 --k 30 --out knn_bench.json
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

BASELINE = "stego"
METHODS = {
    "faiss": "mine_knn(backend='faiss')",
    "torch": "mine_knn(backend='torch')",
    "stego": "stego_chunked_knn(n_chunks=16)",
}


def _features(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _worker(args: argparse.Namespace) -> None:
    """Run one method once and print a JSON line; called in a fresh interpreter."""
    import torch

    from usseg_core.knn import mine_knn, stego_chunked_knn

    torch.set_num_threads(args.threads)
    x = _features(args.n, args.dim, args.seed)
    before = _rss_mib()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    if args.worker == "stego":
        knn = stego_chunked_knn(x, args.k + 1, n_chunks=16)  # reference stores top-30 incl. self
    else:
        knn = mine_knn(x, args.k, backend=args.worker, device=args.device)
    seconds = time.perf_counter() - start
    end = resource.getrusage(resource.RUSAGE_SELF)
    # CPU seconds are less sensitive than wall time to other processes sharing the cores.
    cpu_seconds = (end.ru_utime + end.ru_stime) - (usage.ru_utime + usage.ru_stime)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux -> MiB
    np.save(args.save, knn)
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds, "peak_extra_mib": peak - before, "peak_mib": peak}))


def _run_method(method: str, n: int, args: argparse.Namespace, save: Path) -> dict:
    cmd = [
        sys.executable, __file__, "--worker", method, "--n", str(n), "--dim", str(args.dim),
        "--k", str(args.k), "--seed", str(args.seed), "--threads", str(args.threads),
        "--device", args.device, "--save", str(save),
    ]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{method} at N={n} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of rows with the same neighbour set (order-free: near-ties may swap ranks)."""
    return float(np.mean((np.sort(a, axis=1) == np.sort(b, axis=1)).all(axis=1)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[20000, 100000])
    parser.add_argument("--dim", type=int, default=384, help="feature size (ViT-S: 384)")
    parser.add_argument("--k", type=int, default=30, help="neighbours besides self (STEGO: 30)")
    parser.add_argument("--methods", nargs="+", default=["faiss", "stego"], choices=sorted(METHODS))
    parser.add_argument("--device", default="auto", help="mine_knn device")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write results as JSON here")
    # internal: one method in a fresh process
    parser.add_argument("--worker", choices=sorted(METHODS), help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--save", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return

    methods = [m for m in args.methods if m != BASELINE] + [BASELINE]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            results, outputs = {}, {}
            for method in methods:
                save = Path(tmp) / f"{method}_{n}.npy"
                results[method] = _run_method(method, n, args, save)
                outputs[method] = np.load(save)
                print(f"N={n:>7} {method:>6}: {results[method]['seconds']:8.2f} s, "
                      f"+{results[method]['peak_extra_mib']:8.0f} MiB", flush=True)
            base = results[BASELINE]
            for method in methods:
                r = results[method]
                rows.append({
                    "n": n, "method": method, "what": METHODS[method], **r,
                    "speedup_vs_stego": base["seconds"] / r["seconds"],
                    "cpu_speedup_vs_stego": base["cpu_seconds"] / r["cpu_seconds"],
                    "memory_ratio_vs_stego": r["peak_extra_mib"] / max(base["peak_extra_mib"], 1e-9),
                    "same_neighbour_set_vs_stego": _agreement(outputs[method], outputs[BASELINE]),
                })

    header = (f"{'N':>8} {'method':>7} {'seconds':>9} {'cpu s':>8} {'extra MiB':>10} {'speedup':>8} "
              f"{'cpu spdup':>9} {'mem ratio':>9} {'agree':>6}")
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        print(f"{r['n']:>8} {r['method']:>7} {r['seconds']:>9.2f} {r['cpu_seconds']:>8.1f} {r['peak_extra_mib']:>10.0f} "
              f"{r['speedup_vs_stego']:>7.2f}x {r['cpu_speedup_vs_stego']:>8.2f}x {r['memory_ratio_vs_stego']:>9.3f} "
              f"{r['same_neighbour_set_vs_stego']:>6.3f}")
    print(f"dim={args.dim} k={args.k} threads={args.threads}; ratios are against stego_chunked_knn in this run; "
          f"load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    if args.out:
        args.out.write_text(json.dumps({"dim": args.dim, "k": args.k, "threads": args.threads, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
