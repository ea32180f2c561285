"""Flow ``evaluate-model``: evaluate an existing head artifact (trained, or imported by ``usseg import``).

``usseg run`` and the ``evaluate-<head>`` flows train (or find) their own head; this flow takes a head key
and nothing else about it. Everything comes from the store:

* the backbone is the head's own (``tasks.segment._backbone_of``: an imported head's ``backbone``
  artifact with its weights file, a trained head's feature artifact);
* predictors: the head's own clusterer (STEGO/OMH cluster probe, PiCIE centroids; none for HSG), the
  linear probe the head artifact names (``linear_probe`` in its meta: imported heads) or else the newest
  linear probe trained on this head, and k-means over its codes when a k-means artifact of the head
  exists (else those rows are skipped, with a note);
* the split is evaluated under the dataset's protocol (``DatasetProtocol.eval_view``), with flip-TTA codes
  and CRF on/off, by ``tasks.evaluate.run_evaluation``: the same table, CSV and pictures as ``usseg run``.

Nothing is trained here: a head whose class count differs from the dataset's is refused in one line.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from prefect import flow

from orchestration.publish import publish_run
from orchestration.runner import SettingTaskRunner
from flows.train import publish_results
from orchestration.refs import data_ref, resolved
from tasks.manifest import ensure_manifest
from tasks.stage import logger
from tasks.evaluate import run_evaluation
from tasks.extract import ensure_features
from tasks.predictors import predictors_for
from usseg_core.crf import CRFParams
from usseg_core.errors import ConfigError
from usseg_core.spec import EvaluateModelSpec
from usseg_core.store import ArtifactStore
from usseg_core.views import ViewSpec

FLOW_NAME = "evaluate-model"


def _newest(arts: list):
    return max(arts, key=lambda a: str(a.meta.get("created", ""))) if arts else None


def head_classes(meta: dict) -> int:
    """The number of dataset classes a head was made for (an imported head's cluster probe may hold extra
    clusters: ``n_classes_dataset`` is the classes of its dataset)."""
    n = meta.get("n_classes_dataset")
    return int(n if isinstance(n, int) else meta["params"]["n_classes"])


def model_plan(storage: str, model: str, n_classes: int) -> dict:
    """What evaluating head ``model`` uses, from the store alone: the head artifact, its backbone and the
    predictors (own clusterer, linear probe, k-means), plus one-line ``notes`` on what is skipped.

    Raises:
        ConfigError: one line, when ``model`` is no complete head artifact, its backbone cannot be found,
            or the head (or its linear probe) was made for another number of classes than ``n_classes``.
    """
    from tasks.segment import _backbone_of
    from usseg_core.heads import get_head

    store = ArtifactStore(storage)
    art = store.find(model)
    if art.stage != "head" or not art.complete:
        raise ConfigError(f"{model}: not a complete head artifact ({art.stage}/{art.key}); "
                          "see `usseg storage ls --stage head`")
    meta, key = art.meta, art.key
    method = meta.get("method") or meta["params"]["method"]
    made_for = head_classes(meta)
    if made_for != n_classes:
        raise ConfigError(f"head {key} was made for {made_for} classes"
                          f"{' (' + meta['dataset'] + ')' if meta.get('dataset') else ''} but the dataset has "
                          f"{n_classes}: evaluate it on a dataset with {made_for} classes")
    try:
        backbone = _backbone_of(store, meta)
    except (KeyError, ConfigError) as exc:
        raise ConfigError(f"head {key}: its backbone artifact is missing from {storage} ({exc})") from None
    if backbone.weights and not Path(backbone.weights).is_file():
        raise ConfigError(f"head {key}: backbone weights file {backbone.weights} does not exist")
    head_path = str(art.file("head.pt"))
    notes = []
    probe = store.get("linear-probe", meta["linear_probe"]) if meta.get("linear_probe") else None
    if probe is None:  # a trained head: the newest probe trained on its codes
        probe = _newest([p for p in store.iter_artifacts("linear-probe")
                         if p.complete and p.meta.get("upstream", {}).get("head") == key])
    if probe is not None:
        pn = int(probe.meta["params"]["n_classes"])
        if pn != n_classes:
            raise ConfigError(f"linear probe {probe.key} of head {key} has {pn} classes but the dataset has "
                              f"{n_classes}")
    else:
        notes.append(f"no linear probe for head {key}: linear-probe rows skipped")
    kms = [k for k in store.iter_artifacts("kmeans") if k.complete and k.meta.get("upstream", {}).get("head") == key]
    km = _newest([k for k in kms if k.meta["params"].get("k") == n_classes]) or _newest(kms)
    if km is None:
        notes.append(f"no k-means artifact for head {key}: k-means rows skipped")
    preds = predictors_for(
        get_head(method), n_classes=n_classes, head_ref={"key": key, "path": head_path},
        head_classes=int(meta["params"]["n_classes"]),
        kmeans={"key": km.key, "path": str(km.file("centroids.npy"))} if km is not None else None,
        k=int(km.meta["params"]["k"]) if km is not None else None,
        probe={"key": probe.key, "path": str(probe.file("probe.pt"))} if probe is not None else None)
    if not preds:
        raise ConfigError(f"head {key} ({method}) has no clusterer of its own, no linear probe and no k-means: "
                          "nothing to evaluate")
    return {"key": key, "path": head_path, "method": method, "backbone": backbone, "predictors": preds,
            "notes": notes, "dataset": meta.get("dataset")}


def check_model(spec: EvaluateModelSpec) -> dict:
    """:func:`model_plan` against the evaluation split (the CLI calls it before any flow run starts)."""
    spec = resolved(spec)
    return model_plan(spec.storage, spec.model, data_ref(spec, spec.eval_split).dataset().n_classes)


def run_model_evaluation(spec: EvaluateModelSpec) -> dict:
    """The flow's body: plan, evaluation features (+ flipped) with the head's backbone, evaluation."""
    spec = resolved(spec)
    storage, model, dataset, eval_split, device = spec.storage, spec.model, spec.dataset, spec.eval_split, spec.device
    data = data_ref(spec, eval_split)
    ds = data.dataset()
    plan = model_plan(storage, model, ds.n_classes)
    for note in plan["notes"]:
        logger().info(note)
    ref = replace(plan["backbone"], device=device)
    view = ds.protocol.eval_view(spec.eval_resolution)
    manifest = ensure_manifest(data, storage)
    feats = ensure_features(storage, data, ref, view, manifest=manifest)
    view = ViewSpec.from_params(feats["view"])
    flips = ensure_features(storage, data, ref, view.flipped(), manifest=manifest)
    groups = [{"method": plan["method"], "head": plan["path"], "head_key": plan["key"],
               "predictors": plan["predictors"]}]
    title = f"{plan['method']} head {plan['key']} on {dataset}/{eval_split}"
    result = run_evaluation(storage=storage, data=data, manifest=manifest, view=view, feats=feats, flips=flips,
                            groups=groups, class_names=list(ds.class_names), run_crf=spec.run_crf, crf=CRFParams(),
                            title=f"{dataset}/{eval_split}", device=device)
    publish_results(result, title)
    out = {"head": {"key": plan["key"], "path": plan["path"], "method": plan["method"]},
           "backbone": ref.as_dict(), "features": feats, "flips": flips, "evaluation": result,
           "notes": plan["notes"]}
    publish_run(storage, FLOW_NAME, out)
    return out


@flow(name=FLOW_NAME, task_runner=SettingTaskRunner())
def evaluate_model(spec: EvaluateModelSpec) -> dict:
    """Evaluate an existing head artifact (trained or imported) with its own backbone: own clusterer,
    linear probe, k-means when the head has one; CRF on/off (what `usseg evaluate --model` starts)."""
    return run_model_evaluation(spec)
