"""Feature extraction tasks: resolve the feature artifact, map shards over workers, finish it."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.backbone import BackboneRef, backbone_fingerprint, input_multiple, load_backbone
from tasks.manifest import DataRef, ensure_manifest, load_manifest
from tasks.stage import (IMAGE_SHARD_UNKEYED, FeaturesRef, ManifestRef, Work, declare, logger, run_stage,
                         worker_id)
from usseg_core.device import GPU_TAG, PRECISIONS, resolve_precision
from usseg_core.errors import InputError
from usseg_core.features import SHARD_SIZE, FeatureStore, NonFiniteFeatures, extract_into
from usseg_core.store import ArtifactStore
from usseg_core.views import ViewSpec, prepare_item, resolve_full_size

# 2: every chunk carries a crc32c and is written even when it equals the fill value (caches that detect
#    their own damage, docs/architecture.md "Integrity"); version-1 stores cannot be checked
# 3: dense maps in shards of ``shard_size`` items (zarr's sharding codec): N / shard_size objects, not N
FEATURES_VERSION = 3


def feature_params(data: DataRef, view: ViewSpec, precision: str) -> dict:
    """Parameters that decide the feature values (part of the key); ``precision`` is already resolved."""
    if precision not in PRECISIONS:
        raise ValueError(f"feature_params takes a resolved precision, got {precision!r}")
    return {"dataset": data.name, "split": data.split, "options": data.options, "view": view.params(),
            "precision": precision}


@task(name="extract-shard", cache_policy=NO_CACHE, retries=1, tags=[GPU_TAG])
def extract_shard(storage: str, key: str, data: DataRef, manifest_path: str, *, view: dict,
                  backbone: BackboneRef, start: int, stop: int, batch_size: int, precision: str) -> dict:
    """Embed the missing items of one shard ``[start, stop)`` and write them (one writer per shard)."""
    art = ArtifactStore(storage).open("features", key)
    fstore = FeatureStore(art.file("features.zarr"), mode="r+")
    todo = fstore.missing(start, stop)
    worker = worker_id(backbone.device)
    if not todo:
        return {"start": start, "written": 0, "worker": worker}
    from usseg_core.datasets.manifest import Manifest

    manifest = Manifest.from_json(manifest_path)
    ds = data.dataset()
    vs = ViewSpec.from_params(view)
    ids = manifest.ids

    log = logger()
    upscaled: list[str] = []

    def load_item(i: int) -> torch.Tensor:
        image = ds.load_image(ids[i // vs.per_image])
        if i % vs.per_image == 0 and upscale_factor(image.shape[:2], vs) > UPSCALE_WARN_FACTOR:
            upscaled.append(ids[i // vs.per_image])  # once per image, not once per five-crop
            if len(upscaled) <= UPSCALE_WARN_NAMED:
                warn_if_upscaled(image.shape[:2], vs, ds.image_path(ids[i // vs.per_image]), log)
        return prepare_item(image, vs, i % vs.per_image)

    model = load_backbone(backbone)
    with naming_images(lambda i: ds.image_path(ids[i // vs.per_image]), f"features/{key}"):
        written = extract_into(fstore, model, load_item, todo, batch_size=batch_size, precision=precision)
    if len(upscaled) > UPSCALE_WARN_NAMED:
        log.warning("%d more images of items [%d, %d) are upscaled more than %gx (e.g. %s)",
                    len(upscaled) - UPSCALE_WARN_NAMED, start, stop, UPSCALE_WARN_FACTOR, upscaled[-1])
    return {"start": start, "written": written, "worker": worker}


@contextlib.contextmanager
def naming_images(image_of: Callable[[int], object], artifact: str) -> Iterator[None]:
    """Features refused as non-finite become an error naming the image file they came from."""
    try:
        yield
    except NonFiniteFeatures as exc:
        raise InputError(image_of(exc.item), f"the backbone gave {exc.count} non-finite {exc.array} values "
                         f"(nan/inf) for it (item {exc.item} of {artifact}): refused, nothing of it was written; "
                         "try fp32 precision, or leave the image out") from exc


UPSCALE_WARN_FACTOR = 2.0
UPSCALE_WARN_NAMED = 5  # per shard: the first images are named, the rest counted in one line


def upscale_factor(image_hw: tuple[int, int], view: ViewSpec) -> float:
    """How much ``view`` enlarges an image of size ``image_hw`` (1.0 = no change, < 1 = shrinks).

    center_crop: resolution / short side; five_crop: resolution / short side of a crop (``crop_ratio``
    of each side); full: the larger of the two side ratios.
    """
    h, w = (max(1, int(v)) for v in image_hw)
    if view.policy == "center_crop":
        return view.resolution / min(h, w)
    if view.policy == "five_crop":
        return view.resolution / max(1.0, view.crop_ratio * min(h, w))
    oh, ow = view.output_size()
    return max(oh / h, ow / w)


def warn_if_upscaled(image_hw: tuple[int, int], view: ViewSpec, path, log=None,
                     factor: float = UPSCALE_WARN_FACTOR) -> bool:
    """Log a warning naming ``path`` and its size when ``view`` upscales it more than ``factor`` times.

    Features of a tiny image blown up (an 8x8 icon to 224x224) are mostly interpolation; the user should
    know. Returns True when it warned.
    """
    f = upscale_factor(image_hw, view)
    if f <= factor:
        return False
    (log or logger()).warning("%s: image is %dx%d (WxH), smaller than the view's input %dx%d; upscaled "
                              "%.1fx, its features will be mostly interpolation", path, image_hw[1],
                              image_hw[0], *reversed(view.output_size()), f)
    return True


def resolve_view(view: ViewSpec, data: DataRef, manifest: ManifestRef, backbone: BackboneRef) -> ViewSpec:
    """Fix a full-frame view's size (rounded to the backbone's input multiple), one size for all images.

    The rule (:func:`usseg_core.views.resolve_full_size`): the size comes from the *first* image of the
    manifest (sorted ids), read from its header (no decode); with ``resolution`` None its long side is
    capped at ``$USSEG_FULL_MAX_SIDE`` (1024), so one huge photo sorting first no longer sets a
    4000x6016 input for every image. Images of other sizes are resized to that size (their aspect
    ratio may change); labels keep their own size (codes are upsampled to them).
    """
    if view.policy != "full" or view.size is not None:
        return view
    first = load_manifest(manifest).ids[0]
    hw = data.dataset().image_hw(first)
    return resolve_full_size(view, hw, input_multiple(backbone.name))


FEATURES = declare("features", FEATURES_VERSION, "tasks.extract.extract_shard", unkeyed=IMAGE_SHARD_UNKEYED)


def ensure_features(storage: str, data: DataRef, backbone: BackboneRef, view: ViewSpec, *,
                    batch_size: int = 8, precision: str = "auto", shard_size: int = SHARD_SIZE,
                    manifest: ManifestRef | None = None) -> FeaturesRef:
    """The feature artifact of (data, backbone, view): a cache hit costs key look-ups only.

    Runs inside a flow: shards of ``shard_size`` items are mapped as Prefect tasks onto the flow's task
    runner, one task per stored shard, so two workers never write into one object; a killed extraction
    resumes with the items it had not written.
    """
    log = logger()
    manifest = manifest or ensure_manifest(data, storage)
    view = resolve_view(view, data, manifest, backbone)
    fingerprint = backbone_fingerprint(backbone, storage)
    precision = resolve_precision(precision, backbone.device)  # once, here: the key and every shard get it
    params = feature_params(data, view, precision)
    params["backbone"] = backbone.name
    workers: list = []

    def prepare() -> None:
        view.check_multiple(load_backbone(backbone).input_multiple)

    def body(work: Work) -> dict:
        model = load_backbone(backbone)
        n = manifest.n * view.per_image
        h, w = view.output_size()
        fstore = FeatureStore.create(work.art.file("features.zarr"), n, model.dim, h // model.stride,
                                     w // model.stride, shard_size=shard_size)
        todo = [(a, b) for a, b in fstore.shards() if fstore.missing(a, b)]
        log.info("extracting features/%s: %d items in %d shards (%d already done)", work.art.key, n, len(todo),
                 n - sum(len(fstore.missing(a, b)) for a, b in todo))
        futures = [work.core(extract_shard.submit, storage, work.art.key, data, manifest.path, view=view.params(),
                             backbone=backbone, start=a, stop=b, batch_size=batch_size, precision=precision)
                   for a, b in todo]
        results = [f.result() for f in futures]
        if not fstore.is_complete():
            raise RuntimeError(f"features/{work.art.key}: some items were not written; re-run to resume")
        workers.extend(sorted({r["worker"] for r in results if r["written"]}))
        return {"n_items": n, "shape": list(fstore.shape), "stride": model.stride, "dim": model.dim,
                "view": view.params(), "workers": sorted({r["worker"] for r in results})}

    def ref(art, hit: bool) -> FeaturesRef:
        return FeaturesRef.of(art, str(art.file("features.zarr")), hit, n=art.meta["n_items"], view=view.params(),
                              manifest=manifest, workers=list(workers))

    return run_stage(storage, FEATURES, params, {"manifest": manifest.hash, "backbone": fingerprint}, body, ref,
                     record_upstream={"manifest": manifest.key, "backbone": fingerprint}, prepare=prepare,
                     hit_note=lambda art: f"({art.meta['n_items']} items) - no backbone work",
                     info={"dataset": data.name, "split": data.split, "backbone": backbone.name,
                           "backbone_fingerprint": fingerprint, "skipped": manifest.skipped,
                           "weights": backbone.weights or ("random-init" if backbone.random_weights else "default")})
