"""Evaluation: flip-TTA codes, cluster / k-means / linear predictions, dense CRF, one confusion matrix
per predictor over the whole split, Hungarian matching, tables and pictures.

Image-level work (codes, CRF) is sharded and mapped over the flow's task runner; each shard returns
small confusion matrices that are summed, so memory stays bounded and no multiprocessing pool is used
(STEGO's CRF pool hangs: STEGO #16).

Memory is bounded by the model input, not the image: codes stay at feature resolution and are upsampled
to the label's size one band of rows at a time (:func:`upsampled_bands`), each band's logits and argmax
computed before the next. At full resolution only labels (int16) exist, no D-channel map; the dense CRF
runs at the label's size up to ``$USSEG_CRF_MAX_PIXELS`` (1 MP; then one predictor's K-channel float32
logits are its unary) and on a capped grid beyond it (:func:`predict_labels`). Segment retrieval (HSG's
protocol) clusters each image's codes in the same bands (``usseg_core.retrieval.segment_prototypes``).
"""
from __future__ import annotations

import functools
import time
from collections.abc import Iterator
from dataclasses import asdict

import numpy as np
import torch
import torch.nn.functional as F
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.manifest import DataRef
from tasks.stage import EvaluationRef, FeaturesRef, ManifestRef, Work, declare, run_stage, worker_id
from tasks.heads import image_codes, load_head
from tasks.retrieval import load_memory
from usseg_core.bands import BAND_BYTES, band_rows, upsampled_bands  # noqa: F401 - band_rows: re-exported
from usseg_core.crf import CRF_MAX_PIXELS, CRFParams, crf_grid, crf_image, crf_labels, crf_max_pixels, dense_crf
from usseg_core.device import GPU_TAG, resolve_device, to_device
from usseg_core.features import FeatureStore
from usseg_core.metrics import OVERCLUSTER_MODES, ConfusionMatrix, hungarian_scores, identity_scores
from usseg_core.spec import DEFAULT_OVERCLUSTER
from usseg_core.store import ArtifactStore, artifact_key  # noqa: F401 - ArtifactStore: the store run_stage opens
from usseg_core.views import ViewSpec, prepare_image_for_label, prepare_label
from usseg_core.viz import thumbnail

CPU = torch.device("cpu")
EVAL_VERSION = 3  # 2: a group's head is its key (head_key), not its folder: keys survive a moved store; 3: CRF on BGR
N_EXAMPLES = 6
# Predictor kinds whose outputs are class ids: scored as they are, no Hungarian matching.
CLASS_KINDS = frozenset({"linear", "retrieval"})
EVALUATION = declare("evaluation", EVAL_VERSION, "tasks.evaluate.evaluate_shard",
                     unkeyed={"groups": "keyed as params 'groups' without file locations (each predictor's "
                                        "artifact key is upstream)",
                              "n_classes": "the labelled dataset's classes (keyed by the features' manifest)",
                              "start": "which images a shard scores", "stop": "which images a shard scores",
                              "examples": "which images the pictures show (N_EXAMPLES spread over the split)",
                              "device": "where it runs: part of no key (docs/architecture.md, Devices)",
                              "overcluster": "keyed when not the default (earlier artifacts keep their keys)",
                              "crf_max_pixels": "keyed when not the default (earlier artifacts keep their keys)"})


@functools.lru_cache(maxsize=16)
def _centroids(path: str, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.load(path)).to(device)


@functools.lru_cache(maxsize=8)
def _linear(path: str, dim: int, n_classes: int, device: torch.device):
    from usseg_core.heads.probes import LinearProbe

    probe = LinearProbe(dim, n_classes)
    probe.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return probe.to(device).eval()


def _memory(path: str, n_classes: int):
    return load_memory(path, n_classes)  # lru-cached there: one load (and faiss index) per process


def _own_logits(p: dict, codes: torch.Tensor) -> torch.Tensor:
    return load_head(p["path"], str(codes.device)).cluster_logits(codes)  # STEGO's probe, PiCIE's centroids


