"""Segment images with a trained head: backbone -> codes -> clusterer (-> CRF) -> PNGs, and the ``segment``
stage of flow ``segment`` (flows/segment.py), resumable image by image.

The photo's size only sets the labels: codes stay at feature resolution and are upsampled band by band
(``tasks.evaluate.predict_labels``), so a 24 MP photo needs its labels and its pictures, never a D-channel
map at its size; the dense CRF of a photo over ``$USSEG_CRF_MAX_PIXELS`` (1 MP) runs on a capped grid.

The stage writes, per image, ``images/<stem>_labels.png`` (cluster ids), ``_color.png``, ``_overlay.png``
(HSG: also one PNG per hierarchy level and a strip), each atomically, and last ``<stem>_pixels.json`` (the
pixels of each cluster): an image whose JSON exists is done, so a re-run after an interruption segments
only the others. Image shards fan out over the flow's task runner.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.backbone import BackboneRef, load_backbone
from tasks.evaluate import hierarchy_maps, predict_labels
from tasks.heads import load_head
from tasks.manifest import DataRef
from tasks.stage import ArtifactRef, Work, declare, logger, run_stage, stage_task, worker_id
from usseg_core.crf import CRF_MAX_PIXELS, CRFParams, crf_max_pixels
from usseg_core.device import GPU_TAG
from usseg_core.errors import ConfigError
from usseg_core.features import embed
from usseg_core.heads import get_head
from usseg_core.imageio import read_rgb
from usseg_core.store import ArtifactStore, atomic_write_bytes
from usseg_core.views import ViewSpec, prepare_item, resolve_full_size
from usseg_core.viz import colorize, hierarchy_strip, overlay, save_png

SEGMENT_VERSION = 1
IMAGES = "images"  # the per-image outputs, inside the artifact
SEGMENT = declare("segment", SEGMENT_VERSION, "tasks.segment.segment_shard",
                  unkeyed={"storage": "where the artifact is", "key": "the artifact (the key itself)",
                           "model": "keyed by the head's and the predictor's artifact keys",
                           "data": "keyed by the images' content hash", "items": "which images a shard segments",
                           "device": "where it runs: part of no key (docs/architecture.md, Devices)",
                           "crf_max_pixels": "keyed when not the default (as the evaluation's)"})


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


@dataclass(frozen=True)
class SegmentModel:
    """What segmenting with a head needs, resolved once from the store: the head, its backbone, the
    clusterer (``predictor``: ``{"kind": "own" | "kmeans", "path"}``, its artifact ``predictor_key``) and its
    number of clusters; ``hierarchy``: the head also writes its levels (HSG)."""

    head_key: str
    head_path: str
    method: str
    backbone: BackboneRef
    predictor: dict
    predictor_key: str
    n_clusters: int
    hierarchy: bool


def segment_model(storage: str, model: str, *, clusterer: str = "own", k: int | None = None) -> SegmentModel:
    """The head artifact ``model`` (a unique key prefix) with its backbone and clusterer: ``own`` is the
    head's (STEGO's cluster probe, PiCIE's centroids; k-means for a head without one, HSG), ``kmeans`` the
    head's k-means artifact with ``k`` clusters (default: the head's number of classes)."""
    store = ArtifactStore(storage)
    art = store.find(model)
    if art.stage != "head" or not art.complete:
        raise ConfigError(f"{model}: not a complete head artifact ({art.stage}/{art.key}); "
                          "see `usseg storage ls --stage head`")
    method = art.meta.get("method") or art.meta["params"]["method"]
    spec = get_head(method)
    ref = _backbone_of(store, art.meta)
    if ref.random_weights:
        ref = BackboneRef(ref.name, None, True, seed=0)
    head_path, n_classes = str(art.file("head.pt")), int(art.meta["params"]["n_classes"])
    if clusterer == "own" and spec.clusterer is None:  # HSG: per-image groups only; k-means labels the pixels
        clusterer = "kmeans"
    if clusterer in ("own", spec.clusterer):
        pred, pred_key, n = {"kind": "own", "path": head_path}, art.key, n_classes
    elif clusterer == "kmeans":
        centroids = Path(_kmeans_of(store, art.key, k or n_classes))  # <storage>/kmeans/<key>/centroids.npy
        pred, pred_key, n = {"kind": "kmeans", "path": str(centroids)}, centroids.parent.name, int(k or n_classes)
    else:
        raise ConfigError(f"clusterer {clusterer!r}: use {spec.clusterer or 'own'} (the head's own) or kmeans")
    return SegmentModel(art.key, head_path, method, ref, pred, pred_key, n, bool(spec.hierarchy))


def segment_image(model: SegmentModel, image: np.ndarray, *, crf: bool, long_side: int, device: str = "cpu",
                  max_pixels: int = CRF_MAX_PIXELS) -> tuple[np.ndarray, list[np.ndarray] | None]:
    """``(labels (H, W) int, hierarchy levels fine to coarse or None)`` of one (H, W, 3) uint8 image."""
    backbone = load_backbone(BackboneRef(model.backbone.name, model.backbone.weights, model.backbone.random_weights,
                                         model.backbone.seed, device))
    head = load_head(model.head_path, device)
    view = resolve_full_size(ViewSpec("full", long_side), image.shape[:2], backbone.input_multiple)
    dense, _ = embed(backbone, prepare_item(image, view)[None])
    dense = torch.from_numpy(dense).to(device)
    with torch.no_grad():
        codes = head.codes(dense)  # (1, D, h, w): upsampled band by band
    outs = predict_labels(model.predictor, codes, image.shape[:2], image=image, crf=CRFParams() if crf else None,
                          crf_max_pixels=max_pixels)
    levels = hierarchy_maps(head, dense, image.shape[:2]) if model.hierarchy else None
    return outs["yes" if crf else "no"], levels


def _png(path: Path, array: np.ndarray, atomic: bool) -> Path:
    if not atomic:
        save_png(path, array)
        return path
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return path


def write_outputs(out: Path, stem: str, image: np.ndarray, labels: np.ndarray, n: int,
                  levels: list[np.ndarray] | None, *, atomic: bool = False) -> list[Path]:
    """``<stem>_labels.png`` (uint8 ids; uint16 past 255 clusters), ``_color.png``, ``_overlay.png``; with
    ``levels``, ``<stem>_level<k>_<n>seg.png`` (k = 0 coarsest) and ``<stem>_hierarchy.png``."""
    written = [_png(out / f"{stem}_labels.png", labels.astype(np.uint8 if n <= 256 else np.uint16), atomic),
               _png(out / f"{stem}_color.png", colorize(labels, n), atomic),
               _png(out / f"{stem}_overlay.png", overlay(image, labels, n), atomic)]
    for k, lv in enumerate(reversed(levels or [])):
        written.append(_png(out / f"{stem}_level{k}_{len(np.unique(lv))}seg.png",
                            lv.astype(np.uint16 if lv.max() > 255 else np.uint8), atomic))
    if levels:
        written.append(_png(out / f"{stem}_hierarchy.png", hierarchy_strip(image, levels), atomic))
    return written


def stem_of(image_id: str) -> str:
    """The file stem of an image id (ids of nested datasets hold '/')."""
    return image_id.replace("/", "__")


def pixel_counts(labels: np.ndarray, n: int) -> dict[str, int]:
    """Pixels per cluster id present in ``labels`` (keys are ids as strings: JSON)."""
    counts = np.bincount(labels.reshape(-1).astype(np.int64), minlength=n)
    return {str(c): int(v) for c, v in enumerate(counts) if v}


@dataclass(frozen=True)
class ImageSet:
    """Which images a segmentation covers: ``items`` (id, file) in order, read through ``data`` when they
    are a dataset split (its reader), else as image files; ``hash`` identifies their contents."""

    items: list = field(default_factory=list)
    hash: str = ""
    data: DataRef | None = None

    @property
    def ids(self) -> list[str]:
        return [i for i, _ in self.items]


def image_files(paths: list[str]) -> ImageSet:
    """Images named one by one: ids are file stems (two files with one stem are refused), keyed by content."""
    import hashlib

    from usseg_core.datasets.manifest import file_sha256

    items, seen, h = [], {}, hashlib.sha256()
    for p in paths:
        path = Path(p).expanduser().resolve()
        if path.stem in seen:
            raise ConfigError(f"images {seen[path.stem]} and {path} have one name ({path.stem}): rename one")
        seen[path.stem] = path
        size, sha = file_sha256(path)
        h.update(f"{path.stem}\0{size}\0{sha}\n".encode("utf-8", "surrogateescape"))
        items.append((path.stem, str(path)))
    return ImageSet(items, h.hexdigest())


def _read(images: ImageSet, item: tuple[str, str]) -> np.ndarray:
    return images.data.dataset().load_image(item[0]) if images.data is not None else read_rgb(item[1])


@task(name="segment-shard", cache_policy=NO_CACHE, retries=1, tags=[GPU_TAG])
def segment_shard(storage: str, key: str, model: SegmentModel, data: DataRef | None, items: list, *, crf: bool,
                  long_side: int, device: str, crf_max_pixels: int) -> dict:
    """Segment the images of ``items`` not done yet into artifact ``segment/<key>`` (``<stem>_pixels.json``
    last: an image is done once it exists)."""
    from usseg_core.device import resolve_device

    folder = ArtifactStore(storage).open("segment", key).path / IMAGES
    folder.mkdir(exist_ok=True)
    dev, written = str(resolve_device(device)), 0
    for item in items:
        stem = stem_of(item[0])
        if (folder / f"{stem}_pixels.json").exists():
            continue
        image = _read(ImageSet(data=data), item)
        labels, levels = segment_image(model, image, crf=crf, long_side=long_side, device=dev,
                                       max_pixels=crf_max_pixels)
        write_outputs(folder, stem, image, labels, model.n_clusters, levels, atomic=True)
        counts = {"id": item[0], "height": int(labels.shape[0]), "width": int(labels.shape[1]),
                  "pixels": pixel_counts(labels, model.n_clusters)}
        atomic_write_bytes(folder / f"{stem}_pixels.json", json.dumps(counts).encode())
        written += 1
    return {"written": written, "worker": worker_id(dev)}


@dataclass(frozen=True, kw_only=True)
class SegmentRef(ArtifactRef):
    """A segmentation: ``path`` is its folder (``images/``, ``pixels.parquet``); ``ids`` its images in
    order, ``n_clusters``, ``written`` the images this run segmented (0 on a cache hit)."""

    ids: list
    n_clusters: int
    head: str
    written: int = 0


def _pixels_table(folder: Path, ids: list[str]):
    import pandas as pd

    rows = []
    for image_id in ids:
        counts = json.loads((folder / IMAGES / f"{stem_of(image_id)}_pixels.json").read_text())
        rows += [{"image_id": image_id, "class_id": int(c), "pixels": int(v), "height": counts["height"],
                  "width": counts["width"]} for c, v in counts["pixels"].items()]
    return pd.DataFrame(rows, columns=["image_id", "class_id", "pixels", "height", "width"])


@stage_task("segment")
def ensure_segmentation(storage: str, model: SegmentModel, images: ImageSet, *, crf: bool = True,
                        long_side: int = 480, shard_size: int = 16, device: str = "auto") -> SegmentRef:
    """Every image of ``images`` segmented with ``model`` (found by key, or resumed image by image)."""
    max_pixels = crf_max_pixels()
    params = {"clusterer": model.predictor["kind"], "n_clusters": model.n_clusters, "crf": crf,
              "long_side": long_side}
    if max_pixels != CRF_MAX_PIXELS:
        params["crf_max_pixels"] = max_pixels
    upstream = {"head": model.head_key, "predictor": model.predictor_key, "images": images.hash}
    counted: list = []

    def body(work: Work) -> dict:
        folder = work.art.path / IMAGES
        folder.mkdir(exist_ok=True)
        for stale in folder.glob(".*"):  # temporary files of a write a kill interrupted
            stale.unlink()
        todo = [it for it in images.items if not (folder / f"{stem_of(it[0])}_pixels.json").exists()]
        logger().info("segment/%s: %d images, %d already done", work.art.key, len(images.items),
                      len(images.items) - len(todo))
        shards = [todo[a:a + shard_size] for a in range(0, len(todo), shard_size)]
        futures = [work.core(segment_shard.submit, storage, work.art.key, model, images.data, items, crf=crf,
                             long_side=long_side, device=device, crf_max_pixels=max_pixels) for items in shards]
        for f in futures:  # every shard ends (its images done) before a failed one stops the stage
            f.wait()
        results = [f.result() for f in futures]
        counted.append(sum(r["written"] for r in results))
        _pixels_table(work.art.path, images.ids).to_parquet(work.art.file("pixels.parquet"), index=False)
        return {"n_images": len(images.items), "ids": images.ids, "n_clusters": model.n_clusters,
                "method": model.method, "workers": sorted({r["worker"] for r in results if r["written"]})}

    def ref(art, hit: bool) -> SegmentRef:
        return SegmentRef.of(art, str(art.path), hit, ids=list(art.meta["ids"]), n_clusters=int(art.meta["n_clusters"]),
                             head=model.head_key, written=sum(counted))

    info = {"dataset": images.data.name if images.data else None, "split": images.data.split if images.data else None}
    return run_stage(storage, SEGMENT, params, upstream, body, ref, info=info)


def segment_images(images: list[Path], model: str, out: Path, *, clusterer: str = "own",
                   crf: bool = True, long_side: int = 480, storage: str, k: int | None = None) -> list[Path]:
    """Segment image files into ``out`` directly, without the store's cache (a notebook's way; the command
    runs flow ``segment``). ``k``: the k-means K of ``clusterer="kmeans"`` (default: the head's classes)."""
    plan = segment_model(storage, model, clusterer=clusterer, k=k)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in images:
        image = read_rgb(path)
        labels, levels = segment_image(plan, image, crf=crf, long_side=long_side, max_pixels=crf_max_pixels())
        written += write_outputs(out, Path(path).stem, image, labels, plan.n_clusters, levels)
    return written
