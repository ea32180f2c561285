"""Boundary benchmark of the edge + OWT-UCM stage on the BSDS500 sample (BSDS protocol).

Methods:
  gpb-owt-ucm   reference BSDS ucm2 files, evaluated at single resolution ucm2[2::2, 2::2] (as BSDS)
  pidinet       raw fused PiDiNet map after non-maximum suppression (SE edgesNms r=1, s=5, m=1.01,
                the HED/PiDiNet evaluation protocol), then BSDS thinning per threshold
  pidinet-tiny  same for the tiny model
  pidinet-ucm   our OWT-UCM on the PiDiNet map
  classical-ucm our OWT-UCM on the weight-free Lab-gradient detector
Also ms/image on CPU for each detector and for OWT-UCM. Prints a markdown table; --out saves JSON.

    PYTHONPATH=. python bench/boundaries.py --out /tmp/boundaries.json [--thresholds 99]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from usseg_core.boundary_eval import evaluate_dataset, evaluate_image, load_bsds_gt
from usseg_core.edges import get_edge_detector
from usseg_core.imageio import read_rgb
from usseg_core.edges.orientation import edge_nms
from usseg_core.ucm import load_ucm2_mat, owt_ucm

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
ALL = ["gpb-owt-ucm", "pidinet", "pidinet-tiny", "pidinet-ucm", "classical-ucm"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=SHARED / "data" / "bsds500_sample")
    ap.add_argument("--weights", type=Path, default=SHARED / "weights" / "pidinet")
    ap.add_argument("--thresholds", type=int, default=33, help="BSDS grid size (BSDS itself: 99)")
    ap.add_argument("--methods", default=",".join(ALL))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    methods = [m for m in args.methods.split(",") if m]
    ids = sorted(p.stem for p in (args.data / "images").glob("*.jpg"))
    if not ids:
        raise SystemExit(f"no images under {args.data / 'images'}")
    dets = {"classical": get_edge_detector("classical")}
    if any(m.startswith("pidinet") for m in methods):
        dets["pidinet"] = get_edge_detector("pidinet", weights=args.weights / "table5_pidinet.pth")
        dets["pidinet-tiny"] = get_edge_detector("pidinet-tiny", weights=args.weights / "table5_pidinet-tiny.pth")
    counts: dict[str, list] = {m: [] for m in methods}
    ms: dict[str, list[float]] = {}

    def timed(key, fn, *a):
        t = time.perf_counter()
        out = fn(*a)
        ms.setdefault(key, []).append(1000 * (time.perf_counter() - t))
        return out

    for d in dets.values():  # warm-up (first torch call allocates)
        d(read_rgb(args.data / "images" / f"{ids[0]}.jpg"))
    for n, i in enumerate(ids):
        img = read_rgb(args.data / "images" / f"{i}.jpg")
        gts = load_bsds_gt(args.data / "groundTruth" / f"{i}.mat")
        edges = {k: timed(f"edges:{k}", d, img) for k, d in dets.items()}
        for m in methods:
            t_m = time.perf_counter()
            if m == "gpb-owt-ucm":
                pb = load_ucm2_mat(args.data / "ucm2" / f"{i}.mat")[2::2, 2::2]
            elif m.endswith("-ucm"):
                pb = timed(f"ucm:{m[:-4]}", owt_ucm, edges[m[:-4]])[2::2, 2::2]
            else:
                pb = edge_nms(edges[m].strength, edges[m].orientation)
            counts[m].append(evaluate_image(pb, gts, args.thresholds))
            print(f"  {i} {m}: {time.perf_counter() - t_m:.1f} s", flush=True)
        print(f"[{n + 1}/{len(ids)}] {i} done", flush=True)

    results = {m: evaluate_dataset(c) for m, c in counts.items()}
    timing = {k: float(np.median(v)) for k, v in ms.items()}
    print(f"\nBSDS500 sample ({len(ids)} test images), {args.thresholds} thresholds, tolerance 0.0075 x diagonal\n")
    print("| method | ODS F | ODS t | OIS F | AP |")
    print("|---|---|---|---|---|")
    for m, r in results.items():
        print(f"| {m} | {r['ods_f']:.3f} | {r['ods_threshold']:.2f} | {r['ois_f']:.3f} | {r['ap']:.3f} |")
    print(f"\n| stage (CPU, {torch.get_num_threads()} threads) | ms/image (median) |")
    print("|---|---|")
    for k, v in timing.items():
        print(f"| {k} | {v:.0f} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"images": ids, "thresholds": args.thresholds, "results": results, "ms_per_image": timing}, indent=1))
        print(f"\nsaved {args.out}")


if __name__ == "__main__":
    main()