def _kmeans_logits(p: dict, codes: torch.Tensor) -> torch.Tensor:
    from usseg_core.cluster import cluster_logits

    return cluster_logits(codes, _centroids(p["path"], codes.device), alpha=2.0)


def _linear_logits(p: dict, codes: torch.Tensor) -> torch.Tensor:
    return _linear(p["path"], codes.shape[1], p["n_classes"], codes.device)(codes)


def _retrieval_logits(p: dict, codes: torch.Tensor) -> torch.Tensor:  # HSG's kNN label transfer
    from usseg_core.retrieval import retrieval_logits

    # The segment memory is a faiss-cpu index: retrieval runs on the host whatever the codes' device.
    return retrieval_logits(codes.cpu(), _memory(p["path"], p["n_classes"]), tuple(p["grid"]), p["iters"],
                            p["k"], p["vote"], pool_to=tuple(p["pool_to"]))


def _retrieval_segments(p: dict, codes: torch.Tensor, size: tuple[int, int], band_bytes: int):
    from usseg_core.retrieval import retrieval_segments

    return retrieval_segments(codes.cpu(), _memory(p["path"], p["n_classes"]), tuple(p["grid"]), p["iters"],
                              p["k"], p["vote"], pool_to=tuple(p["pool_to"]), size=size, band_bytes=band_bytes)


# predictor kind -> (predictor dict, codes (1, D, H, W)) -> logits (1, K, H, W)
PREDICTOR_KINDS = {"own": _own_logits, "kmeans": _kmeans_logits, "linear": _linear_logits,
                   "retrieval": _retrieval_logits}


@torch.no_grad()
def predictor_logits(predictor: dict, codes: torch.Tensor) -> torch.Tensor:
    """(1, K, H, W) logits of one predictor on upsampled codes (1, D, H, W)."""
    kind = predictor["kind"]
    if kind not in PREDICTOR_KINDS:
        raise ValueError(f"unknown predictor kind {kind!r}")
    return PREDICTOR_KINDS[kind](predictor, codes)


def _label_dtype(n: int) -> type:
    return np.int16 if n < 2 ** 15 else np.int32


