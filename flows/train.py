"""Flows ``train-<head>`` and ``evaluate-<head>`` for every registered head, and ``pipeline``.

train:    manifest -> the head's cached inputs (five-crop features + KNN | base features + view bank)
          -> head -> k-means (codes) [+ raw-feature k-means]
evaluate: eval features (+ flipped) -> codes -> own clusterer / k-means / linear probe -> CRF -> metrics
Every stage is an artifact looked up by key first, so a re-run with the same inputs costs key look-ups.
All flows share one body (:func:`run`) driven by a :class:`RunSpec`; the head decides its inputs.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.publish import in_flow_run, publish_run
from flows.runner import SettingTaskRunner
from flows.settings import data_root as resolve_data_root
from flows.settings import storage_root
from tasks.cluster import ensure_kmeans, ensure_linear_probe
from tasks.common import BackboneRef, DataRef, ensure_manifest, logger
from tasks.evaluate import results_markdown, run_evaluation
from tasks.extract import ensure_features
from tasks.heads import ensure_head, ensure_knn
from tasks.oversegment import ensure_oversegmentation
from tasks.retrieval import add_retrieval
from tasks.views import ensure_views
from usseg_core.crf import CRFParams
from usseg_core.datasets.registry import dataset_class
from usseg_core.errors import ConfigError
from usseg_core.heads import get_head, list_heads
from usseg_core.knn import KnnSettings
from usseg_core.overseg import OversegSettings
from usseg_core.retrieval import K_DEFAULT as RETRIEVAL_K
from usseg_core.retrieval import VOTE_DEFAULT as RETRIEVAL_VOTE
from usseg_core.retrieval import check_options as check_retrieval_options
from usseg_core.views import CropSettings, ViewSpec
from usseg_core.viewbank import ViewBankConfig

DEFAULT_BACKBONE = "tf_efficientnet_lite0"
VIEWS_PREFIX = "views."  # --set views.n_views=8: view-bank fields, shared by every head that uses it
OVERSEG_PREFIX = "overseg."  # --set overseg.t0=0.1: oversegmentation settings (heads that need "oversegment")
KNN_PREFIX = "knn."  # --set knn.method=hnsw: the KNN search (heads that need "knn")
CROPS_PREFIX = "crops."  # --set crops.resize=squash: the five-crop heads' training view
# overrides of shared input stages, not of the head's config
STAGE_PREFIXES = (VIEWS_PREFIX, OVERSEG_PREFIX, KNN_PREFIX, CROPS_PREFIX)


def _prefixed(overrides: dict | None, prefix: str, cls: type, what: str):
    """``cls`` built from the ``prefix``-ed overrides; an unknown field fails with the valid names."""
    fields = {k[len(prefix):]: v for k, v in (overrides or {}).items() if k.startswith(prefix)}
    known = set(cls.__dataclass_fields__)
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConfigError(f"--set {prefix}{unknown[0]}: unknown {what} field; valid: "
                          f"{', '.join(prefix + k for k in sorted(known))}")
    try:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"--set {prefix}*: {exc}") from exc


@dataclass(frozen=True)
class RunSpec:
    """One training (and optionally evaluation) run: which head, on which data, with which backbone."""

    head: str
    dataset: str
    data_root: str | None = None
    train_split: str | list[str] = "train"
    eval_split: str | None = None  # None: train only
    backbone: str = DEFAULT_BACKBONE
    weights: str | None = None
    random_weights: bool = False
    storage: str | None = None
    overrides: dict = field(default_factory=dict)  # head config (namespaced), views.* and overseg.* fields
    resolution: int = 224  # training resolution (five-crops, view-bank base frame)
    eval_resolution: int | None = None
    run_crf: bool = True
    dataset_options: dict | None = None
    n_clusters: int | None = None  # k-means K (default: number of classes)
    device: str = "auto"
    retrieval: bool | None = None  # segment-retrieval rows (HSG's protocol); None: the head's default
    retrieval_k: int = RETRIEVAL_K  # neighbours per test segment (twke18/HSG: 20)
    retrieval_vote: str = RETRIEVAL_VOTE  # "majority" (twke18/HSG) | "weighted" (ours)
    overcluster: str = "unmatched-wrong"  # Hungarian protocol for extra clusters (metrics.OVERCLUSTER_MODES)
    on_error: str = "raise"  # invalid image/label files: "raise" (stop at the first) | "skip" (--on-error skip)

    @property
    def splits(self) -> list[str]:
        s = self.train_split
        return [p.strip() for p in s.split(",")] if isinstance(s, str) else list(s)

    def backbone_ref(self) -> BackboneRef:
        return BackboneRef(self.backbone, self.weights, self.random_weights, device=self.device)

    def head_overrides(self) -> dict:
        return {k: v for k, v in (self.overrides or {}).items() if not k.startswith(STAGE_PREFIXES)}

    def seed(self) -> int:
        """The run's seed: the head's primary section ``seed`` (``--set seed=S``), 0 for a head without one."""
        spec = get_head(self.head)
        return int(getattr(spec.config(self.dataset, self.head_overrides())[spec.primary], "seed", 0))

    def views_config(self) -> ViewBankConfig:
        return _prefixed(self.overrides, VIEWS_PREFIX, ViewBankConfig, "view-bank")

    def overseg_config(self) -> OversegSettings:
        return _prefixed(self.overrides, OVERSEG_PREFIX, OversegSettings, "oversegmentation")

    def knn_config(self) -> KnnSettings:
        return _prefixed(self.overrides, KNN_PREFIX, KnnSettings, "KNN search")

    def crops_config(self) -> CropSettings:
        return _prefixed(self.overrides, CROPS_PREFIX, CropSettings, "training-crop")

    def validate(self) -> None:
        """Every override checked (head sections, views.*, overseg.*, knn.*) before any work starts."""
        get_head(self.head).config(self.dataset, self.head_overrides())
        self.views_config()
        self.overseg_config().schedule(self.dataset)
        self.knn_config()
        self.crops_config().view(dataset_class(self.dataset), self.resolution)
        try:
            check_retrieval_options(self.retrieval_k, self.retrieval_vote)
        except ValueError as exc:
            raise ConfigError(f"retrieval: {exc}") from exc


def eval_view(dataset_obj, resolution: int | None) -> ViewSpec:
    """The evaluation protocol of the dataset (METHODS.md §5 S8), optionally at another resolution.

    At the training resolution it is also the view bank's base frame: the whole evaluation frame, smaller.
    """
    if dataset_obj.eval_policy == "full":
        return ViewSpec("full", resolution)
    return ViewSpec("center_crop", resolution or 320)


def train_inputs(run: RunSpec) -> dict:
    """The head's cached inputs (shared by every seed): ``inputs``, ``cluster_on`` (the features both
    k-means are fitted on), ``n_classes``, ``k`` and the head's own ``clusterer`` name."""
    spec = get_head(run.head)
    storage, ref = run.storage, run.backbone_ref()
    datas = [DataRef(run.dataset, run.data_root, s, run.dataset_options or {}, run.on_error) for s in run.splits]
    ds = datas[0].dataset()
    n_classes = ds.n_classes
    inputs: dict = {}
    cluster_on = None  # the features k-means (codes and raw) is fitted on
    if spec.needs & {"five_crop", "knn"}:
        crops = run.crops_config().view(ds, run.resolution)  # the dataset's reference view, or --set crops.*
        inputs["features"] = cluster_on = [ensure_features(storage, d, ref, crops) for d in datas]
        if "knn" in spec.needs:
            inputs["knn"] = ensure_knn(storage, inputs["features"], k=30, settings=run.knn_config())
    if "oversegment" in spec.needs:  # before the views: a detector that cannot be built fails early
        ocfg = run.overseg_config()  # same DataRefs, hence same manifests and image order, as the views
        inputs["oversegment"] = [ensure_oversegmentation(storage, d, ocfg.detector, ocfg.weights,
                                                         ocfg.schedule(run.dataset)) for d in datas]
    if "views" in spec.needs:
        base, vcfg = eval_view(ds, run.resolution), run.views_config()
        cluster_on = [ensure_features(storage, d, ref, base) for d in datas]  # un-augmented frames
        inputs["views"] = [ensure_views(storage, d, ref, base, vcfg, manifest=b["manifest"])
                           for d, b in zip(datas, cluster_on)]
    if cluster_on is None:
        raise ConfigError(f"head {run.head!r} declares no feature input ({sorted(spec.needs)})")
    return {"inputs": inputs, "cluster_on": cluster_on, "n_classes": n_classes,
            "k": run.n_clusters or n_classes, "clusterer": spec.clusterer}


