"""What a new user waits for: ``usseg demo`` cold (a fresh storage: render the scenes, extract, train every
head x 2 seeds, evaluate, report) and warm (every artifact cached: answered from its record), against the
import floor ``python -c "import torch, prefect"`` measured in the same run. Medians of several runs.

    python bench/demo.py [--cold 3] [--warm 5] [--floor 5] [--out FILE]

Each cold run uses its own fresh storage folder (nothing shared, the scenes rendered again); the warm runs
repeat the command on the last cold run's storage. The work a cold run did is read from its output (the
trainings of "trained in this run", the number of table rows). The load average before and after is in
the JSON: on a shared machine every figure is an upper bound.
"""
from __future__ import annotations

import argparse
import os
import re
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


def _timed(cmd: list[str]) -> tuple[float, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "USSEG_STORAGE")}
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False,
                          env={**env, "PYTHONPATH": str(REPO), "COLUMNS": "120"})
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return seconds, done.stdout


def _demo(storage: Path) -> tuple[float, str]:
    return _timed([sys.executable, "-m", "commands.cli", "demo", "--storage", str(storage)])


def _work(out: str) -> dict:
    trained = re.search(r"trained in this run: (.*?)(?:; the other|\n(?:report|\S+:))", out, re.S)
    runs = [r.strip() for r in trained.group(1).replace("\n", " ").split(",")] if trained else []
    return {"trainings": len([r for r in runs if r]), "answered": "answered from" in out,
            "looked_up": "answered by look-ups" in out, "table_rows": len(re.findall(r"^│ \S", out, re.M))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cold", type=int, default=3)
    ap.add_argument("--warm", type=int, default=5)
    ap.add_argument("--floor", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    load_before = os.getloadavg()
    floor = [_timed([sys.executable, "-c", "import torch, prefect"])[0] for _ in range(args.floor)]
    tmp = Path(tempfile.mkdtemp(prefix="usseg-demo-bench-"))
    cold, cold_work, storage = [], [], None
    try:
        for i in range(args.cold):
            storage = tmp / f"cold{i}"
            seconds, out = _demo(storage)
            cold.append(seconds)
            cold_work.append(_work(out))
            print(f"cold {i}: {seconds:.1f} s, {cold_work[-1]}", flush=True)
        _demo(storage)  # the first warm call after a flow run: its answer was recorded by the cold run
        warm, warm_work = [], []
        for i in range(args.warm):
            seconds, out = _demo(storage)
            warm.append(seconds)
            warm_work.append(_work(out))
        print(f"warm: {[round(s, 2) for s in warm]}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    floor_median, warm_median = statistics.median(floor), statistics.median(warm)
    result = {
        "cold_s": cold, "cold_median_s": statistics.median(cold), "cold_work": cold_work,
        "warm_s": warm, "warm_median_s": warm_median, "warm_work": warm_work,
        "import_floor_s": floor, "import_floor_median_s": floor_median,
        "warm_over_floor": warm_median / floor_median,
        "cpus": os.cpu_count(), "load_before": load_before, "load_after": os.getloadavg(),
    }
    print(f"cold demo median {result['cold_median_s']:.1f} s over {args.cold}; warm median {warm_median:.2f} s; "
          f"import floor median {floor_median:.2f} s; warm / floor {result['warm_over_floor']:.3f}")
    write_json(args.out, result)


if __name__ == "__main__":
    main()
