"""Oversegmentation stage (HSG): edges -> OWT-UCM -> the schedule's segmentation, per image, sharded.

One artifact per (manifest, detector fingerprint, schedule). Per image it holds ``edges/<id>.png``
(8-bit, 255 = strongest), ``ucm2/<id>.mat`` (BSDS format, key ``ucm2``) and ``segments/<id>.png``
(region labels, 16-bit when > 255 regions). The segments file is written last, so an image is done
when it exists: a killed run resumes with the missing images only. Shards write disjoint files.
"""
from __future__ import annotations

import functools
from dataclasses import asdict

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.manifest import DataRef, ensure_manifest
from tasks.stage import ManifestRef, OversegmentRef, Work, declare, run_stage, worker_id
from usseg_core.overseg import OversegSchedule, oversegment, segment_stem

OVERSEG_VERSION = 1


@functools.lru_cache(maxsize=4)
def _detector(name: str, weights: str | None):
    from usseg_core.edges import get_edge_detector

    return get_edge_detector(name, weights=weights)


@task(name="oversegment-shard", cache_policy=NO_CACHE, retries=1)
def oversegment_shard(folder: str, data: DataRef, ids: list[str], *, detector: str, weights: str | None,
                      schedule: dict) -> dict:
    from pathlib import Path

    from PIL import Image

    from usseg_core.store import atomic_write_bytes
    from usseg_core.ucm import save_ucm2_mat

    root = Path(folder)
    worker = worker_id()
    det = _detector(detector, weights)
    sched = OversegSchedule(**schedule)
    ds = data.dataset()
    done, regions = 0, {}
    for id_ in ids:
        stem = segment_stem(id_)  # the file naming SegmentFolder reads back
        if (root / "segments" / f"{stem}.png").exists():
            continue
        res = oversegment(ds.load_image(id_), det, sched)
        Image.fromarray((np.clip(res.edges.strength, 0, 1) * 255 + 0.5).astype(np.uint8)).save(
            root / "edges" / f"{stem}.png")
        save_ucm2_mat(root / "ucm2" / f"{stem}.mat", res.ucm2)
        seg = res.labels.astype(np.uint8 if res.labels.max() <= 255 else np.uint16)
        import io

        buf = io.BytesIO()
        Image.fromarray(seg).save(buf, format="PNG")
        atomic_write_bytes(root / "segments" / f"{stem}.png", buf.getvalue())  # last: marks the image done
        regions[id_] = {"threshold": float(res.threshold), "n_regions": int(res.n_regions)}
        done += 1
    return {"written": done, "regions": regions, "worker": worker}


OVERSEGMENT = declare("oversegment", OVERSEG_VERSION, "tasks.oversegment.oversegment_shard",
                      unkeyed={"folder": "where the artifact is", "data": "keyed as dataset / split, and by the "
                               "manifest's hash", "ids": "which images a shard writes",
                               "weights": "keyed by the detector's fingerprint (upstream)"})


def ensure_oversegmentation(storage: str, data: DataRef, detector: str, weights: str | None,
                            schedule: OversegSchedule, shard_size: int = 16,
                            manifest: ManifestRef | None = None) -> OversegmentRef:
    """The oversegmentation of every image of ``data`` (a cache hit costs key look-ups only).

    Runs inside a flow: shards of ``shard_size`` images are mapped as Prefect tasks onto the flow's task
    runner and write disjoint files; a killed run resumes with the images it had not written.
    """
    manifest = manifest or ensure_manifest(data, storage)
    fingerprint = _detector(detector, weights).fingerprint
    params = {"dataset": data.name, "split": data.split, "detector": detector, "schedule": asdict(schedule)}
    workers: list = []

    def body(work: Work) -> dict:
        from usseg_core.datasets.manifest import Manifest

        art = work.art
        for sub in ("edges", "ucm2", "segments"):
            art.file(sub).mkdir(exist_ok=True)
        ids = Manifest.from_json(manifest.path).ids
        futures = [work.core(oversegment_shard.submit, str(art.path), data, ids[a:a + shard_size],
                             detector=detector, weights=weights, schedule=asdict(schedule))
                   for a in range(0, len(ids), shard_size)]
        results = [f.result() for f in futures]
        regions: dict = {}
        for r in results:
            regions.update(r["regions"])
        missing = [i for i in ids if not art.file(f"segments/{segment_stem(i)}.png").exists()]
        if missing:
            raise RuntimeError(f"oversegment/{art.key}: {len(missing)} images not written; re-run to resume")
        counts = [r["n_regions"] for r in regions.values()]
        workers.extend(sorted({r["worker"] for r in results if r["written"]}))
        return {"n_images": len(ids), "detector_fingerprint": fingerprint,
                "regions_this_run": regions if len(regions) <= 500 else None,
                "mean_regions": float(np.mean(counts)) if counts else None, "workers": list(workers)}

    def ref(art, hit: bool) -> OversegmentRef:
        return OversegmentRef.of(art, str(art.path), hit, n_images=art.meta["n_images"], manifest=manifest,
                                 workers=list(workers))

    return run_stage(storage, OVERSEGMENT, params, {"manifest": manifest.hash, "detector": fingerprint}, body,
                     ref, info={"dataset": data.name, "split": data.split, "detector": detector})