def trained_stages(prepared: dict, head: dict, kmeans: dict, raw_kmeans: dict) -> dict:
    """What evaluation needs of a trained run (the result of :func:`train_stages`)."""
    return {**prepared["inputs"], "head": head, "kmeans": kmeans, "raw_kmeans": raw_kmeans,
            "n_classes": prepared["n_classes"], "k": prepared["k"], "clusterer": prepared["clusterer"],
            "cluster_on": prepared["cluster_on"]}


def train_stages(run: RunSpec) -> dict:
    """The head's cached inputs, the head, and k-means over its codes and over the raw features."""
    prepared = train_inputs(run)
    storage, cluster_on, k = run.storage, prepared["cluster_on"], prepared["k"]
    head = ensure_head(storage, run.head, run.dataset, prepared["n_classes"], prepared["inputs"],
                       run.head_overrides(), run.device)
    seed = run.seed()  # one run seed: the head's and both k-means inits (the baseline varies with it too)
    kmeans = ensure_kmeans(storage, head, cluster_on, k, seed=seed, device=run.device)
    raw_kmeans = ensure_kmeans(storage, None, cluster_on, k, seed=seed, device=run.device)
    return trained_stages(prepared, head, kmeans, raw_kmeans)


def evaluation_plan(trained: dict, run: RunSpec) -> dict:
    """Everything :func:`tasks.evaluate.run_evaluation` is called with: the labelled split, its manifest,
    the evaluation view, features (+ flipped) and the predictor groups (raw baseline first, the head last)."""
    storage, ref = run.storage, run.backbone_ref()
    data = DataRef(run.dataset, run.data_root, run.eval_split, run.dataset_options or {}, run.on_error)
    ds = data.dataset()
    view = eval_view(ds, run.eval_resolution)
    manifest = ensure_manifest(data, storage)
    feats = ensure_features(storage, data, ref, view, manifest=manifest)
    view = ViewSpec.from_params(feats["view"])
    flips = ensure_features(storage, data, ref, view.flipped(), manifest=manifest)
    n_classes, k, head = trained["n_classes"], trained["k"], trained["head"]
    method_preds = []
    if trained["clusterer"]:
        method_preds.append({"name": trained["clusterer"], "kind": "own", "label": trained["clusterer"],
                             "n_pred": n_classes, "key": head["key"], "head": head["path"]})
    method_preds.append({"name": "kmeans", "kind": "kmeans", "n_pred": k, "key": trained["kmeans"]["key"],
                         "centroids": trained["kmeans"]["path"]})
    labelled = [s for s in run.splits if s != run.eval_split]
    if labelled:
        pdata = DataRef(run.dataset, run.data_root, labelled[0], run.dataset_options or {}, run.on_error)
        pfeats = ensure_features(storage, pdata, ref, view)
        probe = ensure_linear_probe(storage, head, pfeats, pdata, view.params(), n_classes, device=run.device)
        method_preds.append({"name": "linear", "kind": "linear", "n_pred": n_classes, "key": probe["key"],
                             "probe": probe["path"], "n_classes": n_classes})
    groups = [
        {"method": "raw-features", "head": None, "predictors": [
            {"name": "raw-kmeans", "kind": "kmeans", "n_pred": k, "key": trained["raw_kmeans"]["key"],
             "centroids": trained["raw_kmeans"]["path"]}]},
        {"method": head["method"], "head": head["path"], "head_key": head["key"], "predictors": method_preds},
    ]
    retrieval = get_head(run.head).retrieval if run.retrieval is None else run.retrieval
    if retrieval and labelled:  # HSG's protocol, on the head's codes and on the raw features alike
        add_retrieval(groups, storage, pdata, pfeats, view.params(), n_classes, run.dataset,
                      k=run.retrieval_k, vote=run.retrieval_vote)
    elif retrieval:
        logger().warning("segment retrieval needs a labelled training split other than %s; rows skipped",
                         run.eval_split)
    return {"data": data, "manifest": manifest, "view": view, "feats": feats, "flips": flips, "groups": groups,
            "class_names": list(ds.class_names)}


