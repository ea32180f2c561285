"""View-bank tasks: record the draws, map shards of plain + warped extraction over workers, finish it.

The artifact (stage ``views``) is a folder with ``draws.json`` and two feature stores, ``plain.zarr`` and
``warped.zarr``, of ``N * V`` items each (image i, view v -> item ``i * V + v``); see usseg_core/viewbank.py.
"""
from __future__ import annotations

import functools

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.backbone import BackboneRef, backbone_fingerprint, load_backbone
from tasks.manifest import DataRef, ensure_manifest, load_manifest
from tasks.stage import IMAGE_SHARD_UNKEYED, ManifestRef, ViewsRef, Work, declare, logger, run_stage, worker_id
from tasks.extract import feature_params, naming_images, resolve_view
from usseg_core.device import GPU_TAG, resolve_precision
from usseg_core.errors import ConfigError
from usseg_core.features import SHARD_SIZE, FeatureStore, extract_into
from usseg_core.store import ArtifactStore
from usseg_core.viewbank import (DRAWS_FILE, PLAIN, WARPED, ViewBankConfig, check_base_view, draw_views,
                                 load_draws, render_view, save_draws, summarize_draws)
from usseg_core.views import ViewSpec

VIEWS_VERSION = 3  # 2: crc32c in every chunk, every chunk written; 3: sharded (as features versions 2, 3)
STORES = ((PLAIN, False), (WARPED, True))  # (file, geometric): plain = P(base(x)), warped = G(P(base(x)))


@task(name="views-shard", cache_policy=NO_CACHE, retries=1, tags=[GPU_TAG])
def views_shard(storage: str, key: str, data: DataRef, manifest_path: str, *, view: dict,
                backbone: BackboneRef, start: int, stop: int, batch_size: int, precision: str) -> dict:
    """Embed the missing plain and warped items of one shard ``[start, stop)`` (one writer per shard)."""
    art = ArtifactStore(storage).open("views", key)
    stores = {name: FeatureStore(art.file(name), mode="r+") for name, _ in STORES}
    todo = {name: s.missing(start, stop) for name, s in stores.items()}
    worker = worker_id(backbone.device)
    if not any(todo.values()):
        return {"start": start, "written": 0, "worker": worker}
    from usseg_core.datasets.manifest import Manifest

    ids = Manifest.from_json(manifest_path).ids
    ds = data.dataset()
    vs = ViewSpec.from_params(view)
    draws = load_draws(art.file(DRAWS_FILE))
    n_views = len(draws[0])
    image = functools.lru_cache(maxsize=2)(lambda i: ds.load_image(ids[i]))  # the V items of an image
    model = load_backbone(backbone)
    written = 0
    for name, geometric in STORES:
        def load_item(k: int, geometric: bool = geometric) -> torch.Tensor:
            i, v = divmod(k, n_views)
            return render_view(image(i), vs, draws[i][v], geometric=geometric)

        with naming_images(lambda k: ds.image_path(ids[k // n_views]), f"views/{key} {name}"):
            written += extract_into(stores[name], model, load_item, todo[name], batch_size=batch_size,
                                    precision=precision)
    return {"start": start, "written": written, "worker": worker}


def _write_draws(path, draws: list) -> None:
    """draws.json at begin; a resumed run must find the draws its finished items were rendered with."""
    if path.exists():
        if [[d.to_dict() for d in v] for v in load_draws(path)] != [[d.to_dict() for d in v] for v in draws]:
            raise ConfigError(f"{path}: recorded draws differ from this run's; remove the incomplete artifact")
        return
    save_draws(path, draws)


VIEWS = declare("views", VIEWS_VERSION, "tasks.views.views_shard", unkeyed=IMAGE_SHARD_UNKEYED)


def ensure_views(storage: str, data: DataRef, backbone: BackboneRef, base_view: ViewSpec,
                 config: ViewBankConfig, *, batch_size: int = 8, precision: str = "auto",
                 shard_size: int = SHARD_SIZE, manifest: ManifestRef | None = None) -> ViewsRef:
    """The view bank of (data, backbone, base view, draws config): a cache hit costs key look-ups only.

    Runs inside a flow: shards (``shard_size`` items, rounded up to whole images) are mapped as Prefect
    tasks onto the flow's task runner, one task per stored shard of both stores (never two writers in one
    object); the draws are recorded at
    begin, so an interrupted bank resumes with the same draws.
    """
    log = logger()
    manifest = manifest or ensure_manifest(data, storage)
    view = resolve_view(base_view, data, manifest, backbone)
    check_base_view(view)
    fingerprint = backbone_fingerprint(backbone, storage)
    precision = resolve_precision(precision, backbone.device)  # once, here: the key and every shard get it
    params = feature_params(data, view, precision)
    params.update(backbone=backbone.name, views=config.params())
    ids = load_manifest(manifest).ids
    n_views, n = config.n_views, len(ids) * config.n_views
    workers: list = []
    draws: list = []

    def prepare() -> None:
        view.check_multiple(load_backbone(backbone).input_multiple)
        draws.extend(draw_views(config, id_, view.output_size()) for id_ in ids)  # cheap: in the flow process

    def body(work: Work) -> dict:
        model, art = load_backbone(backbone), work.art
        _write_draws(art.file(DRAWS_FILE), draws)
        h, w = view.output_size()
        shard = -(-shard_size // n_views) * n_views  # whole images per shard: one decode per image and store
        stores = [FeatureStore.create(art.file(name), n, model.dim, h // model.stride, w // model.stride,
                                      shard_size=shard) for name, _ in STORES]
        todo = [(a, b) for a, b in stores[0].shards() if any(s.missing(a, b) for s in stores)]
        log.info("extracting views/%s: %d images x %d views (plain + warped) in %d shards (%d items already "
                 "done)", art.key, len(ids), n_views, len(todo), 2 * n - sum(len(s.missing()) for s in stores))
        futures = [work.core(views_shard.submit, storage, art.key, data, manifest.path, view=view.params(),
                             backbone=backbone, start=a, stop=b, batch_size=batch_size, precision=precision)
                   for a, b in todo]
        results = [f.result() for f in futures]
        if not all(s.is_complete() for s in stores):
            raise RuntimeError(f"views/{art.key}: some items were not written; re-run to resume")
        workers.extend(sorted({r["worker"] for r in results if r["written"]}))
        return {"n_items": n, "shape": list(stores[0].shape), "stride": model.stride, "dim": model.dim,
                "view": view.params(), "workers": sorted({r["worker"] for r in results})}

    def ref(art, hit: bool) -> ViewsRef:
        return ViewsRef.of(art, str(art.path), hit, n_images=art.meta["n_images"], n_views=config.n_views,
                           view=view.params(), manifest=manifest, workers=list(workers))

    def info() -> dict:
        return {"dataset": data.name, "split": data.split, "backbone": backbone.name,
                "backbone_fingerprint": fingerprint,
                "weights": backbone.weights or ("random-init" if backbone.random_weights else "default"),
                "skipped": manifest.skipped, "n_images": len(ids), "n_views": n_views, "config": config.params(),
                "draws_summary": summarize_draws(draws)}

    return run_stage(storage, VIEWS, params, {"manifest": manifest.hash, "backbone": fingerprint}, body, ref,
                     record_upstream={"manifest": manifest.key, "backbone": fingerprint}, prepare=prepare,
                     info=info, hit_note=lambda art: (f"({art.meta['n_images']} images x {art.meta['n_views']} "
                                                      "views) - no backbone work"))
