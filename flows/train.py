"""Flows ``train-<head>`` and ``evaluate-<head>`` for every registered head, and ``pipeline``.

train:    manifest -> the head's cached inputs (five-crop features + KNN | base features + view bank)
          -> head -> k-means (codes) [+ raw-feature k-means]
evaluate: eval features (+ flipped) -> codes -> own clusterer / k-means / linear probe -> CRF -> metrics
Every stage is an artifact looked up by key first, so a re-run with the same inputs costs key look-ups.
All flows share one body (:func:`run`) driven by a :class:`RunSpec`; the head decides its inputs.
"""
from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from orchestration.publish import in_flow_run, publish_run
from orchestration.refs import backbone_ref, data_ref, resolved
from orchestration.runner import SettingTaskRunner
from tasks.cluster import ensure_kmeans, ensure_linear_probe
from tasks.manifest import ensure_manifest
from tasks.stage import ArtifactRef, HeadRef, logger
from tasks.evaluate import results_markdown, run_evaluation
from tasks.extract import ensure_features
from tasks.heads import check_knn_rows, ensure_head
from tasks.inputs import InputContext, ensure_inputs
from tasks.predictors import predictors_for
from tasks.retrieval import add_retrieval
from usseg_core.crf import CRFParams
from usseg_core.errors import ConfigError
from usseg_core.heads import get_head, list_heads
from usseg_core.spec import RunSpec
from usseg_core.views import ViewSpec



def train_inputs(run: RunSpec) -> dict:
    """The head's cached inputs (shared by every seed): ``inputs``, ``cluster_on`` (the features both
    k-means are fitted on), ``n_classes``, ``k`` and the head's own ``clusterer`` name."""
    spec = get_head(run.head)
    check_knn_rows(run)  # a deployment's run gets the CLI's early refusal too (before any extraction)
    datas = [data_ref(run, s) for s in run.splits]
    ds = datas[0].dataset()
    n_classes = ds.n_classes or run.n_clusters  # an unlabelled folder: as many classes as clusters asked for
    if not n_classes:
        raise ConfigError(f"{run.dataset}/{datas[0].split} has no labels and no class list: pass --set "
                          "n_clusters=K, the number of kinds of region to find")
    ctx = InputContext(run, run.storage, backbone_ref(run), datas, ds)
    cluster_on = ensure_inputs(ctx, spec.needs)  # the input-stage table, in its order
    inputs = ctx.inputs
    if cluster_on is None:
        raise ConfigError(f"head {run.head!r} declares no feature input ({sorted(spec.needs)})")
    return {"inputs": inputs, "cluster_on": cluster_on, "n_classes": n_classes,
            "k": run.n_clusters or n_classes, "clusterer": spec.clusterer}


def trained_stages(prepared: dict, head: HeadRef, kmeans: ArtifactRef, raw_kmeans: ArtifactRef) -> dict:
    """What evaluation needs of a trained run (the result of :func:`train_stages`)."""
    return {**prepared["inputs"], "head": head, "kmeans": kmeans, "raw_kmeans": raw_kmeans,
            "n_classes": prepared["n_classes"], "k": prepared["k"], "clusterer": prepared["clusterer"],
            "cluster_on": prepared["cluster_on"]}


def train_stages(run: RunSpec) -> dict:
    """The head's cached inputs, the head, and k-means over its codes and over the raw features."""
    prepared = train_inputs(run)
    storage, cluster_on, k = run.storage, prepared["cluster_on"], prepared["k"]
    head = ensure_head(storage, run.head, run.dataset, prepared["n_classes"], prepared["inputs"],
                       run.head_settings(), run.device)
    seed = run.seed  # one run seed: the head's and both k-means inits (the baseline varies with it too)
    kmeans = ensure_kmeans(storage, head, cluster_on, k, seed=seed, device=run.device)
    raw_kmeans = ensure_kmeans(storage, None, cluster_on, k, seed=seed, device=run.device)
    return trained_stages(prepared, head, kmeans, raw_kmeans)


def evaluation_plan(trained: dict, run: RunSpec) -> dict:
    """Everything :func:`tasks.evaluate.run_evaluation` is called with: the labelled split, its manifest,
    the evaluation view, features (+ flipped) and the predictor groups (raw baseline first, the head last)."""
    storage, ref = run.storage, backbone_ref(run)
    data = data_ref(run, run.eval_split)
    ds = data.dataset()
    view = ds.protocol.eval_view(run.eval_resolution)
    manifest = ensure_manifest(data, storage)
    feats = ensure_features(storage, data, ref, view, manifest=manifest)
    view = ViewSpec.from_params(feats["view"])
    flips = ensure_features(storage, data, ref, view.flipped(), manifest=manifest)
    n_classes, k, head = trained["n_classes"], trained["k"], trained["head"]
    labelled = [s for s in run.splits if s != run.eval_split]
    probe = None
    if labelled:
        pdata = data_ref(run, labelled[0])
        pfeats = ensure_features(storage, pdata, ref, view)
        probe = ensure_linear_probe(storage, head, pfeats, pdata, view.params(), n_classes, seed=run.seed,
                                    device=run.device)
    groups = [
        {"method": "raw-features", "head": None, "predictors": predictors_for(
            None, n_classes=n_classes, kmeans=trained["raw_kmeans"], k=k, kmeans_name="raw-kmeans")},
        {"method": head["method"], "head": head["path"], "head_key": head["key"], "predictors": predictors_for(
            get_head(run.head), n_classes=n_classes, head_ref=head, kmeans=trained["kmeans"], k=k, probe=probe)},
    ]
    retrieval = get_head(run.head).retrieval if run.retrieval is None else run.retrieval
    if retrieval and labelled:  # HSG's protocol, on the head's codes and on the raw features alike
        labels = run.retrieval_labels or ds.protocol.retrieval_labels  # None: the dataset's protocol
        add_retrieval(groups, storage, pdata, pfeats, view.params(), n_classes, run.dataset,
                      k=run.retrieval_k, vote=run.retrieval_vote, memory_labels=labels)
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


