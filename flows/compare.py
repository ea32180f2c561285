"""Flow ``compare``: every head x seed on one dataset, one feature cache and one evaluation protocol, and
one report (``storage/compare/<key>/``: table of mean ± std and min–max, per-class IoU bars, side-by-side
overlays, training times, the keys of every run, a self-contained ``report.html``).

compare: for each head, its cached inputs (features, KNN | view bank, oversegmentation: shared by its seeds)
         -> every head x seed's training and k-means, submitted to the task runner at once
         -> each run's evaluation (image shards fan out as in ``evaluate-<head>``) -> the report
A run that already exists is a cache hit, so adding a seed or a head to a finished comparison trains only
the new runs. Trainings run in parallel across Dask worker processes; within one process they queue (the
heads draw from torch's global RNG: see ``tasks.heads``), and evaluation starts once every head is trained.
"""
from __future__ import annotations

from dataclasses import asdict, replace

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from orchestration.publish import in_flow_run, publish_run
from orchestration.runner import SettingTaskRunner
from flows.train import evaluation_plan, train_inputs, trained_stages
from orchestration.refs import resolved
from tasks.cluster import ensure_kmeans
from tasks.compare import N_OVERLAY, baseline_name, ensure_comparison
from tasks.evaluate import run_evaluation
from tasks.predictors import Predictor
from tasks.stage import EvaluationRef
from tasks.heads import ensure_head, head_artifact_key
from usseg_core import report
from usseg_core.crf import CRFParams
from usseg_core.spec import CompareSpec, RunSpec
from usseg_core.store import ArtifactStore


def report_params(spec: CompareSpec) -> dict:
    """The report's own parameters (everything else is in its runs' keys)."""
    return {"dataset": spec.dataset, "eval_split": spec.eval_split, "heads": spec.head_names(),
            "seeds": [int(s) for s in spec.seeds], "run_crf": spec.run_crf, "backbone": spec.backbone,
            "retrieval": spec.retrieval, "n_overlay": N_OVERLAY}


def _train_all(runs: list[RunSpec], prepared: dict[str, dict]) -> list[dict]:
    """Every run's head and k-means (codes and raw), all submitted before any is awaited."""
    storage = runs[0].storage
    store = ArtifactStore(storage)
    submitted, raw = [], {}
    for run in runs:
        p = prepared[run.head]
        settings = run.head_settings()
        key, _, _ = head_artifact_key(run.head, run.dataset, p["n_classes"], p["inputs"], settings)
        cached = store.get("head", key) is not None
        head = ensure_head.submit(storage, run.head, run.dataset, p["n_classes"], p["inputs"], settings,
                                  run.device)
        seed = run.seed
        km = ensure_kmeans.submit(storage, head, p["cluster_on"], p["k"], seed=seed, device=run.device)
        ident = (tuple(f["key"] for f in p["cluster_on"]), p["k"], seed)  # STEGO and OMH share theirs
        if ident not in raw:
            raw[ident] = ensure_kmeans.submit(storage, None, p["cluster_on"], p["k"], seed=seed,
                                              device=run.device)
        submitted.append((run, head, km, raw[ident], not cached))
    return [{"run": run, "trained": trained_stages(prepared[run.head], h.result(), km.result(), rk.result()),
             "trained_now": now} for run, h, km, rk, now in submitted]


def _head_group(plan: dict, head: str) -> dict:
    """The head's predictor group of an evaluation plan (the other group is the raw-feature baseline)."""
    return next(g for g in plan["groups"] if g.get("head_key") and g["method"] == head)


def _main_predictor(group: dict) -> Predictor:
    """A head's main unsupervised predictor: its own clusterer, else k-means on its codes."""
    by_kind = {p.kind: p for p in group["predictors"]}
    return by_kind.get("own") or by_kind["kmeans"]


