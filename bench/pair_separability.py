"""Can STEGO help on this data? Same-class separability of self / KNN / random pixel pairs.

STEGO's loss (paper Eq. 4-5) attracts a pixel pair when its spatially centred feature correlation F^SC
exceeds the shift b of its pair type, and pushes it towards orthogonal codes otherwise. It can only beat
k-means on the raw features when (a) its KNN pairs carry *more* same-class pairs than random pairs (the
cross-image signal the paper distils), and (b) the thresholded F^SC agrees with class identity well enough
that the codes do not inherit its errors. This diagnostic measures both on a labelled split (labels are
used for the diagnosis only, never for training):

* per pair type: base rate of same-class pairs, ROC-AUC of the feature cosine (and of F^SC) for
  "same class", the fraction of pairs above the shift and their precision / recall for "same class";
* the same AUC for the codes of trained heads (head artifacts in the storage), to see whether training
  made codes more or less class-consistent than the features they were distilled from.

Pairs are drawn on cached features of the split: ``--view five_crop`` (default) uses its five-crop set, the
items training sees; ``--view eval`` its evaluation features (full frame / centre crop). KNN ranks 1..7 are
found among the same items' pooled features; labels are sampled at each feature cell's centre.

    python bench/pair_separability.py --storage STORAGE --dataset camvid11 --data-root ../shared/data/camvid \
        --eval-split val --heads HEAD_KEY [HEAD_KEY ...] --out sep.json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import cached_storage_arguments, write_json  # noqa: E402

def roc_auc(score, positive) -> float:
    """Mann-Whitney ROC-AUC of ``score`` for boolean ``positive`` (ties broken by order: fine for floats)."""
    import numpy as np

    s, y = np.asarray(score, dtype=np.float64), np.asarray(positive, dtype=bool)
    ranks = np.empty(len(s))
    ranks[np.argsort(s, kind="stable")] = np.arange(1, len(s) + 1)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def cell_labels(label, hw):
    """Label (H, W) sampled at the centres of an (h, w) feature grid -> (h, w)."""
    import numpy as np

    h, w = hw
    ys = ((np.arange(h) + 0.5) * label.shape[0] / h).astype(int)
    xs = ((np.arange(w) + 0.5) * label.shape[1] / w).astype(int)
    return label[np.ix_(ys, xs)]


def pair_stats(maps, labels, pairs, shifts, *, points: int = 121, seed: int = 0) -> dict:
    """Separability of one representation.

    Args:
        maps: (N, C, h, w) float tensor (features or codes).
        labels: (N, h, w) int tensor, −1 = ignore.
        pairs: {term: [(i, j), ...]}.
        shifts: {term: b} or None — when given, also the F^SC statistics around b.
    """
    import numpy as np
    import torch
    import torch.nn.functional as F

    from usseg_core.heads.stego import TERMS

    gen = torch.Generator().manual_seed(seed)
    unit = F.normalize(maps, dim=1).flatten(2)  # (N, C, h*w)
    flat_labels = labels.flatten(1)
    hw = unit.shape[-1]
    out = {}
    for term in TERMS:
        cos, centred, same = [], [], []
        for i, j in pairs[term]:
            p1 = torch.randint(0, hw, (points,), generator=gen)
            p2 = p1 if term == "self" else torch.randint(0, hw, (points,), generator=gen)
            l1, l2 = flat_labels[i, p1], flat_labels[j, p2]
            c = unit[i][:, p1].T @ unit[j][:, p2]  # (P, P)
            # F^SC as the loss: per query point, minus the mean over the other image's points, plus the mean
            fc = c - c.mean(dim=1, keepdim=True) + c.mean()
            valid = (l1[:, None] >= 0) & (l2[None, :] >= 0)
            cos.append(c[valid]), centred.append(fc[valid]), same.append((l1[:, None] == l2[None, :])[valid])
        c, fc, y = torch.cat(cos).numpy(), torch.cat(centred).numpy(), torch.cat(same).numpy()
        row = {"pairs": int(y.size), "same_class_rate": round(float(y.mean()), 3),
               "auc_cosine": round(roc_auc(c, y), 3), "auc_centred": round(roc_auc(fc, y), 3),
               "mean_cos_same": round(float(c[y].mean()), 3), "mean_cos_diff": round(float(c[~y].mean()), 3)}
        if shifts is not None:
            above = fc > shifts[term]
            row.update({"shift": shifts[term], "frac_above_shift": round(float(above.mean()), 3),
                        "precision_above_shift": round(float(y[above].mean()) if above.any() else np.nan, 3),
                        "recall_above_shift": round(float(above[y].mean()), 3)})
        out[term] = row
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cached_storage_arguments(ap)
    ap.add_argument("--view", choices=("five_crop", "eval"), default="five_crop")
    ap.add_argument("--heads", nargs="*", default=[], help="head artifact keys to compare with the features")
    ap.add_argument("--shifts", default=None, help="self,knn,random shifts (default: the first head's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import numpy as np
    import torch

    from bench.tune_shifts import _artifacts
    from usseg_core.heads import load_head
    from usseg_core.datasets import get_dataset
    from usseg_core.datasets.manifest import Manifest
    from usseg_core.features import FeatureStore
    from usseg_core.knn import mine_knn
    from usseg_core.store import ArtifactStore
    from usseg_core.heads.stego import TERMS
    from usseg_core.views import ViewSpec, prepare_label

    arts = [a for a in _artifacts(args.storage, "features", split=args.eval_split)
            if (a.meta["view"]["policy"] == "five_crop") == (args.view == "five_crop") and not a.meta["view"]["flip"]]
    if not arts:
        sys.exit(f"no cached {args.view} features of split {args.eval_split!r} under {args.storage}: "
                 "run `usseg run ...` with that split among the training or evaluation splits first")
    view = ViewSpec.from_params(arts[0].meta["view"])
    store = FeatureStore(arts[0].file("features.zarr"))
    feats = torch.from_numpy(np.stack([np.asarray(store[i], dtype=np.float32) for i in range(len(store))]))
    ds = get_dataset(args.dataset, args.data_root, args.eval_split)
    manifest = _artifacts(args.storage, "manifest", split=args.eval_split)[0]
    ids = Manifest.from_json(manifest.file("manifest.json")).ids
    per = view.per_image
    if len(ids) * per != len(feats):
        sys.exit(f"{len(feats)} feature items for {len(ids)} images x {per} views: stale cache?")
    labels = torch.from_numpy(np.stack([
        cell_labels(prepare_label(ds.load_label(ids[i // per]), view, i % per), feats.shape[-2:])
        for i in range(len(feats))]).astype(np.int64))

    knn = mine_knn(feats.mean(dim=(2, 3)).numpy(), k=7)[:, 1:]  # (N, 7) ranks 1..7, self excluded
    rng = np.random.default_rng(args.seed)
    n = len(feats)
    pairs = {"self": [(i, i) for i in range(n)],
             "knn": [(i, int(knn[i, rng.integers(7)])) for i in range(n)],
             "random": [(i, int((i + 1 + rng.integers(n - 1)) % n)) for i in range(n)]}

    heads = []
    root = ArtifactStore(args.storage)
    for key in args.heads:
        art = root.get("head", key)
        if art is None:
            sys.exit(f"no complete head artifact {key!r} under {args.storage} (see `usseg storage ls --stage head`)")
        heads.append((key, art))
    shifts = None
    if args.shifts:
        shifts = dict(zip(TERMS, (float(v) for v in args.shifts.split(","))))
    elif heads:
        shifts = dict(zip(TERMS, heads[0][1].meta["shifts"]))
    report = {"split": args.eval_split, "view": args.view, "items": n, "features": pair_stats(feats, labels, pairs, shifts, seed=args.seed)}
    for key, art in heads:
        head = load_head(art.path)
        with torch.no_grad():
            codes = torch.cat([head.codes(feats[a:a + 16]) for a in range(0, n, 16)])
        report[f"head {key}"] = pair_stats(codes, labels, pairs, None, seed=args.seed)
    write_json(args.out, report)


if __name__ == "__main__":
    main()
