"""Can CAUSE's concept fragments help on this data? Class purity of the clusterbook's concepts and the
same-class rate of the pairs its front-door loss calls positive and negative.

CAUSE's head is trained to pull together tokens whose concepts are close (concept-vector cosine above
``pos_thresh``) and push apart those whose concepts are far (below ``neg_thresh``). It can only beat k-means
on the raw features when the positives are mostly same-class and the negatives mostly not. This
diagnostic measures that on a labelled split's five-crops (labels are used for the diagnosis only, never
for training), with labels sampled at each feature cell's centre:

* concept purity: the share of labelled tokens whose concept's majority class is their class (the
  accuracy of the 2048-concept quantisation read as a clustering), and the number of concepts in use;
* per pair kind (tokens of one image, of two random images): the base rate of same-class pairs, the
  fraction of pairs chosen as positive / negative, and the same-class rate among each;
* with ``--heads KEY ...``: the ROC-AUC of the cosine for "same class" on random token pairs, of the raw
  features and of each head's codes (did training make codes more class-consistent than the features?),
  and the share of tokens each of the head's own clusters takes (largest first: a collapse shows here).

    python bench/cause_fragments.py --storage STORAGE --dataset camvid11 --data-root ../shared/data/camvid \
        --eval-split val --clusterbook KEY --out fragments.json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import cached_artifacts, cached_storage_arguments, write_json  # noqa: E402
from bench.pair_separability import cell_labels, roc_auc  # noqa: E402


def fragment_stats(concepts, labels, book, pos_thresh: float, neg_thresh: float, *, pairs: int = 200_000,
                   seed: int = 0) -> dict:
    """``concepts`` (N, P) concept ids, ``labels`` (N, P) class ids (−1 ignore), ``book`` (K, C)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    valid = labels >= 0
    c, y = concepts[valid], labels[valid]
    n_classes = int(y.max()) + 1
    table = torch.zeros(book.shape[0], n_classes, dtype=torch.long)
    table.index_put_((c, y), torch.ones_like(c), accumulate=True)
    purity = float(table.max(dim=1).values.sum()) / float(len(c))
    bn = F.normalize(book, dim=1)
    gen = torch.Generator().manual_seed(seed)
    n, p = concepts.shape
    out = {"tokens": int(len(c)), "concepts_in_use": int((table.sum(1) > 0).sum()), "concept_purity": round(purity, 4)}
    for kind in ("same image", "random images"):
        i = torch.randint(n, (pairs,), generator=gen)
        j = i if kind == "same image" else torch.randint(n, (pairs,), generator=gen)
        a, b = torch.randint(p, (pairs,), generator=gen), torch.randint(p, (pairs,), generator=gen)
        la, lb = labels[i, a], labels[j, b]
        keep = (la >= 0) & (lb >= 0) & ~((i == j) & (a == b))
        same = (la == lb)[keep]
        sim = (bn[concepts[i, a]] * bn[concepts[j, b]]).sum(1)[keep]
        pos, neg = sim > pos_thresh, sim < neg_thresh
        out[kind] = {"pairs": int(keep.sum()), "same_class_rate": round(float(same.float().mean()), 4),
                     "positive_fraction": round(float(pos.float().mean()), 4),
                     "positive_same_class": round(float(same[pos].float().mean()) if pos.any() else np.nan, 4),
                     "negative_fraction": round(float(neg.float().mean()), 4),
                     "negative_same_class": round(float(same[neg].float().mean()) if neg.any() else np.nan, 4),
                     "same_concept_same_class": round(float(same[sim > 0.9999].float().mean())
                                                      if (sim > 0.9999).any() else np.nan, 4)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cached_storage_arguments(ap)
    ap.add_argument("--clusterbook", required=True, help="clusterbook artifact key")
    ap.add_argument("--pos-thresh", type=float, default=0.3)
    ap.add_argument("--neg-thresh", type=float, default=0.1)
    ap.add_argument("--heads", nargs="*", default=[], help="head artifact keys whose codes to score")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import numpy as np
    import torch

    from usseg_core.datasets import get_dataset
    from usseg_core.datasets.manifest import Manifest
    from usseg_core.features import FeatureStore
    from usseg_core.heads.cause import concept_index, tokens
    from usseg_core.store import ArtifactStore
    from usseg_core.views import ViewSpec, prepare_label

    art = ArtifactStore(args.storage).get("clusterbook", args.clusterbook)
    if art is None:
        sys.exit(f"no complete clusterbook {args.clusterbook!r} under {args.storage}")
    book = torch.from_numpy(np.load(art.file("clusterbook.npy")))
    feats_art = [a for a in cached_artifacts(args.storage, "features", split=args.eval_split)
                 if a.meta["view"]["policy"] == "five_crop" and not a.meta["view"]["flip"]]
    if not feats_art:
        sys.exit(f"no cached five-crop features of split {args.eval_split!r} under {args.storage}")
    fa = feats_art[-1]
    view = ViewSpec.from_params(fa.meta["view"])
    store = FeatureStore(fa.file("features.zarr"))
    ids = Manifest.from_json(ArtifactStore(args.storage).get("manifest", fa.meta["upstream"]["manifest"])
                             .file("manifest.json")).ids
    ds = get_dataset(args.dataset, args.data_root, args.eval_split)
    per = view.per_image
    hw = tuple(store.shape[2:])
    concepts, labels, feats = [], [], []
    for i0 in range(0, len(store), 64):
        idx = range(i0, min(i0 + 64, len(store)))
        x = torch.from_numpy(np.stack([np.asarray(store[i], dtype=np.float32) for i in idx]))
        concepts.append(concept_index(tokens(x), book))
        feats.append(x)
        labels.append(torch.from_numpy(np.stack([
            cell_labels(prepare_label(ds.load_label(ids[i // per]), view, i % per), hw).reshape(-1)
            for i in idx]).astype(np.int64)))
    report = {"split": args.eval_split, "clusterbook": args.clusterbook, "items": len(store),
              "pos_thresh": args.pos_thresh, "neg_thresh": args.neg_thresh,
              **fragment_stats(torch.cat(concepts), torch.cat(labels), book, args.pos_thresh, args.neg_thresh,
                               seed=args.seed)}
    feats, labels = torch.cat(feats), torch.cat(labels)
    report["auc_cosine_same_class"] = {"features": code_auc(feats, labels, args.seed)}
    from usseg_core.heads import load_head

    for key in args.heads:
        head_art = ArtifactStore(args.storage).get("head", key)
        if head_art is None:
            sys.exit(f"no complete head artifact {key!r} under {args.storage}")
        head = load_head(head_art.path)
        with torch.no_grad():
            codes = torch.cat([head.codes(feats[a:a + 16]) for a in range(0, len(feats), 16)])
        name = f"{head_art.meta['params']['method']} {key}"
        report["auc_cosine_same_class"][name] = code_auc(codes, labels, args.seed)
        if head.clusterer is not None:  # how many of its own clusters the head's probe uses, and how evenly
            with torch.no_grad():
                assign = torch.cat([head.assign(codes[a:a + 64]) for a in range(0, len(codes), 64)])
            share = torch.bincount(assign.reshape(-1), minlength=head.n_classes).float() / assign.numel()
            report.setdefault("own_cluster_shares", {})[name] = [round(float(v), 4) for v in
                                                                  share.sort(descending=True).values]
    write_json(args.out, report)


def code_auc(maps, labels, seed: int, pairs: int = 200_000) -> float:
    """ROC-AUC of the cosine of random token pairs (any two items) for "same class": maps (N, C, h, w)."""
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(seed)
    unit = F.normalize(maps.flatten(2), dim=1)  # (N, C, P)
    n, _, p = unit.shape
    i, j = torch.randint(n, (pairs,), generator=gen), torch.randint(n, (pairs,), generator=gen)
    a, b = torch.randint(p, (pairs,), generator=gen), torch.randint(p, (pairs,), generator=gen)
    la, lb = labels[i, a], labels[j, b]
    keep = (la >= 0) & (lb >= 0)
    cos = (unit[i, :, a] * unit[j, :, b]).sum(1)
    return round(roc_auc(cos[keep].numpy(), (la == lb)[keep].numpy()), 4)


if __name__ == "__main__":
    main()
