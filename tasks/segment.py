"""Segment new images with a trained head: backbone -> codes -> clusterer (-> CRF) -> PNGs.

The photo's size only sets the labels: codes stay at feature resolution and are upsampled band by band
(``tasks.evaluate.predict_labels``), so a 24 MP photo needs its labels and its pictures, never a D-channel
map at its size; the dense CRF of a photo over ``$USSEG_CRF_MAX_PIXELS`` (1 MP) runs on a capped grid.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tasks.backbone import BackboneRef, load_backbone
from tasks.evaluate import hierarchy_maps, predict_labels
from tasks.heads import load_head
from usseg_core.crf import CRFParams, crf_max_pixels
from usseg_core.errors import ConfigError
from usseg_core.features import embed
from usseg_core.heads import get_head
from usseg_core.imageio import read_rgb
from usseg_core.store import ArtifactStore
from usseg_core.views import ViewSpec, prepare_item, resolve_full_size
from usseg_core.viz import colorize, hierarchy_strip, overlay, save_png


def _backbone_of(store: ArtifactStore, head_meta: dict) -> BackboneRef:
    """The backbone a head's codes come from: an imported head's ``backbone`` artifact, else the feature
    artifact (``features0`` / ``views0``) it was trained on; both record the name and the weights."""
    upstream = head_meta["upstream"]
    feats = store.find(upstream.get("backbone") or upstream.get("features0") or upstream["views0"]).meta
    w = feats.get("weights")
    return BackboneRef(feats["backbone"], None if w in (None, "default", "random-init") else w,
                       random_weights=w == "random-init")


def _kmeans_of(store: ArtifactStore, head_key: str, k: int) -> str:
    """The centroids of the head's k-means artifact with ``k`` clusters; none or several is a ConfigError
    that lists the K values there are."""
    by_k: dict[int, list] = {}
    for art in store.iter_artifacts("kmeans"):
        if art.complete and art.meta.get("upstream", {}).get("head") == head_key:
            kk = art.meta.get("k", (art.meta.get("params") or {}).get("k"))
            by_k.setdefault(int(kk), []).append(art)
    if not by_k:
        raise ConfigError(f"no k-means artifact for head {head_key}; run the train flow first")
    found = by_k.get(int(k), [])
    available = ", ".join(str(x) for x in sorted(by_k))
    if not found:
        raise ConfigError(f"head {head_key} has no k-means artifact with K={k}; available K: {available} "
                          "(pass --k K)")
    if len(found) > 1:
        raise ConfigError(f"head {head_key} has {len(found)} k-means artifacts with K={k} "
                          f"({', '.join(a.key for a in found)}); available K: {available}")
    return str(found[0].file("centroids.npy"))


def _write_hierarchy(out: Path, stem: str, image: np.ndarray, head, dense: torch.Tensor) -> list[Path]:
    """``<stem>_level<k>_<n>seg.png`` (k = 0 coarsest) label PNGs and ``<stem>_hierarchy.png``."""
    full = hierarchy_maps(head, dense, image.shape[:2])  # fine to coarse
    paths = []
    for k, lv in enumerate(reversed(full)):
        path = out / f"{stem}_level{k}_{len(np.unique(lv))}seg.png"
        save_png(path, lv.astype(np.uint16 if lv.max() > 255 else np.uint8))
        paths.append(path)
    save_png(out / f"{stem}_hierarchy.png", hierarchy_strip(image, full))
    return paths + [out / f"{stem}_hierarchy.png"]


def segment_images(images: list[Path], model: str, out: Path, *, clusterer: str = "own",
                   crf: bool = True, long_side: int = 480, storage: str, k: int | None = None) -> list[Path]:
    """``k``: the k-means K of ``clusterer="kmeans"`` (default: the head's number of classes)."""
    store = ArtifactStore(storage)
    head_art = store.find(model)
    if head_art.stage != "head" or not head_art.complete:
        raise ConfigError(f"{model}: not a complete head artifact (stage {head_art.stage})")
    ref = _backbone_of(store, head_art.meta)
    if ref.random_weights:
        ref = BackboneRef(ref.name, None, True, seed=0)
    backbone = load_backbone(ref)
    head_path = str(head_art.file("head.pt"))
    head = load_head(head_path)
    if clusterer == "own" and head.clusterer is None:  # HSG: per-image groups only; k-means labels the pixels
        clusterer = "kmeans"
    if clusterer in ("own", head.clusterer):
        pred = {"kind": "own", "path": head_path}
    elif clusterer == "kmeans":
        pred = {"kind": "kmeans", "path": _kmeans_of(store, head_art.key, k or head.n_classes)}
    else:
        raise ConfigError(f"clusterer {clusterer!r}: use {head.clusterer or 'own'} (the head's own) or kmeans")
    out.mkdir(parents=True, exist_ok=True)
    n = head.n_classes
    max_pixels = crf_max_pixels()  # a bigger photo is refined on a capped grid (usseg_core/crf.py)
    written = []
    for path in images:
        image = read_rgb(path)
        view = resolve_full_size(ViewSpec("full", long_side), image.shape[:2], backbone.input_multiple)
        dense, _ = embed(backbone, prepare_item(image, view)[None])
        with torch.no_grad():
            codes = head.codes(torch.from_numpy(dense))  # (1, D, h, w): upsampled band by band
        outs = predict_labels(pred, codes, image.shape[:2], image=image, crf=CRFParams() if crf else None,
                              crf_max_pixels=max_pixels)
        labels = outs["yes" if crf else "no"]
        stem = Path(path).stem
        save_png(out / f"{stem}_labels.png", labels.astype(np.uint8))
        save_png(out / f"{stem}_color.png", colorize(labels, n))
        save_png(out / f"{stem}_overlay.png", overlay(image, labels, n))
        written.append(out / f"{stem}_labels.png")
        if get_head(head.method).hierarchy:  # HSG: one PNG per level, coarse to fine, and a strip
            written += _write_hierarchy(out, stem, image, head, torch.from_numpy(dense))
    return written
