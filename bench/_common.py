"""Helpers shared by the benchmarks: data location, cached-storage look-ups, timing, JSON output."""
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


def cached_storage_arguments(ap) -> None:
    """The arguments of a bench that reads a storage root a `usseg run` filled (features, labelled split)."""
    ap.add_argument("--storage", required=True)
    ap.add_argument("--dataset", default="camvid11")
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--eval-split", default="val")


def cached_artifacts(storage, stage: str, **match) -> list:
    """Complete artifacts of ``stage`` whose metadata (or params) hold every ``match`` value."""
    from usseg_core.store import ArtifactStore

    out = []
    for art in ArtifactStore(storage).iter_artifacts(stage):
        if art.complete and all(art.meta.get(k) == v or art.meta.get("params", {}).get(k) == v
                                for k, v in match.items()):
            out.append(art)
    return out


def labelled_split(args) -> tuple:
    """(dataset, image ids in manifest order) of ``--eval-split``, from the cached manifest."""
    from usseg_core.datasets import get_dataset
    from usseg_core.datasets.manifest import Manifest

    ds = get_dataset(args.dataset, args.data_root, args.eval_split)
    manifest = next(a for a in cached_artifacts(args.storage, "manifest", split=args.eval_split))
    return ds, Manifest.from_json(manifest.file("manifest.json")).ids


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
