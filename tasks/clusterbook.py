"""The ``clusterbook`` stage: CAUSE's concept clusterbook (its mediator), fitted on the five-crop training
features by modularity maximisation (``usseg_core.heads.cause_train.fit_clusterbook``).

Keyed by the feature artifacts (hence backbone, resolution, crop set and images) and the book's own
fitting parameters, its seed (``clusterbook.codebook_seed``) included; not by the run seed nor the CAUSE
variant: one book serves CAUSE-MLP and CAUSE-TR and every seed of a comparison. The fit checkpoints into
the artifact folder, so a killed fit resumes. ``usseg storage show <key>`` prints its size (``concepts``,
``dim``), the modularity reached and the files, among them ``concepts.png``: the most used concepts, one
row each, with the training patches nearest them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tasks.heads import head_inputs_upstream, open_features, training_slot
from tasks.manifest import DataRef, load_manifest
from tasks.stage import ArtifactRef, FeaturesRef, Work, declare, logger, run_stage, stage_task, worker_id
from usseg_core.heads.cause import ClusterbookConfig, concept_cells, feature_cell_box

CLUSTERBOOK_VERSION = 1
CLUSTERBOOK = declare("clusterbook", CLUSTERBOOK_VERSION, "usseg_core.heads.cause_train.fit_clusterbook",
                      keyed_as={"settings": "*"},
                      unkeyed={"checkpoint_path": "where the fit resumes from (the artifact's own checkpoint)",
                               "device": "where it runs: part of no key (docs/architecture.md, Devices)",
                               "progress": "a progress bar"})
PICTURE = "concepts.png"
PER_CONCEPT = 8  # patches per concept in the picture
PICTURE_CONCEPTS = 8  # concepts in the picture (the most used ones)


@dataclass(frozen=True, kw_only=True)
class ClusterbookRef(ArtifactRef):
    """A clusterbook: ``path`` is clusterbook.npy ((K, C) float32); ``modularity`` reached."""

    concepts: int
    modularity: float


def _picture(folder, book: np.ndarray, features, feature_infos: list[FeaturesRef], datas: list[DataRef],
             n_concepts: int) -> list[int]:
    """concepts.png: the ``n_concepts`` most used concepts (on 200 items spread over the features), a row
    each of their nearest training patches, labelled ``concept (tokens nearest it in the sample)``."""
    from usseg_core.gallery import gallery_grid, patch
    from usseg_core.viz import palette, save_png

    usage, cells = concept_cells(book, features, n_concepts, PER_CONCEPT)
    shown = list(cells)
    starts = np.cumsum([0] + [int(r["n"]) for r in feature_infos])
    colours = palette(max(len(shown), 1))
    grid_hw = tuple(np.asarray(features[0]).shape[-2:])
    images: dict[tuple[int, str], np.ndarray] = {}
    rows = []
    for r, c in enumerate(shown):
        pics = []
        for _, item, y, x in cells[c]:
            split = int(np.searchsorted(starts, item, side="right") - 1)
            ref, local = feature_infos[split], item - int(starts[split])
            view = dict(ref["view"])
            per_image = 5 if view["policy"] == "five_crop" else 1
            image_id = load_manifest(ref["manifest"]).ids[local // per_image]
            if (split, image_id) not in images:
                images[(split, image_id)] = datas[split].dataset().load_image(image_id)
            image = images[(split, image_id)]
            box = feature_cell_box(view, image.shape[:2], grid_hw, local % per_image, y, x)
            pics.append(patch(image, box, colours[r]))
        rows.append(pics)
    save_png(folder / PICTURE, gallery_grid(rows, colours, [f"{c} ({usage[c]})" for c in shown]))
    return shown


@stage_task("clusterbook")
def ensure_clusterbook(storage: str, feature_infos: list[FeaturesRef], datas: list[DataRef],
                       settings: ClusterbookConfig, device: str = "auto") -> ClusterbookRef:
    """The concept clusterbook of these training features (fitted, or found by key)."""
    from usseg_core.heads.cause_train import fit_clusterbook

    params = settings.fit_params()

    def body(work: Work) -> dict:
        features = open_features(feature_infos)
        with training_slot():  # the fit draws from torch's global RNG like a head's training
            result = work.core(fit_clusterbook, features, settings=settings,
                               checkpoint_path=work.art.file("checkpoint.pt"), device=device, progress=True)
        np.save(work.art.file("clusterbook.npy"), result.book)
        shown = _picture(work.art.path, result.book, features, feature_infos, datas, PICTURE_CONCEPTS)
        work.art.file("checkpoint.pt").unlink(missing_ok=True)  # the book is the result; the fit is done
        logger().info("clusterbook/%s: %d concepts x %d, modularity %.4f after %d steps", work.art.key,
                      result.book.shape[0], result.book.shape[1], result.modularity, result.steps_done)
        return {"concepts": int(result.book.shape[0]), "dim": int(result.book.shape[1]),
                "modularity": result.modularity, "steps": result.steps_done,
                "seconds_per_step": result.seconds_per_step, "history": result.history[-10:],
                "picture": PICTURE, "pictured_concepts": shown, "worker": worker_id()}

    def ref(art, hit: bool) -> ClusterbookRef:
        return ClusterbookRef.of(art, str(art.file("clusterbook.npy")), hit, concepts=int(art.meta["concepts"]),
                                 modularity=float(art.meta["modularity"]))

    return run_stage(storage, CLUSTERBOOK, params, head_inputs_upstream({"features": feature_infos}), body, ref,
                     inputs=feature_infos)
