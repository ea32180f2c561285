"""Flows ``train-stego``, ``train-omh``, ``evaluate`` and ``pipeline``.

train:    manifest -> five-crop features -> KNN -> head -> k-means (codes) [+ raw-feature k-means]
evaluate: eval features (+ flipped) -> codes -> cluster probe / k-means / linear probe -> CRF -> metrics
Every stage is an artifact looked up by key first, so a re-run with the same inputs costs key look-ups.
"""
from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.publish import publish_run
from flows.runner import SettingTaskRunner
from flows.settings import data_root as resolve_data_root
from flows.settings import storage_root
from tasks.cluster import ensure_kmeans, ensure_linear_probe
from tasks.common import BackboneRef, DataRef, ensure_manifest
from tasks.evaluate import results_markdown, run_evaluation
from tasks.extract import ensure_features
from tasks.heads import ensure_head, ensure_knn
from usseg_core.crf import CRFParams
from usseg_core.views import ViewSpec

DEFAULT_BACKBONE = "tf_efficientnet_lite0"


def _splits(splits: str | list[str]) -> list[str]:
    return [s.strip() for s in splits.split(",")] if isinstance(splits, str) else list(splits)


def train_stages(method: str, dataset: str, data_root: str, train_splits: list[str], ref: BackboneRef,
                 storage: str, *, resolution: int = 224, overrides: dict | None = None,
                 dataset_options: dict | None = None, n_clusters: int | None = None,
                 batch_size: int = 8, device: str = "auto") -> dict:
    """Features of the five-crop set, KNN, head, and k-means over codes and over raw features."""
    crops = ViewSpec("five_crop", resolution)
    datas = [DataRef(dataset, data_root, s, dataset_options or {}) for s in train_splits]
    infos = [ensure_features(storage, d, ref, crops, batch_size=batch_size) for d in datas]
    n_classes = datas[0].dataset().n_classes
    k = n_clusters or n_classes
    knn = ensure_knn(storage, infos, k=30)
    head = ensure_head(storage, method, dataset, n_classes, infos, knn, overrides, device)
    kmeans = ensure_kmeans(storage, head, infos, k)
    raw_kmeans = ensure_kmeans(storage, None, infos, k)
    return {"features": infos, "knn": knn, "head": head, "kmeans": kmeans, "raw_kmeans": raw_kmeans,
            "n_classes": n_classes, "k": k}


def eval_view(dataset_obj, resolution: int | None) -> ViewSpec:
    """The evaluation protocol of the dataset (METHODS.md §5 S8), optionally at another resolution."""
    if dataset_obj.eval_policy == "full":
        return ViewSpec("full", resolution)
    return ViewSpec("center_crop", resolution or 320)


def evaluate_stages(trained: dict, dataset: str, data_root: str, eval_split: str, probe_split: str | None,
                    ref: BackboneRef, storage: str, *, eval_resolution: int | None = None,
                    run_crf: bool = True, dataset_options: dict | None = None, batch_size: int = 8) -> dict:
    data = DataRef(dataset, data_root, eval_split, dataset_options or {})
    ds = data.dataset()
    view = eval_view(ds, eval_resolution)
    manifest = ensure_manifest(data, storage)
    feats = ensure_features(storage, data, ref, view, batch_size=batch_size, manifest=manifest)
    view = ViewSpec.from_params(feats["view"])
    flips = ensure_features(storage, data, ref, view.flipped(), batch_size=batch_size, manifest=manifest)
    n_classes, k, head = trained["n_classes"], trained["k"], trained["head"]
    method_preds = [
        {"name": "cluster-probe", "kind": "cluster-probe", "n_pred": n_classes, "key": head["key"],
         "head": head["path"]},
        {"name": "kmeans", "kind": "kmeans", "n_pred": k, "key": trained["kmeans"]["key"],
         "centroids": trained["kmeans"]["path"]},
    ]
    if probe_split:
        pdata = DataRef(dataset, data_root, probe_split, dataset_options or {})
        pfeats = ensure_features(storage, pdata, ref, view, batch_size=batch_size)
        probe = ensure_linear_probe(storage, head, pfeats, pdata, view.params(), n_classes)
        method_preds.append({"name": "linear", "kind": "linear", "n_pred": n_classes, "key": probe["key"],
                             "probe": probe["path"], "n_classes": n_classes})
    groups = [
        {"method": "raw-features", "head": None, "predictors": [
            {"name": "raw-kmeans", "kind": "kmeans", "n_pred": k, "key": trained["raw_kmeans"]["key"],
             "centroids": trained["raw_kmeans"]["path"]}]},
        {"method": head["method"], "head": head["path"], "head_key": head["key"], "predictors": method_preds},
    ]
    return run_evaluation(storage, data, manifest, view, feats, flips, groups, list(ds.class_names),
                          run_crf=run_crf, crf=CRFParams())


