"""Object storage: which client library, and what training from a bucket costs.

Starts a real S3 server (SeaweedFS on 127.0.0.1, tests/s3server.py) and measures, in one run:

1. **Client throughput** — PUT and GET of many small objects (a shard of per-item chunks, a meta.json) and
   a few large ones (a checkpoint, a shard of features) through obstore (16 threads over its synchronous
   calls, as usseg_core/remote.py does) and through s3fs (its batched async ``pipe`` / ``cat``) when s3fs is
   installed. Objects/s and MB/s, and the ratio obstore / s3fs.
2. **Training from the bucket** — the same ``usseg run stego`` (train only) on a local store and on the
   bucket, alternated ``--reps`` times (a new seed each time). On the bucket each head is trained on a fresh
   "machine" (an empty ``$USSEG_CACHE_DIR``): it fetches the manifest, features and KNN into its mirror,
   then trains. Steps/s of both (the head's ``seconds_per_step``), their ratio, the wall times.

    python bench/objstore.py [--small 256] [--large 8] [--steps 100] [--reps 2] [--out bench_objstore.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import write_json  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _rate(n: int, nbytes: int, seconds: float) -> dict:
    return {"objects": n, "bytes": nbytes, "seconds": round(seconds, 3), "objects_per_s": round(n / seconds, 1),
            "mb_per_s": round(nbytes / seconds / 1e6, 1)}


def client_throughput(server, n_small: int, n_large: int) -> dict:
    import obstore
    from obstore.store import from_url

    small, large = os.urandom(64 << 10), os.urandom(16 << 20)
    sets = {"small_64KiB": (n_small, small), "large_16MiB": (n_large, large)}
    out: dict = {}
    store = from_url(server.url("bench-obstore"))
    for name, (n, blob) in sets.items():
        keys = [f"{name}/{i:05d}" for i in range(n)]
        with ThreadPoolExecutor(16) as pool:
            t0 = time.perf_counter()
            list(pool.map(lambda k: obstore.put(store, k, blob), keys))
            put = time.perf_counter() - t0
            t0 = time.perf_counter()
            got = list(pool.map(lambda k: len(bytes(obstore.get(store, k).bytes())), keys))
            get = time.perf_counter() - t0
        assert sum(got) == n * len(blob)
        out[f"obstore_{name}"] = {"put": _rate(n, n * len(blob), put), "get": _rate(n, n * len(blob), get)}
    try:
        import s3fs
    except ImportError:
        out["s3fs"] = "not installed (pip install s3fs to compare)"
        return out
    fs = s3fs.S3FileSystem(key=os.environ["AWS_ACCESS_KEY_ID"], secret=os.environ["AWS_SECRET_ACCESS_KEY"],
                           client_kwargs={"endpoint_url": os.environ["AWS_ENDPOINT_URL"],
                                          "region_name": os.environ["AWS_REGION"]})
    for name, (n, blob) in sets.items():
        paths = [f"{server.bucket}/bench-s3fs/{name}/{i:05d}" for i in range(n)]
        t0 = time.perf_counter()
        fs.pipe({p: blob for p in paths})
        put = time.perf_counter() - t0
        t0 = time.perf_counter()
        got = fs.cat(paths)
        get = time.perf_counter() - t0
        assert sum(len(v) for v in got.values()) == n * len(blob)
        out[f"s3fs_{name}"] = {"put": _rate(n, n * len(blob), put), "get": _rate(n, n * len(blob), get)}
        for op in ("put", "get"):
            out[f"ratio_obstore_over_s3fs_{name}_{op}"] = round(
                out[f"obstore_{name}"][op]["mb_per_s"] / out[f"s3fs_{name}"][op]["mb_per_s"], 2)
    return out


def _usseg(args: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "commands.cli", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO), **env})
    if done.returncode != 0:
        raise RuntimeError(f"usseg {' '.join(args)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return time.perf_counter() - t0


def _head_meta(storage: str, seed: int) -> dict:
    from usseg_core.store import ArtifactStore

    (head,) = [a for a in ArtifactStore(storage).iter_artifacts("head")
               if a.complete and a.meta["params"]["config"]["stego"]["seed"] == seed]
    return head.meta


def training(server, tmp: Path, steps: int, reps: int) -> dict:
    """Local and bucket trainings alternated ``reps`` times (seed r: a new head each time), so that a load
    change on the machine hits both sides alike; each bucket training runs on a fresh machine (an empty
    mirror) that fetches its inputs from the bucket first."""
    import statistics

    from usseg_core.datasets.synthetic import ensure_synthetic

    data = ensure_synthetic(tmp / "synthetic", n_train=40, n_val=4, height=144, width=192)
    args = ["run", "stego", "--dataset", "synthetic", "--data-root", str(data), "--train-split", "train",
            "--set", f"steps={steps}", "--set", "batch_size=8"]
    local, url = tmp / "local", server.url("bench-training")
    _usseg([*args, "--seed", "99", "--storage", str(local)], {})  # inputs computed once on each side
    _usseg([*args, "--seed", "99", "--storage", url], {"USSEG_CACHE_DIR": str(tmp / "machine-a")})
    rows = []
    for rep in range(reps):
        wall_local = _usseg([*args, "--seed", str(rep), "--storage", str(local)], {})
        env_b = {"USSEG_CACHE_DIR": str(tmp / f"machine-b{rep}")}
        wall_remote = _usseg([*args, "--seed", str(rep), "--storage", url], env_b)
        os.environ.update(env_b)
        sps_local = 1 / _head_meta(str(local), rep)["seconds_per_step"]
        sps_remote = 1 / _head_meta(url, rep)["seconds_per_step"]
        rows.append({"seed": rep, "steps_per_s_local": round(sps_local, 2), "steps_per_s_bucket": round(sps_remote, 2),
                     "ratio": round(sps_remote / sps_local, 3), "wall_local_s": round(wall_local, 1),
                     "wall_bucket_fresh_machine_s": round(wall_remote, 1)})
    fetched = sum(p.stat().st_size for p in (tmp / "machine-b0").rglob("*") if p.is_file())
    return {"steps": steps, "runs": rows, "median_ratio_bucket_over_local": statistics.median(r["ratio"] for r in rows),
            "fresh_machine_mirror_bytes": fetched}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", type=int, default=256)
    ap.add_argument("--large", type=int, default=8)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--skip-training", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from tests.s3server import S3Server

    with tempfile.TemporaryDirectory(prefix="usseg-objstore-") as tmp:
        server = S3Server(Path(tmp) / "s3").start()
        try:
            os.environ.update(server.env)
            result = {"clients": client_throughput(server, args.small, args.large)}
            if not args.skip_training:
                result["training"] = training(server, Path(tmp), args.steps, args.reps)
        finally:
            server.stop()
    print(json.dumps(result, indent=2))
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
