"""Extraction throughput: the full extract stage (decode + forward + Zarr write, as a Prefect flow) against
a bare forward loop over the same, already decoded images; and cold vs warm (cache-hit) wall time.

    python bench/extract.py [--n 64] [--backbone tf_efficientnet_lite0] [--resolution 224] [--out FILE]
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
    ap.add_argument("--n", type=int, default=64, help="images")
    ap.add_argument("--backbone", default="tf_efficientnet_lite0")
    ap.add_argument("--resolution", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    quiet_prefect()
    import torch
    from prefect import flow

    from flows.extract import extract_features
    from tasks.backbone import BackboneRef, load_backbone
    from tasks.manifest import DataRef
    from usseg_core.features import embed
    from usseg_core.spec import ExtractSpec
    from usseg_core.views import ViewSpec, prepare_item

    tmp = Path(tempfile.mkdtemp(prefix="usseg-bench-"))
    dataset, root, split = bench_dataset(tmp, args.n)
    ds = DataRef(dataset, root, split).dataset()
    ids = ds.ids()[: args.n]
    view = ViewSpec("center_crop", args.resolution)
    backbone = load_backbone(BackboneRef(args.backbone))
    # bare forward loop: images decoded and prepared beforehand, only the backbone is timed
    images = torch.stack([prepare_item(ds.load_image(i), view) for i in ids])
    embed(backbone, images[: args.batch_size])  # warm-up

    def bare_loop() -> float:
        with Timer() as t:
            for a in range(0, len(ids), args.batch_size):
                embed(backbone, images[a:a + args.batch_size])
        return t.seconds

    bare_s = bare_loop()

    # the full stage, through the flow, on a directory holding exactly these images
    sub = tmp / "subset" / "images"
    sub.mkdir(parents=True)
    for i in ids:
        src = Path(ds.root) / ds.image_relpath(i)
        (sub / src.name).symlink_to(src)

    @flow
    def warmup() -> None:  # starts the temporary API server outside the timed region
        return None

    warmup()
    storage = str(tmp / "storage")
    spec = ExtractSpec(dataset="directory", data_root=str(tmp / "subset"), split="all", backbone=args.backbone,
                       resolution=args.resolution, storage=storage, batch_size=args.batch_size)
    with Timer() as cold:
        first = extract_features(spec)
    with Timer() as warm:
        second = extract_features(spec)
    assert not first["cache_hit"] and second["cache_hit"]
    bare_s = min(bare_s, bare_loop())  # best of a run before and after the flow (machine noise)
    n = len(ids)
    write_json(args.out, {
        "dataset": dataset, "images": n, "backbone": args.backbone, "resolution": args.resolution,
        "threads": torch.get_num_threads(),
        "bare_forward_img_per_s": round(n / bare_s, 2),
        "full_stage_img_per_s": round(n / cold.seconds, 2),
        "full_over_bare_throughput_ratio": round(bare_s / cold.seconds, 3),
        "cold_s": round(cold.seconds, 2), "warm_cache_hit_s": round(warm.seconds, 3),
        "cold_over_warm_ratio": round(cold.seconds / warm.seconds, 1),
    })


if __name__ == "__main__":
    main()
