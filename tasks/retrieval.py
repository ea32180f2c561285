"""Segment-retrieval evaluation (HSG's protocol, docs/methods/hsg.md §1.3): the labelled segment memory of a
split, the predictor that labels test segments from it, and the one call the evaluation flow makes.

The memory is an artifact ("segment-memory") keyed by the head (or "raw"), the labelled features, the
view (it decides how labels are prepared), the k-means grid and iterations and the number of classes.
Codes are computed per image exactly as the evaluation computes them (``tasks.heads.image_codes``)
except for flip-TTA, which HSG's ``prototype.py`` does not use for the memory.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from tasks.manifest import DataRef, load_manifest
from tasks.stage import FeaturesRef, HeadRef, MemoryRef, Work, declare, logger, run_stage, stage_task
from tasks.heads import image_codes
from tasks.predictors import retrieval_predictor
from usseg_core.features import FeatureStore
from usseg_core.retrieval import (K_DEFAULT, KMEANS_ITERS, MEMORY_LABELS, VOTE_DEFAULT, SegmentMemory, build_memory,
                                  dataset_grid)
from usseg_core.store import artifact_key
from usseg_core.views import ViewSpec, prepare_label

MEMORY_VERSION = 1
MEMORY = declare("segment-memory", MEMORY_VERSION, "usseg_core.retrieval.build_memory",
                 unkeyed={"pool_to": "the feature grid of the upstream features (keyed by their key)"})
PROTOTYPES, LABELS, IMAGE_INDEX = "prototypes.npy", "labels.npy", "image_index.npy"


def memory_key(head: HeadRef | None, feats: FeaturesRef, view_params: dict, n_classes: int, grid, iters: int,
               labels: str = MEMORY_LABELS[0]) -> tuple[str, dict, dict]:
    params = {"grid": [int(g) for g in grid], "iters": int(iters), "n_classes": int(n_classes),
              "view": view_params}
    if labels != MEMORY_LABELS[0]:  # keyed only when set: the memories built before the option keep their keys
        params["labels"] = labels
    upstream = {"features": feats["key"], "head": head["key"] if head else "raw"}
    return artifact_key("segment-memory", MEMORY_VERSION, params, upstream), params, upstream


@stage_task("segment-memory")
def ensure_segment_memory(storage: str, head: HeadRef | None, feats: FeaturesRef, data: DataRef, view_params: dict,
                          n_classes: int, grid: tuple[int, int], iters: int = KMEANS_ITERS,
                          labels: str = MEMORY_LABELS[0]) -> MemoryRef:
    """Segment prototypes of a labelled split with their majority ground-truth labels.

    ``head`` None uses the raw backbone features (the baseline). ``labels`` is the labelling rule
    (``usseg_core.retrieval.MEMORY_LABELS``: "valid-majority", ours, or "reference", twke18/HSG's).
    Files: prototypes.npy (S, D) float32 unit, labels.npy (S,) int64, image_index.npy (S,) int64 (item of
    the split each segment comes from); the metadata counts the segments per class. The reference's ``pool_to`` is the feature grid
    (h, w) the k-means ran at.
    """
    if labels not in MEMORY_LABELS:
        raise ValueError(f"memory labels must be one of {MEMORY_LABELS}, got {labels!r}")
    _, params, upstream = memory_key(head, feats, view_params, n_classes, grid, iters, labels)
    fstore = FeatureStore(feats["path"])
    pool_to: list = []

    def prepare() -> None:
        ids = load_manifest(feats["manifest"]).ids
        if len(fstore) != len(ids):
            raise ValueError(f"{feats['path']}: {len(fstore)} feature items for {len(ids)} images; the memory "
                             "needs one view per image (not five-crop features)")
        pool_to.extend(int(s) for s in fstore.dense.shape[-2:])

    def body(work: Work) -> dict:
        ids = load_manifest(feats["manifest"]).ids
        ds, vs = data.dataset(), ViewSpec.from_params(view_params)
        head_path = head["path"] if head else None

        def items():
            for i, id_ in enumerate(ids):
                label = prepare_label(ds.load_label(id_), vs).astype(np.int16)  # class ids < 2**15; -1 = ignore
                # feature-resolution codes: build_memory upsamples them to the label band by band
                yield image_codes(head_path, fstore, None, i, tuple(pool_to)), torch.from_numpy(label)

        rule = {} if labels == MEMORY_LABELS[0] else {"labels": labels}  # keyed only when set (memory_key)
        protos, seg_labels, image = work.core(build_memory, items(), n_classes=n_classes, grid=tuple(grid),
                                              iters=iters, pool_to=tuple(pool_to), **rule)
        if len(seg_labels) == 0:
            raise ValueError(f"{data.name}/{data.split}: no segment of the labelled split has a valid label")
        np.save(work.art.file(PROTOTYPES), protos)
        np.save(work.art.file(LABELS), seg_labels)
        np.save(work.art.file(IMAGE_INDEX), image)
        counts = np.bincount(seg_labels, minlength=n_classes).tolist()
        logger().info("segment-memory/%s: %d segments from %d images", work.art.key, len(seg_labels), len(ids))
        return {"n_segments": int(len(seg_labels)), "n_images": len(ids), "pool_to": pool_to, "class_counts": counts}

    def ref(art, hit: bool) -> MemoryRef:
        return MemoryRef.of(art, str(art.path), hit, pool_to=art.meta["pool_to"])

    return run_stage(storage, MEMORY, params, upstream, body, ref, prepare=prepare, inputs=[feats],
                     info={"dataset": data.name, "split": data.split})


@functools.lru_cache(maxsize=4)
def load_memory(path: str, n_classes: int) -> SegmentMemory:
    """The memory of a segment-memory artifact folder (cached per process, faiss index included)."""
    return SegmentMemory(torch.from_numpy(np.load(f"{path}/{PROTOTYPES}")),
                         torch.from_numpy(np.load(f"{path}/{LABELS}")), n_classes)


def add_retrieval(groups: list[dict], storage: str, pdata: DataRef, pfeats: dict, view_params: dict,
                  n_classes: int, dataset_name: str, k: int = K_DEFAULT, vote: str = VOTE_DEFAULT,
                  iters: int = KMEANS_ITERS, memory_labels: str = MEMORY_LABELS[0]) -> list[dict]:
    """Append a retrieval predictor to every evaluation group (in place; also returned).

    Each group's memory is built from the labelled split ``pdata`` / ``pfeats`` with that group's codes
    (``head`` None = raw features), at the dataset's test-time n0 grid (``dataset_grid``), its segments
    labelled by the rule ``memory_labels`` (:func:`ensure_segment_memory`). The raw group gets the
    predictor name "raw-retrieval", the others "retrieval" (plus the method when several).
    """
    grid = dataset_grid(dataset_name)
    heads = [g for g in groups if g.get("head") is not None]
    for g in groups:
        head = {"key": g["head_key"], "path": g["head"]} if g.get("head") is not None else None
        memory = ensure_segment_memory(storage, head, pfeats, pdata, view_params, n_classes, grid, iters,
                                       memory_labels)
        name = ("raw-retrieval" if head is None else
                "retrieval" if len(heads) == 1 else f"{g['method']}-retrieval")
        g["predictors"].append(retrieval_predictor(memory, n_classes, grid, iters, k, vote, name=name))
    return groups