def _overlay_plan(first: dict[str, tuple], run_crf: bool) -> dict:
    """Columns of the side-by-side overlay: each distinct baseline, then each head (its first seed)."""
    baselines, heads = {}, []
    for head, (plan, evaluation, baseline) in first.items():
        raw = plan["groups"][0]
        baselines.setdefault(baseline, _column(baseline, raw, raw["predictors"][0], evaluation))
        group = _head_group(plan, head)
        heads.append(_column(head, group, _main_predictor(group), evaluation))
    columns = [*baselines.values(), *heads]
    plan = next(iter(first.values()))[0]  # every head is evaluated on the same features
    return {"data": plan["data"].as_dict(), "manifest_path": plan["manifest"]["path"],
            "view": plan["view"].params(), "feats_path": plan["feats"]["path"],
            "flips_path": plan["flips"]["path"] if plan["flips"] else None, "n_classes": len(plan["class_names"]),
            "n_items": plan["manifest"]["n"], "run_crf": run_crf, "crf": asdict(CRFParams()), "columns": columns}


def _column(title: str, group: dict, pred: Predictor, evaluation: EvaluationRef) -> dict:
    unique = replace(pred, name=f"{title}:{pred.name}")  # names key the predictions of one shard
    return {"title": title, "predictor": pred["name"], "evaluation_path": evaluation["path"],
            "group": {"method": group["method"], "head": group["head"], "predictors": [unique]}}


def compare_runs(spec: CompareSpec) -> dict:
    """The comparison body (``spec`` resolved by the flow): inputs once per head, training fanned out,
    evaluations, the report."""
    storage, runs = spec.storage, spec.runs()
    prepared: dict[str, dict] = {}
    for run in runs:  # seeds share their head's inputs; each stage fans its own shards out
        if run.head not in prepared:
            prepared[run.head] = train_inputs(run)
    records, first = [], {}
    for t in _train_all(runs, prepared):
        run, trained = t["run"], t["trained"]
        plan = evaluation_plan(trained, run)
        evaluation = run_evaluation(storage=storage, run_crf=run.run_crf, crf=CRFParams(), device=run.device,
                                    overcluster=run.overcluster, **plan)
        baseline = baseline_name(trained["cluster_on"][0]["view"])
        first.setdefault(run.head, (plan, evaluation, baseline))
        main = _main_predictor(_head_group(plan, run.head))  # its row label, as the results table writes it
        records.append({"head": run.head, "seed": run.seed, "baseline": baseline,
                        "main": main.row_label, "head_key": trained["head"].key,
                        "evaluation_key": evaluation.key, "evaluation_path": evaluation.path,
                        "kmeans_key": trained["kmeans"].key, "raw_kmeans_key": trained["raw_kmeans"].key,
                        "trained_now": t["trained_now"]})
    class_names = first[runs[0].head][0]["class_names"]
    result = ensure_comparison(storage, report_params(spec), records, class_names, _overlay_plan(first, spec.run_crf))
    return {**result, "trained": [f"{r['head']}/seed{r['seed']}" for r in records if r["trained_now"]]}


def _publish(result: dict, spec: CompareSpec) -> None:
    if not in_flow_run():  # the look-up pass: the run record (publish_run) is all there is
        return
    summary = result["summary"]
    create_table_artifact(key="compare", description=f"compare on {spec.dataset}/{spec.eval_split}", table=[
        dict(zip(report.SUMMARY_COLUMNS, report.summary_cells(s))) for s in summary])
    md = (f"# usseg compare: {spec.dataset}/{spec.eval_split}\n\n"
          + report.markdown_table(report.SUMMARY_COLUMNS, map(report.summary_cells, summary))
          + f"\nReport: [{result['path']}/report.html](file://{result['path']}/report.html) "
            f"(per_class_iou.png, overlays.png, summary.csv, rows.csv, runs.json); artifact `{result['key']}`")
    create_markdown_artifact(key="compare-summary", markdown=md, description="usseg compare")


@flow(name="compare", task_runner=SettingTaskRunner())
def compare(spec: CompareSpec) -> dict:
    """Every head (default: all registered) x seed (default 0, 1, 2) trained or found in the cache, evaluated
    under one protocol, and reported with mean ± std (``storage/compare/<key>/report.html``)."""
    spec = resolved(spec)
    result = compare_runs(spec)
    _publish(result, spec)
    publish_run(spec.storage, "compare", result)
    return result