def _logit_bands(predictor: dict, codes: torch.Tensor, size: tuple[int, int], band_bytes: int
                 ) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(r0, r1, (K, r1 - r0, W)) logits of one predictor on ``codes`` upsampled to ``size``, band by band.
    Retrieval segments the whole image first (HSG's protocol, itself band by band), then reads each band's
    logits off its segments."""
    if predictor["kind"] == "retrieval":
        seg, table = _retrieval_segments(predictor, codes, size, band_bytes)  # (H, W), (S, C)
        step = band_rows(*size, table.shape[1], band_bytes)
        for r0 in range(0, size[0], step):
            yield r0, min(r0 + step, size[0]), table[seg[r0:r0 + step].long()].permute(2, 0, 1)
        return
    for r0, r1, band in upsampled_bands(codes, size, band_bytes):
        yield r0, r1, predictor_logits(predictor, band)[0]
        del band


@torch.no_grad()
def predict_labels(predictor: dict, codes: torch.Tensor, size: tuple[int, int], *, image: np.ndarray | None = None,
                   crf: CRFParams | None = None, band_bytes: int = BAND_BYTES,
                   crf_max_pixels: int = CRF_MAX_PIXELS) -> dict[str, np.ndarray]:
    """One predictor's label maps at ``size`` from feature-resolution codes (1, D, h, w).

    Returns ``{"no": (H, W) argmax of the logits}`` and, when ``crf`` is given, ``"yes"``: the argmax
    after the dense CRF on ``image`` (H, W, 3) uint8; int16 labels (int32 past 32767 outputs). The
    predictions equal ``predictor_logits`` of the codes upsampled to ``size`` in one piece (argmax ties
    aside), computed band by band (:func:`upsampled_bands`): at full size only the labels and, for the
    CRF of an image within ``crf_max_pixels``, the predictor's K-channel float32 logits. A bigger image
    is refined on the grid :func:`usseg_core.crf.crf_grid` (:func:`_grid_crf_labels`). Retrieval segments
    the whole image (HSG's protocol) band by band too: at full size it adds the (H, W) segment ids."""
    height, width = size
    full_crf = crf is not None and crf_grid(height, width, crf_max_pixels) == (height, width)
    labels = logits_full = None
    for r0, r1, logits in _logit_bands(predictor, codes, size, band_bytes):  # (K, n, W)
        if labels is None:
            labels = np.empty(size, _label_dtype(logits.shape[0]))
            if full_crf:
                logits_full = np.empty((logits.shape[0], height, width), np.float32)  # the CRF's unary source
        labels[r0:r1] = logits.argmax(0).cpu().numpy()
        if logits_full is not None:
            logits_full[:, r0:r1] = logits.cpu().numpy()
        del logits
    out = {"no": labels}
    if full_crf:
        out["yes"] = crf_labels(image, logits_full, crf)
    elif crf is not None:
        out["yes"] = _grid_crf_labels(predictor, codes, image, crf, crf_grid(height, width, crf_max_pixels),
                                      band_bytes)
    return out


def _grid_crf_labels(predictor: dict, codes: torch.Tensor, image: np.ndarray, crf: CRFParams,
                     grid: tuple[int, int], band_bytes: int) -> np.ndarray:
    """The dense CRF of a big image on ``grid`` (h, w): the predictor's logits of the codes upsampled to
    the grid (what [code:STEGO] refines at its crop size), the image shrunk to it by area averaging; the
    refined (K, h, w) marginals are upsampled bilinearly to the image's size band by band and each band's
    argmax kept. Full-size buffers: the (H, W) labels alone (a band holds K x ``band_bytes`` / D floats at
    most); interpolating marginals rather than copying grid labels puts the boundaries between grid pixels."""
    logits = None
    for r0, r1, band in _logit_bands(predictor, codes, grid, band_bytes):  # (K, n, w)
        if logits is None:
            logits = np.empty((band.shape[0], *grid), np.float32)
        logits[:, r0:r1] = band.cpu().numpy()
    marginals = torch.from_numpy(dense_crf(crf_image(image, grid), logits, crf))[None]  # (1, K, h, w)
    del logits
    labels = np.empty(image.shape[:2], _label_dtype(marginals.shape[1]))
    for r0, r1, band in upsampled_bands(marginals, image.shape[:2], band_bytes):  # (1, K, n, W)
        labels[r0:r1] = band[0].argmax(0).numpy()
    return labels


def nearest_rows(in_size: int, out_size: int) -> np.ndarray:
    """Source index of every output index of ``F.interpolate(mode="nearest")`` (read off the call)."""
    ramp = torch.arange(in_size, dtype=torch.float64)[None, None, :, None]  # float64: exact indices
    return F.interpolate(ramp, size=(out_size, 1), mode="nearest")[0, 0, :, 0].long().numpy()


@torch.no_grad()
def hierarchy_maps(head, feats: torch.Tensor, size: tuple[int, int]) -> list[np.ndarray]:
    """A hierarchical head's levels of features (1, C, h, w): fine to coarse, (H, W) int16 at ``size``
    (nearest neighbour; int32 past 32767 segments), gathered by index: no float map at full size."""
    levels = head.levels(head.codes(feats))  # (1, h, w) each, at feature resolution
    out = []
    for lv in levels:
        small = lv[0].cpu().numpy()
        rows, cols = nearest_rows(small.shape[0], size[0]), nearest_rows(small.shape[1], size[1])
        out.append(small.astype(_label_dtype(int(small.max(initial=0)) + 1))[rows[:, None], cols[None, :]])
    return out


def image_hierarchy(head_path: str, feats: FeatureStore, i: int, size: tuple[int, int],
                    device: torch.device = CPU) -> list[np.ndarray] | None:
    """:func:`hierarchy_maps` of item i when the head has a hierarchy (HSG), else None."""
    from usseg_core.heads import get_head

    head = load_head(head_path, str(device))
    if not get_head(head.method).hierarchy:  # declared by the head's registration
        return None
    return hierarchy_maps(head, to_device(feats[i].astype(np.float32)[None], device), size)


@task(name="evaluate-shard", cache_policy=NO_CACHE, tags=[GPU_TAG])
def evaluate_shard(data: DataRef, manifest_path: str, feats_path: str, flips_path: str | None, *, view: dict,
                   groups: list[dict], n_classes: int, start: int, stop: int, run_crf: bool,
                   crf: dict, examples: list[int], device: str = "auto",
                   crf_max_pixels: int = CRF_MAX_PIXELS) -> dict:
    """Confusion matrices of every predictor (with and without CRF) on items [start, stop).

    Codes and logits run on ``device`` (resolved here, on the worker); each predictor's logits of an
    image come to the host once, for the argmax, the CRF (pydensecrf is CPU code) and the counts."""
    from usseg_core.datasets.manifest import Manifest

    ids = Manifest.from_json(manifest_path).ids
    ds = data.dataset()
    vs = ViewSpec.from_params(view)
    feats, flips = FeatureStore(feats_path), FeatureStore(flips_path) if flips_path else None
    params, dev = CRFParams(**crf), resolve_device(device)
    cms: dict[str, np.ndarray] = {}
    kept: dict[int, dict] = {}
    size = tuple(int(x) for x in feats.dense.shape[-2:])  # the feature grid: codes stay at it
    for i in range(start, stop):
        image = ds.load_image(ids[i])
        label = prepare_label(ds.load_label(ids[i]), vs).astype(np.int16)  # class ids < 2**15; -1 = ignore
        rgb = prepare_image_for_label(image, vs)
        if i in examples:  # pictures only: kept at display size
            kept[i] = {"image": thumbnail(rgb), "label": thumbnail(label), "pred": {}}
        for group in groups:
            codes = image_codes(group["head"], feats, flips, i, size, dev)  # (1, D, h, w): in == out, a copy
            if i in kept and group["head"] is not None:
                levels = image_hierarchy(group["head"], feats, i, label.shape, dev)
                if levels is not None:
                    kept[i]["levels"] = [thumbnail(lv) for lv in levels]
            for pred in group["predictors"]:
                outs = predict_labels(pred, codes, label.shape, image=rgb, crf=params if run_crf else None,
                                      crf_max_pixels=crf_max_pixels)
                for crf_flag, p in outs.items():
                    name = f"{pred['name']}|{crf_flag}"
                    cms[name] = cms.get(name, 0) + confusion(p, label, pred["n_pred"], n_classes)
                    if i in kept:
                        kept[i]["pred"][name] = thumbnail(p.astype(np.int16))
    return {"cms": cms, "examples": kept, "worker": worker_id(str(dev))}


def confusion(pred: np.ndarray, label: np.ndarray, n_pred: int, n_classes: int,
              pixels: int = 1 << 20) -> np.ndarray:
    """(n_pred, n_classes) counts of one image's (H, W) prediction against its label, counted in bands
    of about ``pixels`` pixels so that the counting's int64 temporaries stay small."""
    cm = ConfusionMatrix(n_pred, n_classes)
    step = max(1, pixels // max(1, pred.shape[1]))
    for r0 in range(0, pred.shape[0], step):
        cm.update(pred[r0:r0 + step], label[r0:r0 + step])
    return cm.matrix


def eval_key(params: dict, upstream: dict) -> str:
    return artifact_key("evaluation", EVAL_VERSION, params, upstream)


def run_evaluation(storage: str, data: DataRef, manifest: ManifestRef, view: ViewSpec, feats: FeaturesRef,
                   flips: FeaturesRef | None, groups: list[dict], class_names: list[str], *,
                   run_crf: bool = True, crf: CRFParams = CRFParams(), shard_size: int = 16,
                   title: str = "", device: str = "auto", overcluster: str = DEFAULT_OVERCLUSTER) -> EvaluationRef:
    """The evaluation artifact: results table (parquet, CSV, markdown), confusion PNG, overlays PNG.

    ``overcluster`` is the Hungarian protocol for clusters beyond the class count
    (:data:`usseg_core.metrics.OVERCLUSTER_MODES`); every row's ``overcluster`` column names it. It enters
    the key only when it is not the default, so artifacts written before the option keep their keys.

    ``device`` is where each shard computes codes and logits (resolved on its worker; not in the key).
    The dense CRF of a label bigger than ``$USSEG_CRF_MAX_PIXELS`` (default
    :data:`usseg_core.crf.CRF_MAX_PIXELS`) runs on a capped grid (:func:`predict_labels`); the budget enters
    the key only when it is not the default."""
    if overcluster not in OVERCLUSTER_MODES:
        raise ValueError(f"overcluster must be one of {OVERCLUSTER_MODES}, got {overcluster!r}")
    params = {"run_crf": run_crf, "crf": asdict(crf), "view": view.params(),
              "groups": [{k: v for k, v in g.items() if k not in ("predictors", "head")} | {
                  "predictors": [p.params() for p in g["predictors"]]} for g in groups]}
    if overcluster != DEFAULT_OVERCLUSTER:
        params["overcluster"] = overcluster
    max_pixels = crf_max_pixels()  # $USSEG_CRF_MAX_PIXELS: read once, here
    if run_crf and max_pixels != CRF_MAX_PIXELS:
        params["crf_max_pixels"] = max_pixels
    upstream = {"features": feats["key"], "flips": flips["key"] if flips else "none",
                **{f"{g['method']}.{p['name']}": p.get("key", "") for g in groups for p in g["predictors"]}}
    rows: list = []

    def body(work: Work) -> dict:
        n = manifest["n"]
        n_classes = len(class_names)
        examples = list(np.linspace(0, n - 1, min(N_EXAMPLES, n)).astype(int))
        started = time.perf_counter()
        futures = [work.core(evaluate_shard.submit, data, manifest["path"], feats["path"],
                             flips["path"] if flips else None, view=view.params(), groups=groups,
                             n_classes=n_classes, start=a, stop=min(a + shard_size, n), run_crf=run_crf,
                             crf=asdict(crf), examples=examples, device=device, crf_max_pixels=max_pixels)
                   for a in range(0, n, shard_size)]
        cms: dict[str, np.ndarray] = {}
        kept: dict[int, dict] = {}
        workers: set[str] = set()
        for f in futures:
            res = f.result()
            workers.add(res["worker"])
            for name, m in res["cms"].items():
                cms[name] = cms.get(name, 0) + m
            kept.update(res["examples"])
        rows.extend(work.core(_score_rows, cms, groups, class_names, overcluster=overcluster))
        _write_outputs(work.art, rows, cms, groups, class_names, kept, title or f"{data.name}/{data.split}",
                       overcluster)
        seconds = time.perf_counter() - started
        return {"rows": rows, "columns": list(rows[0]) if rows else [], "n_images": n,
                "seconds": round(seconds, 3), "images_per_s": round(n / seconds, 3), "workers": sorted(workers)}

    def ref(art, hit: bool) -> EvaluationRef:
        return EvaluationRef.of(art, str(art.path), hit, rows=evaluation_rows(art) if hit else rows)

    return run_stage(storage, EVALUATION, params, upstream, body, ref, key=eval_key(params, upstream),
                     inputs=[feats], info=lambda: {"dataset": data.name, "split": data.split})


def evaluation_rows(art) -> list[dict]:
    """The results rows of an evaluation artifact, in the results table's column order.

    Read from its meta (which also records the column order) without importing pandas, so that a cache
    hit stays cheap; an artifact written before the order was recorded is read from results.parquet.
    """
    if "columns" in art.meta:
        rows = [{c: r[c] for c in art.meta["columns"]} for r in art.meta["rows"]]
    else:
        import pandas as pd

        rows = pd.read_parquet(art.file("results.parquet")).to_dict("records")
    # artifacts written before the option used the default protocol
    mode = art.meta.get("params", {}).get("overcluster", DEFAULT_OVERCLUSTER)
    return [_with_overcluster(r, mode) if "overcluster" not in r else r for r in rows]


def _with_overcluster(row: dict, mode: str) -> dict:
    """``row`` with an ``overcluster`` column right after ``crf`` (class outputs: "identity")."""
    clusterer = str(row.get("clusterer", ""))
    if clusterer == "linear" or clusterer.startswith("retrieval"):
        mode = "identity"
    out = {}
    for k, v in row.items():
        out[k] = v
        if k == "crf":
            out["overcluster"] = mode
    out.setdefault("overcluster", mode)
    return out


def predictor_scores(predictor: dict, cm: np.ndarray, overcluster: str = DEFAULT_OVERCLUSTER):
    """Scores of one predictor's confusion matrix: identity for class outputs, Hungarian otherwise."""
    if predictor["kind"] in CLASS_KINDS:
        return identity_scores(cm)
    return hungarian_scores(cm, overcluster=overcluster)


def _score_rows(cms: dict, groups: list[dict], class_names: list[str],
                overcluster: str = DEFAULT_OVERCLUSTER) -> list[dict]:
    rows = []
    for g in groups:
        for p in g["predictors"]:
            for crf_flag in ("no", "yes"):
                name = f"{p['name']}|{crf_flag}"
                if name not in cms:
                    continue
                sc = predictor_scores(p, cms[name], overcluster)
                row = {"method": g["method"], "clusterer": p.get("label") or p["kind"], "crf": crf_flag == "yes",
                       "overcluster": "identity" if p["kind"] in CLASS_KINDS else overcluster,  # class outputs: no matching
                       "accuracy": round(100 * sc.accuracy, 2), "miou": round(100 * sc.miou, 2),
                       # twke18/HSG's benchmark mIoU: Σ IoU / n_classes (an absent class counts 0; metrics.py)
                       "miou_classes": round(100 * sc.miou_over_classes, 2)}
                row.update({f"iou_{c}": round(100 * float(v), 2) if np.isfinite(v) else None
                            for c, v in zip(class_names, sc.iou)})
                rows.append(row)
    return rows


def _write_outputs(art, rows, cms, groups, class_names, kept, title, overcluster=DEFAULT_OVERCLUSTER) -> None:
    import pandas as pd

    from usseg_core.viz import confusion_plot, hierarchy_grid, overlay_grid

    df = pd.DataFrame(rows)
    df.to_parquet(art.file("results.parquet"))
    df.to_csv(art.file("results.csv"), index=False)
    art.file("results.md").write_text(results_markdown(rows))
    main = groups[-1]["predictors"][0]
    crf_flag = "yes" if f"{main['name']}|yes" in cms else "no"
    sc = predictor_scores(main, cms[f"{main['name']}|{crf_flag}"], overcluster)
    confusion_plot(art.file("confusion.png"), sc.matrix, class_names,
                   f"{title}: {groups[-1]['method']} {main['kind']} (CRF {crf_flag})")
    grid = []
    for i in sorted(kept):
        ex = kept[i]
        pred = ex["pred"][f"{main['name']}|{crf_flag}"]
        mapped = np.where(pred >= 0, sc.assignment[np.clip(pred, 0, None)], -1)
        grid.append({"image": ex["image"], "label": ex["label"], "prediction": mapped})
    if grid:
        overlay_grid(art.file("overlays.png"), grid, len(class_names))
    hier = [{"image": kept[i]["image"], "levels": kept[i]["levels"]} for i in sorted(kept) if "levels" in kept[i]]
    if hier:  # a hierarchical head (HSG): every example's levels, coarse to fine
        hierarchy_grid(art.file("hierarchy.png"), hier, f"{title}: {groups[-1]['method']} hierarchy")
    np.savez_compressed(art.file("confusion.npz"), **{k.replace("|", "__crf_"): v for k, v in cms.items()})


def results_markdown(rows: list[dict]) -> str:
    head = "| method | clusterer | CRF | accuracy | mIoU |\n|---|---|---|---|---|\n"
    return head + "".join(f"| {r['method']} | {r['clusterer']} | {'yes' if r['crf'] else 'no'} | "
                          f"{r['accuracy']:.2f} | {r['miou']:.2f} |\n" for r in rows)
