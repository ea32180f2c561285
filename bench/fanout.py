"""Fan-out: extraction wall time with a local Dask cluster of 1 vs 2 worker processes (and the default
thread runner) on the same images, and the warm (all cache hits) re-run time of the synthetic pipeline.

    python bench/fanout.py [--n 48] [--backbone tf_efficientnet_lite0] [--resolution 224] [--out FILE]

Each extraction writes into a fresh storage root, so every run computes every shard; wall times include
the Dask cluster start (what a user waits for). Ratios are against the 1-worker run of the same session.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import Timer, bench_dataset, quiet_prefect, write_json  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=48, help="images")
    ap.add_argument("--backbone", default="tf_efficientnet_lite0")
    ap.add_argument("--resolution", type=int, default=224)
    ap.add_argument("--shard-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=100, help="STEGO steps of the pipeline run")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    quiet_prefect()
    import os

    from flows.extract import extract_features
    from flows.train import pipeline
    from usseg_core.datasets.synthetic import ensure_synthetic
    from usseg_core.spec import ExtractSpec, RunSpec

    tmp = Path(tempfile.mkdtemp(prefix="usseg-bench-fanout-"))
    dataset, root, split = bench_dataset(tmp, args.n)
    common = dict(dataset=dataset, data_root=root, split=split, backbone=args.backbone, policy="center_crop",
                  resolution=args.resolution, shard_size=args.shard_size)
    extract_features(ExtractSpec(storage=str(tmp / "warmup"), task_runner="threads", **common))  # imports, server, weights
    rows = {}
    for runner in ("dask:1", "dask:2", "threads"):
        with Timer() as t:
            out = extract_features(ExtractSpec(storage=str(tmp / runner.replace(":", "-")), task_runner=runner,
                                               **common))
        rows[runner] = {"seconds": round(t.seconds, 2), "items": out["n"], "workers": len(out["workers"])}
    base = rows["dask:1"]["seconds"]
    for row in rows.values():
        row["speedup_vs_dask1"] = round(base / row["seconds"], 2)

    data = ensure_synthetic(tmp / "synthetic-pipeline", n_train=12, n_val=4)
    spec = RunSpec(dataset="synthetic", data_root=str(data), storage=str(tmp / "pipeline"),
                   overrides={"steps": args.steps}, resolution=128)
    with Timer() as cold:
        pipeline(spec)
    with Timer() as warm:
        pipeline(spec)
    write_json(args.out, {
        "dataset": f"{dataset}/{split}", "backbone": args.backbone, "resolution": args.resolution,
        "cpus": os.cpu_count(), "extraction": rows,
        "pipeline_synthetic": {"cold_s": round(cold.seconds, 2), "warm_rerun_s": round(warm.seconds, 2),
                               "warm_over_cold": round(warm.seconds / cold.seconds, 3)}})


if __name__ == "__main__":  # Dask spawns worker processes that import this file
    main()
