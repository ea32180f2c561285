"""PiCIE variants on cached view banks (no CRF, flip TTA, Hungarian over the split): why PiCIE scores what it does.

Reads a storage root where `usseg run picie` has cached the view banks of the training splits, the base
(un-augmented) training frames and the evaluation features (+ flips) of a labelled split; trains one head
per variant (``--variant`` = comma-separated PicieConfig overrides, e.g. ``balance=inverse,lr=1e-4``) and
prints, per variant: its own centroids, k-means on its codes (fitted on the base frames), and a linear
probe on its codes (labels of ``--probe-split``) — the information left in the codes — against k-means
on the raw features of the same frames.

    python bench/picie_ablation.py --storage S --data-root ../shared/data/camvid \
        --variant balance=frequency --variant balance=inverse --variant balance=none --epochs 10
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import cached_artifacts, cached_storage_arguments, labelled_split, write_json  # noqa: E402
from bench.tune_shifts import evaluate_codes  # noqa: E402


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _variant(text: str) -> dict:
    return {k: _value(v) for k, v in (p.split("=", 1) for p in text.split(",") if p)}


def _linear_probe_miou(codes_fn, feats, ds, ids, n: int, epochs: int = 10) -> tuple[float, float]:
    """Linear probe on codes of a labelled split, scored on the same split (an information measure).

    Labels are nearest-downsampled to the code grid (cheap: no upsampled 472-channel maps).
    """
    import numpy as np
    import torch
    import torch.nn.functional as F

    from usseg_core.heads.probes import train_linear_probe
    from usseg_core.metrics import ConfusionMatrix, identity_scores

    with torch.no_grad():
        codes = [codes_fn(torch.from_numpy(feats[i].astype(np.float32))[None]) for i in range(len(ids))]
    grid = codes[0].shape[-2:]
    labels = [F.interpolate(torch.from_numpy(ds.load_label(i).astype(np.float32))[None, None], size=grid,
                            mode="nearest")[0, 0].long() for i in ids]

    def batches():
        for a in range(0, len(ids), 8):
            yield torch.cat(codes[a:a + 8]), torch.stack(labels[a:a + 8])

    probe = train_linear_probe(batches, n, epochs=epochs, lr=1e-3)
    cm = ConfusionMatrix(n, n)
    with torch.no_grad():
        for c, lab in batches():
            cm.update(probe.predict(c).numpy().ravel(), lab.numpy().ravel())
    sc = identity_scores(cm.matrix)
    return round(100 * sc.miou, 2), round(100 * sc.accuracy, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    cached_storage_arguments(ap)
    ap.add_argument("--variant", action="append", default=[], help="PicieConfig overrides, comma-separated")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import numpy as np
    import torch

    from tasks.heads import open_features
    from usseg_core.cluster import spherical_kmeans
    from usseg_core.features import FeatureStore
    from usseg_core.heads import HeadInputs, get_head
    from usseg_core.heads.picie_train import train_picie_head
    from usseg_core.viewbank import ViewBank

    banks = [ViewBank(a.path) for a in sorted(cached_artifacts(args.storage, "views"), key=lambda a: a.meta["split"])]
    for b in banks:
        b.load_all()
    base_arts = [a for a in cached_artifacts(args.storage, "features") if a.meta["view"]["policy"] != "five_crop"
                 and a.meta["view"]["resolution"] is not None and not a.meta["view"]["flip"]]
    base = open_features([{"path": str(a.file("features.zarr"))} for a in sorted(base_arts, key=lambda a: a.meta["split"])])
    base.load_all()
    evals = [a for a in cached_artifacts(args.storage, "features", split=args.eval_split)
             if a.meta["view"]["policy"] != "five_crop" and a.meta["view"]["resolution"] is None]
    ev = FeatureStore(next(a for a in evals if not a.meta["view"]["flip"]).file("features.zarr"))
    fl = FeatureStore(next(a for a in evals if a.meta["view"]["flip"]).file("features.zarr"))
    ev.load_all(), fl.load_all()
    ds, ids = labelled_split(args)
    n = ds.n_classes

    def pixels(codes_fn):
        def gen():
            with torch.no_grad():
                for a in range(0, len(base), 32):
                    x = torch.from_numpy(np.stack([base[i] for i in range(a, min(a + 32, len(base)))]).astype(np.float32))
                    z = codes_fn(x)
                    yield z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).numpy()
        return gen

    identity = lambda t: t  # noqa: E731
    raw_c = torch.from_numpy(spherical_kmeans(pixels(identity), n, seed=0))
    rows = [{"variant": "raw-features", "kmeans": evaluate_codes(identity, raw_c, ev, fl, ds, ids, n, "kmeans"),
             "linear": _linear_probe_miou(identity, ev, ds, ids, n)}]
    print(rows[-1], flush=True)
    for text in args.variant:
        for seed in args.seeds:
            over = {"epochs": args.epochs, "seed": seed, **_variant(text)}
            config = get_head("picie").config(args.dataset, over)
            t0 = time.perf_counter()
            res = train_picie_head(HeadInputs(n_classes=n, views=banks), config, device="cpu", progress=False)
            seconds = time.perf_counter() - t0
            head = get_head("picie").load({"in_dim": res.payload["in_dim"], "code_dim": res.payload["code_dim"],
                                           "n_classes": n, "config": {"picie": config["picie"].to_dict()},
                                           "head": res.payload["head"], "centroids": res.payload["centroids"]})
            codes_c = torch.from_numpy(spherical_kmeans(pixels(head.codes), n, seed=0))
            rows.append({"variant": text, "seed": seed, "train_s": round(seconds, 1),
                         "centroids": evaluate_codes(head.codes, head.centroids, ev, fl, ds, ids, n, "kmeans"),
                         "kmeans": evaluate_codes(head.codes, codes_c, ev, fl, ds, ids, n, "kmeans"),
                         "linear": _linear_probe_miou(head.codes, ev, ds, ids, n),
                         "last_epoch": {k: round(v, 3) for k, v in
                                        [h for h in res.history if "epoch" in h][-1].items()}})
            print(rows[-1], flush=True)
    write_json(args.out, {"epochs": args.epochs, "rows": rows, "columns": "(mIoU, accuracy), no CRF"})


if __name__ == "__main__":
    main()
