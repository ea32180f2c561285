"""Tune STEGO's automatic-shift targets on cached features (no CRF, cluster probe + k-means, Hungarian).

Reads an existing storage root where `usseg run stego` has cached the five-crop training features, the
KNN table and the evaluation features (+ flips) of a labelled split; trains one head per target setting
and prints cluster-probe mIoU / accuracy against raw-feature k-means on the same features.

    python bench/tune_shifts.py --storage /path/storage --dataset camvid11 --data-root ../shared/data/camvid \
        --eval-split val --targets 0.333,0.333,0.15 0.35,0.45,0.06 --steps 1500 --seeds 0 1
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import cached_artifacts, cached_storage_arguments, labelled_split, write_json  # noqa: E402


def evaluate_codes(head, centroids_or_probe, feats, flips, ds, ids, n_classes, kind):
    import numpy as np
    import torch
    import torch.nn.functional as F

    from usseg_core.cluster import cluster_logits
    from usseg_core.metrics import ConfusionMatrix, hungarian_scores

    cm = ConfusionMatrix(n_classes if kind == "probe" else len(centroids_or_probe), n_classes)
    with torch.no_grad():
        for i, id_ in enumerate(ids):
            label = ds.load_label(id_)
            f = torch.from_numpy(feats[i].astype(np.float32))[None]
            g = torch.from_numpy(flips[i].astype(np.float32))[None]
            codes = (head(f) + head(g).flip(-1)) / 2
            codes = F.interpolate(codes, size=label.shape, mode="bilinear", align_corners=False)
            logits = (centroids_or_probe.cosine(codes) if kind == "probe"
                      else cluster_logits(codes, centroids_or_probe))
            cm.update(logits.argmax(1)[0].numpy(), label)
    sc = hungarian_scores(cm.matrix)
    return round(100 * sc.miou, 2), round(100 * sc.accuracy, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    cached_storage_arguments(ap)
    ap.add_argument("--targets", nargs="+", default=["0.3333,0.3333,0.15"])
    ap.add_argument("--shifts", nargs="*", default=[], help="fixed shifts to compare, e.g. 0.33,0.26,0.30")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--methods", nargs="+", default=["stego"], help="stego and/or omh (same seed, steps)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import numpy as np

    from tasks.heads import open_features
    from usseg_core.cluster import spherical_kmeans
    from usseg_core.features import FeatureStore

    knn_art = cached_artifacts(args.storage, "knn")[0]
    train_keys = [v for k, v in sorted(knn_art.meta["upstream"].items())]
    train_infos = [{"key": k, "path": str(Path(args.storage) / "features" / k / "features.zarr")} for k in train_keys]
    feats = open_features(train_infos)
    feats.load_all()
    knn = np.load(knn_art.file("knn.npy"))
    evals = [a for a in cached_artifacts(args.storage, "features", split=args.eval_split)
             if a.meta["view"]["policy"] != "five_crop"]
    plain = next(a for a in evals if not a.meta["view"]["flip"])
    flip = next(a for a in evals if a.meta["view"]["flip"])
    ev, fl = FeatureStore(plain.file("features.zarr")), FeatureStore(flip.file("features.zarr"))
    ev.load_all(), fl.load_all()
    ds, ids = labelled_split(args)
    n = ds.n_classes

    def pixels():
        for a in range(0, len(feats), 32):
            x = np.stack([feats[i] for i in range(a, min(a + 32, len(feats)))]).astype(np.float32)
            yield x.transpose(0, 2, 3, 1).reshape(-1, x.shape[1])

    raw_c = spherical_kmeans(pixels, n, seed=0)
    import torch

    identity = lambda t: t  # noqa: E731
    rows = [{"setting": "raw-features k-means", "seed": 0,
             "kmeans": evaluate_codes(identity, torch.from_numpy(raw_c), ev, fl, ds, ids, n, "kmeans")}]
    print(rows[-1], flush=True)
    settings = [("targets", t) for t in args.targets] + [("shifts", s) for s in args.shifts]
    for kind, value in settings:
        triple = tuple(float(v) for v in value.split(","))
        for seed in args.seeds:
            over = {"auto_targets": triple} if kind == "targets" else {"shifts": triple}
            for method in args.methods:
                rows.append(_train_and_score(method, args, over, seed, feats, knn, n, ev, fl, ds, ids, value, kind))
                print(rows[-1], flush=True)
    write_json(args.out, {"steps": args.steps, "rows": rows, "columns": "(mIoU, accuracy), no CRF"})


def _train_and_score(method, args, over, seed, feats, knn, n, ev, fl, ds, ids, value, kind) -> dict:
    import time

    from usseg_core.heads.probes import ClusterProbe
    from usseg_core.heads.stego import StegoHead, stego_config_for
    from usseg_core.heads.stego_train import train_stego

    cfg = stego_config_for(args.dataset, steps=args.steps, seed=seed, **over)
    aux = None
    if method == "omh":
        from usseg_core.heads.omh import OMHLoss

        aux = OMHLoss(cfg.dim, n)
    t0 = time.perf_counter()
    res = train_stego(feats, knn, n, cfg, progress=False, device="cpu", aux=aux)
    seconds = time.perf_counter() - t0
    head = StegoHead(feats.shape[1], cfg.dim, cfg.dropout)
    head.load_state_dict(res.head_state)
    head.eval()
    probe = ClusterProbe(cfg.dim, n)
    probe.load_state_dict(res.cluster_state)
    return {"method": method, "setting": f"{kind} {value}", "seed": seed,
            "shifts": [round(s, 3) for s in res.shifts], "train_s": round(seconds, 1),
            "probe": evaluate_codes(head.codes, probe, ev, fl, ds, ids, n, "probe"),
            "final": {k: round(v, 3) for k, v in res.history[-1].items() if "corr" in k}}



if __name__ == "__main__":
    main()