def _publish(result: dict, title: str) -> None:
    rows = [{k: v for k, v in r.items() if not k.startswith("iou_")} for r in result["rows"]]
    create_table_artifact(key="results", table=rows, description=title)
    create_markdown_artifact(key="results-summary", markdown=(
        f"# {title}\n\n{results_markdown(result['rows'])}\n\nEvaluation artifact: `{result['key']}` "
        f"at `{result['path']}` (results.csv, results.parquet, confusion.png, overlays.png)"))


def _pipeline(method: str, dataset: str, data_root: str | None, train_split: str | list[str],
              eval_split: str | None, backbone: str, weights: str | None, random_weights: bool,
              storage: str | None, overrides: dict | None, resolution: int, eval_resolution: int | None,
              run_crf: bool, dataset_options: dict | None, n_clusters: int | None, device: str, evaluate: bool) -> dict:
    storage = str(storage_root(storage))
    data_root = resolve_data_root(dataset, data_root, storage)
    ref = BackboneRef(backbone, weights, random_weights, device=device)
    splits = _splits(train_split)
    trained = train_stages(method, dataset, str(data_root), splits, ref, storage, resolution=resolution,
                           overrides=overrides, dataset_options=dataset_options, n_clusters=n_clusters,
                           device=device)
    out = {"trained": trained}
    if evaluate and eval_split:
        labelled = [s for s in splits if s != eval_split]
        probe_split = labelled[0] if labelled else None
        result = evaluate_stages(trained, dataset, str(data_root), eval_split, probe_split, ref, storage,
                                 eval_resolution=eval_resolution, run_crf=run_crf,
                                 dataset_options=dataset_options)
        _publish(result, f"{method} on {dataset}/{eval_split} ({backbone})")
        out["evaluation"] = result
    publish_run(storage, f"{'evaluate' if evaluate else 'train'}-{method}", out)
    return out


@flow(name="train-stego", task_runner=SettingTaskRunner())
def train_stego(dataset: str, data_root: str | None = None,
                train_split: str = "train", backbone: str = DEFAULT_BACKBONE,
                weights: str | None = None, random_weights: bool = False, storage: str | None = None,
                overrides: dict | None = None, resolution: int = 224, dataset_options: dict | None = None,
                n_clusters: int | None = None, device: str = "auto",
                task_runner: str = "threads") -> dict:
    """extract -> five-crop -> KNN -> STEGO head -> clustering."""
    return _pipeline("stego", dataset, data_root, train_split, None, backbone, weights, random_weights,
                     storage, overrides, resolution, None, False, dataset_options, n_clusters, device, False)


@flow(name="train-omh", task_runner=SettingTaskRunner())
def train_omh(dataset: str, data_root: str | None = None,
              train_split: str = "train", backbone: str = DEFAULT_BACKBONE,
              weights: str | None = None, random_weights: bool = False, storage: str | None = None,
              overrides: dict | None = None, resolution: int = 224, dataset_options: dict | None = None,
              n_clusters: int | None = None, device: str = "auto",
              task_runner: str = "threads") -> dict:
    """Same cached stages as train-stego up to the head, then the STEGO head with OMH's hierarchy loss."""
    return _pipeline("omh", dataset, data_root, train_split, None, backbone, weights, random_weights,
                     storage, overrides, resolution, None, False, dataset_options, n_clusters, device, False)


@flow(name="evaluate", task_runner=SettingTaskRunner())
def evaluate(dataset: str, data_root: str | None = None,
             train_split: str = "train", eval_split: str = "val",
             method: str = "stego", backbone: str = DEFAULT_BACKBONE, weights: str | None = None,
             random_weights: bool = False, storage: str | None = None, overrides: dict | None = None,
             resolution: int = 224, eval_resolution: int | None = None, run_crf: bool = True,
             dataset_options: dict | None = None, n_clusters: int | None = None, device: str = "auto",
             task_runner: str = "threads") -> dict:
    """Evaluate the head trained with the same parameters (its stages are cache look-ups)."""
    return _pipeline(method, dataset, data_root, train_split, eval_split, backbone, weights, random_weights,
                     storage, overrides, resolution, eval_resolution, run_crf, dataset_options, n_clusters,
                     device, True)


@flow(name="pipeline", task_runner=SettingTaskRunner())
def pipeline(dataset: str, data_root: str | None = None,
             train_split: str = "train", eval_split: str = "val",
             method: str = "stego", backbone: str = DEFAULT_BACKBONE, weights: str | None = None,
             random_weights: bool = False, storage: str | None = None, overrides: dict | None = None,
             resolution: int = 224, eval_resolution: int | None = None, run_crf: bool = True,
             dataset_options: dict | None = None, n_clusters: int | None = None, device: str = "auto",
             task_runner: str = "threads") -> dict:
    """train-<method> then evaluate, in one run."""
    return _pipeline(method, dataset, data_root, train_split, eval_split, backbone, weights, random_weights,
                     storage, overrides, resolution, eval_resolution, run_crf, dataset_options, n_clusters,
                     device, True)
