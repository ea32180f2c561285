"""The ``gallery`` stage: per cluster of a run's main clusterer, the image patches closest to it
(``gallery.html``, ``gallery.png``, ``names.yaml`` to fill in; usseg_core/gallery.py does the work).

The clusterer is the one ``usseg segment`` labels pixels with by default (the head's own: STEGO's cluster
probe, PiCIE's centroids; k-means on the head's codes for a head without one, HSG), so the cluster ids a
person names from the gallery are the ids of the segment outputs. The cells are those of a feature
artifact of the images (one item per image: a full-frame or centre-crop view).
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from tasks.manifest import DataRef, load_manifest
from tasks.predictors import Predictor, predictors_for
from tasks.stage import ArtifactRef, FeaturesRef, Work, declare, logger, run_stage, stage_task, worker_id
from usseg_core.device import GPU_TAG
from usseg_core.gallery import (CONTEXT, PATCH_SIDE, PER_CLUSTER, cell_box, gallery_grid, gallery_html,
                                names_template, nearest_cells, patch)
from usseg_core.viz import palette, save_png

GALLERY_VERSION = 1
GALLERY = declare("gallery", GALLERY_VERSION, "usseg_core.gallery.nearest_cells")
PATCHES = "patches"


@dataclass(frozen=True, kw_only=True)
class GalleryRef(ArtifactRef):
    """A cluster gallery: ``path`` is gallery.html; ``picture`` the grid PNG, ``n_clusters`` its rows."""

    picture: str
    n_clusters: int


def main_predictor(head, *, n_classes: int, head_ref: Mapping, kmeans: Mapping | None, k: int) -> Predictor:
    """The clusterer that labels a head's pixels by default (``usseg segment --clusterer own``): its own,
    else k-means on its codes."""
    by_kind = {p.kind: p for p in predictors_for(head, n_classes=n_classes, head_ref=head_ref, kmeans=kmeans, k=k)}
    return by_kind.get("own") or by_kind["kmeans"]


def _score_maps(predictor: Predictor, head_path: str, feats_path: str, device: str):
    """``(first item, (B, K, h, w) logits)`` of every item of the feature artifact, batch by batch."""
    from tasks.cluster import code_batches
    from tasks.evaluate import predictor_logits
    from usseg_core.device import resolve_device
    from usseg_core.features import FeatureStore

    first = 0
    for codes in code_batches(head_path, FeatureStore(feats_path), device=resolve_device(device)):
        yield first, predictor_logits(predictor, codes).cpu().numpy()
        first += codes.shape[0]


def _write(folder, rows: list, ids: list[str], data: DataRef, view: dict, grid_hw: tuple[int, int],
           title: str) -> dict:
    """Patches, grid PNG, page, names template and the cells' table into ``folder``."""
    ds = data.dataset()
    n = len(rows)
    colours = palette(max(n, 1))
    wanted: dict[int, list] = {}
    for row in rows:
        for cell in row:
            wanted.setdefault(cell.item, []).append(cell)
    pictures, table = {}, []
    (folder / PATCHES).mkdir(exist_ok=True)
    for item in sorted(wanted):  # each image read once
        image = ds.load_image(ids[item])
        for cell in wanted[item]:
            box = cell_box(view, image.shape[:2], grid_hw, cell.y, cell.x)
            pictures[cell] = patch(image, box, colours[cell.cluster])
            table.append({"cluster": cell.cluster, "id": ids[item], "cell": [cell.y, cell.x],
                          "box": [round(v, 1) for v in box], "score": round(cell.score, 4)})
    clusters, grid_rows = [], []
    for c, row in enumerate(rows):
        pics = []
        for rank, cell in enumerate(row):
            name = f"{PATCHES}/c{c:03d}_{rank}.png"
            save_png(folder / name, pictures[cell])
            pics.append({"src": name, "caption": f"{ids[cell.item]} ({cell.y},{cell.x})"})
        clusters.append({"id": c, "name": f"cluster_{c}", "colour": colours[c], "patches": pics})
        grid_rows.append([pictures[cell] for cell in row])
    save_png(folder / "gallery.png", gallery_grid(grid_rows, colours, [str(c) for c in range(n)]))
    note = ("Each row is one cluster; its patches are the image cells (outlined) whose codes lie closest to "
            "the cluster, one per image first, labelled with the image id and the cell (row, column). Name "
            "the clusters in a copy of names.yaml (beside this page) and pass it to usseg segment --names.")
    (folder / "gallery.html").write_text(gallery_html(title, note, clusters, "gallery.png"), encoding="utf-8")
    (folder / "names.yaml").write_text(names_template(n), encoding="utf-8")
    (folder / "cells.json").write_text(json.dumps(table, indent=1), encoding="utf-8")
    return {"n_patches": len(table)}


@stage_task("gallery", tags=[GPU_TAG])
def ensure_gallery(storage: str, predictor: Predictor, head: ArtifactRef, feats: FeaturesRef, data: DataRef, *,
                   per_cluster: int = PER_CLUSTER, device: str = "auto") -> GalleryRef:
    """The gallery of ``predictor`` (over ``head``'s codes) on the images of ``feats`` (read from ``data``)."""
    params = {"predictor": predictor.params(), "n_clusters": predictor.n_pred, "per_cluster": per_cluster,
              "patch": PATCH_SIDE, "context": CONTEXT}
    upstream = {"head": head["key"], "predictor": predictor.key, "features": feats["key"]}

    def body(work: Work) -> dict:
        from usseg_core.features import FeatureStore

        grid_hw = tuple(FeatureStore(feats["path"]).shape[2:])
        scores = _score_maps(predictor, head["path"], feats["path"], device)
        rows = work.core(nearest_cells, scores, n_clusters=predictor.n_pred, per_cluster=per_cluster)
        ids = load_manifest(feats["manifest"]).ids
        title = (f"clusters of {head.get('method') or 'the head'} {head['key']} ({predictor.row_label}) on "
                 f"{data.name}/{data.split}")
        done = _write(work.art.path, rows, ids, data, feats["view"], grid_hw, title)
        logger().info("gallery/%s: %d clusters, %d patches", work.art.key, len(rows), done["n_patches"])
        return {"n_clusters": len(rows), **done, "worker": worker_id(device)}

    def ref(art, hit: bool) -> GalleryRef:
        return GalleryRef.of(art, str(art.file("gallery.html")), hit, picture=str(art.file("gallery.png")),
                             n_clusters=int(art.meta["n_clusters"]))

    return run_stage(storage, GALLERY, params, upstream, body, ref, inputs=[feats, head],
                     info={"dataset": data.name, "split": data.split})