def evaluate_stages(trained: dict, run: RunSpec) -> dict:
    plan = evaluation_plan(trained, run)
    return run_evaluation(storage=run.storage, run_crf=run.run_crf, crf=CRFParams(), device=run.device,
                          overcluster=run.overcluster, **plan)


def publish_results(result: dict, title: str) -> None:
    """An evaluation's results as Prefect table + markdown artifacts (nothing outside a flow run)."""
    if not in_flow_run():  # the look-up pass: the run record (publish_run) is all there is
        return
    rows = [{k: v for k, v in r.items() if not k.startswith("iou_")} for r in result["rows"]]
    create_table_artifact(key="results", table=rows, description=title)
    create_markdown_artifact(key="results-summary", markdown=(
        f"# {title}\n\n{results_markdown(result['rows'])}\n\nEvaluation artifact: `{result['key']}` "
        f"at `{result['path']}` (results.csv, results.parquet, confusion.png, overlays.png)"))


def run(spec: RunSpec) -> dict:
    """The one pipeline body: resolve paths, train (cache look-ups when trained), evaluate if asked."""
    spec.validate()  # an unknown head or a bad override fails before any work
    storage = str(storage_root(spec.storage))
    spec = replace(spec, storage=storage, data_root=str(resolve_data_root(spec.dataset, spec.data_root, storage)))
    trained = train_stages(spec)
    out = {"trained": trained}
    if spec.eval_split:
        result = evaluate_stages(trained, spec)
        publish_results(result, f"{spec.head} on {spec.dataset}/{spec.eval_split} ({spec.backbone})")
        out["evaluation"] = result
    publish_run(storage, f"{'evaluate' if spec.eval_split else 'train'}-{spec.head}", out)
    return out


