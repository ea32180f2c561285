"""Helpers shared by the benchmarks: data location, timing, JSON output."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def bench_dataset(tmp: Path, n: int) -> tuple[str, str, str]:
    """(dataset, root, split): CamVid val from ../shared when present, else synthetic scenes."""
    camvid = SHARED / "data" / "camvid"
    if camvid.exists():
        return "camvid11", str(camvid), "val"
    from usseg_core.datasets.synthetic import ensure_synthetic

    return "synthetic", str(ensure_synthetic(tmp / "synthetic", n_train=4, n_val=n)), "val"


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0


def write_json(path: str | None, payload: dict) -> None:
    print(json.dumps(payload, indent=2))
    if path:
        Path(path).write_text(json.dumps(payload, indent=2))


def quiet_prefect() -> None:
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
