"""What a cache hit costs: process wall time of CLI commands, cold (fresh storage) against warm (every
artifact cached), medians of several runs in one go.

The warm path is the CLI's look-up pass (commands/launch.py: no flow run, no temporary server). The same
warm command with ``USSEG_FLOW_RUN=always`` (a flow run on a temporary Prefect server, what every call
paid before) is measured beside it.

    python bench/cache_hit.py --data-root ../shared/data/camvid [--cold 2] [--warm 5] \
        [--demo-storage DIR] [--out FILE]

``--demo-storage``: a storage folder where ``usseg demo`` already ran (its warm time is measured; if the
demo has not run there, the first call computes it and is reported as cold).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import write_json  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _usseg(args: list[str], env: dict | None = None) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "commands.cli", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})}, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"usseg {' '.join(args)} failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return seconds, done.stdout


def _median(xs: list[float]) -> float:
    return round(statistics.median(xs), 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data-root", default=str(REPO.parent / "shared" / "data" / "camvid"))
    ap.add_argument("--dataset", default="camvid11")
    ap.add_argument("--split", default="val")
    ap.add_argument("--cold", type=int, default=2)
    ap.add_argument("--warm", type=int, default=5)
    ap.add_argument("--demo-storage", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="usseg-cachehit-"))
    extract = ["extract", "--dataset", args.dataset, "--data-root", args.data_root, "--split", args.split]
    cold = []
    for i in range(args.cold):
        storage = tmp / f"cold{i}"
        seconds, out = _usseg([*extract, "--storage", str(storage)])
        assert "extracted" in out, out
        cold.append(seconds)
    storage = tmp / f"cold{args.cold - 1}"
    warm, flow_run = [], []
    for _ in range(args.warm):
        seconds, out = _usseg([*extract, "--storage", str(storage)])
        assert "answered by look-ups" in out, out
        warm.append(seconds)
    for _ in range(max(1, args.warm // 2)):
        seconds, out = _usseg([*extract, "--storage", str(storage)], {"USSEG_FLOW_RUN": "always"})
        assert "cache hit" in out, out
        flow_run.append(seconds)
    result = {
        "command": " ".join(["usseg", *extract]),
        "cold_s": cold, "warm_s": warm, "warm_flow_run_s": flow_run,
        "cold_median_s": _median(cold), "warm_median_s": _median(warm), "warm_flow_run_median_s": _median(flow_run),
        "warm_over_cold": round(statistics.median(warm) / statistics.median(cold), 3),
        "warm_flow_run_over_cold": round(statistics.median(flow_run) / statistics.median(cold), 3),
        "import_floor_torch_prefect_s": _median([_import_seconds("import torch, prefect") for _ in range(3)]),
    }
    if args.demo_storage:
        demo = ["demo", "--storage", args.demo_storage]
        first, out = _usseg(demo)
        demo_warm = [first] if "answered by look-ups" in out else []
        if not demo_warm:
            result["demo_cold_s"] = round(first, 1)
        for _ in range(args.warm - len(demo_warm)):
            seconds, out = _usseg(demo)
            assert "answered by look-ups" in out, out
            demo_warm.append(seconds)
        result.update({"demo_warm_s": demo_warm, "demo_warm_median_s": _median(demo_warm)})
    result["load_average"] = os.getloadavg()
    shutil.rmtree(tmp, ignore_errors=True)
    write_json(args.out, result)


def _import_seconds(code: str) -> float:
    """Interpreter start + ``code`` (torch and Prefect: the floor of any command that runs a flow body)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True,
                   env={**os.environ, "PYTHONPATH": str(REPO)})
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