def gallery_stage(trained: dict, run: RunSpec):
    """The cluster gallery of the run's main clusterer (tasks/gallery.py) over the images it looks at (the
    evaluation split, else the first training split) at the dataset's evaluation view."""
    from tasks.gallery import ensure_gallery, main_predictor

    data = data_ref(run, run.eval_split or run.splits[0])
    view = data.dataset().protocol.eval_view(run.eval_resolution)
    feats = ensure_features(run.storage, data, backbone_ref(run), view)
    predictor = main_predictor(get_head(run.head), n_classes=trained["n_classes"], head_ref=trained["head"],
                               kmeans=trained["kmeans"], k=trained["k"])
    return ensure_gallery(run.storage, predictor, trained["head"], feats, data, device=run.device)


def run(spec: RunSpec) -> dict:
    """The one pipeline body: resolve paths, train (cache look-ups when trained), evaluate if asked (and
    labelled); on the user's own images (a dataset with no standard folder), the cluster gallery."""
    spec = resolved(spec)
    trained = train_stages(spec)
    out = {"trained": trained, "notes": []}
    eval_ds = data_ref(spec, spec.eval_split).dataset() if spec.eval_split else None
    if eval_ds is not None and not eval_ds.has_labels:
        out["notes"].append(f"{spec.dataset}/{spec.eval_split} has no labels: accuracy, mIoU, linear-probe and "
                            "retrieval rows skipped (they need labels); the cluster gallery shows the clusters")
    elif eval_ds is not None:
        result = evaluate_stages(trained, spec)
        publish_results(result, f"{spec.head} on {spec.dataset}/{spec.eval_split} ({spec.backbone})")
        out["evaluation"] = result
    if (eval_ds or data_ref(spec, spec.splits[0]).dataset()).protocol.folder is None:
        out["gallery"] = gallery_stage(trained, spec)
    publish_run(spec.storage, f"{'evaluate' if spec.eval_split else 'train'}-{spec.head}", out)
    return out


def _for_head(spec: RunSpec, head: str, flow_name: str) -> RunSpec:
    if spec.head != head:
        raise ConfigError(f"flow {flow_name} runs head {head!r}, but its spec names head {spec.head!r}")
    return spec


def _train_flow(head: str):
    def train(spec: RunSpec) -> dict:
        return run(_for_head(spec, head, f"train-{head}").changed(eval_split=None))

    train.__name__ = train.__qualname__ = f"train_{head}"
    train.__doc__ = (f"{get_head(head).summary}: its cached inputs -> head -> k-means (the spec's evaluation "
                     "fields are not used).")
    return flow(name=f"train-{head}", task_runner=SettingTaskRunner())(train)


def _evaluate_flow(head: str):
    def evaluate(spec: RunSpec) -> dict:
        return run(_for_head(spec, head, f"evaluate-{head}"))

    evaluate.__name__ = evaluate.__qualname__ = f"evaluate_{head}"
    evaluate.__doc__ = f"Evaluate {head} (training stages are cache look-ups once trained)."
    return flow(name=f"evaluate-{head}", task_runner=SettingTaskRunner())(evaluate)


TRAIN_FLOWS = {h: _train_flow(h) for h in list_heads()}
EVALUATE_FLOWS = {h: _evaluate_flow(h) for h in list_heads()}
# Module attributes `train_<head>` / `evaluate_<head>`: the deployments' entrypoints.
globals().update({f.fn.__name__: f for f in (*TRAIN_FLOWS.values(), *EVALUATE_FLOWS.values())})


def __getattr__(name: str):
    """``train_<head>`` / ``evaluate_<head>`` of a head registered after this module was imported (a plugin
    or a test's head): made on first access, which is how a deployment's entrypoint resolves it."""
    kind, _, head = name.partition("_")
    makers = {"train": (TRAIN_FLOWS, _train_flow), "evaluate": (EVALUATE_FLOWS, _evaluate_flow)}
    if kind in makers and head in list_heads():
        flows, make = makers[kind]
        if head not in flows:
            flows[head] = make(head)
        return flows[head]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@flow(name="pipeline", task_runner=SettingTaskRunner())
def pipeline(spec: RunSpec) -> dict:
    """train-<head> then evaluate, in one run (what `usseg run <head>` starts)."""
    return run(spec)