def _train_flow(head: str):
    def train(dataset: str, data_root: str | None = None, train_split: str = "train",
              backbone: str = DEFAULT_BACKBONE, weights: str | None = None, random_weights: bool = False,
              storage: str | None = None, overrides: dict | None = None, resolution: int = 224,
              dataset_options: dict | None = None, n_clusters: int | None = None, device: str = "auto",
              task_runner: str = "threads") -> dict:
        return run(RunSpec(head, dataset, data_root, train_split, None, backbone, weights, random_weights,
                           storage, overrides or {}, resolution, None, False, dataset_options, n_clusters,
                           device))

    train.__name__ = train.__qualname__ = f"train_{head}"
    train.__doc__ = f"{get_head(head).summary}: its cached inputs -> head -> k-means."
    return flow(name=f"train-{head}", task_runner=SettingTaskRunner())(train)


def _evaluate_flow(head: str):
    def evaluate(dataset: str, data_root: str | None = None, train_split: str = "train", eval_split: str = "val",
                 backbone: str = DEFAULT_BACKBONE, weights: str | None = None, random_weights: bool = False,
                 storage: str | None = None, overrides: dict | None = None, resolution: int = 224,
                 eval_resolution: int | None = None, run_crf: bool = True, dataset_options: dict | None = None,
                 n_clusters: int | None = None, device: str = "auto", retrieval: bool | None = None,
                 retrieval_k: int = RETRIEVAL_K, retrieval_vote: str = RETRIEVAL_VOTE,
                 task_runner: str = "threads") -> dict:
        return run(RunSpec(head, dataset, data_root, train_split, eval_split, backbone, weights, random_weights,
                           storage, overrides or {}, resolution, eval_resolution, run_crf, dataset_options,
                           n_clusters, device, retrieval, retrieval_k, retrieval_vote))

    evaluate.__name__ = evaluate.__qualname__ = f"evaluate_{head}"
    evaluate.__doc__ = f"Evaluate {head} (training stages are cache look-ups once trained)."
    return flow(name=f"evaluate-{head}", task_runner=SettingTaskRunner())(evaluate)


TRAIN_FLOWS = {h: _train_flow(h) for h in list_heads()}
EVALUATE_FLOWS = {h: _evaluate_flow(h) for h in list_heads()}
# Module attributes `train_<head>` / `evaluate_<head>`: the deployments' entrypoints.
globals().update({f.fn.__name__: f for f in (*TRAIN_FLOWS.values(), *EVALUATE_FLOWS.values())})


@flow(name="pipeline", task_runner=SettingTaskRunner())
def pipeline(dataset: str, data_root: str | None = None, train_split: str = "train", eval_split: str = "val",
             method: str = "stego", backbone: str = DEFAULT_BACKBONE, weights: str | None = None,
             random_weights: bool = False, storage: str | None = None, overrides: dict | None = None,
             resolution: int = 224, eval_resolution: int | None = None, run_crf: bool = True,
             dataset_options: dict | None = None, n_clusters: int | None = None, device: str = "auto",
             retrieval: bool | None = None, retrieval_k: int = RETRIEVAL_K, retrieval_vote: str = RETRIEVAL_VOTE,
             task_runner: str = "threads", on_error: str = "raise", overcluster: str = "unmatched-wrong") -> dict:
    """train-<method> then evaluate, in one run (what `usseg run <head>` starts)."""
    return run(RunSpec(method, dataset, data_root, train_split, eval_split, backbone, weights, random_weights,
                       storage, overrides or {}, resolution, eval_resolution, run_crf, dataset_options,
                       n_clusters, device, retrieval, retrieval_k, retrieval_vote, overcluster=overcluster,
                       on_error=on_error))
