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

from dataclasses import asdict, dataclass, field, replace

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.publish import in_flow_run, publish_run
from flows.runner import SettingTaskRunner
from flows.settings import data_root as resolve_data_root
from flows.settings import storage_root
from flows.train import DEFAULT_BACKBONE, STAGE_PREFIXES, RunSpec, evaluation_plan, train_inputs, trained_stages
from tasks.cluster import ensure_kmeans
from tasks.compare import N_OVERLAY, baseline_name, ensure_comparison
from tasks.evaluate import run_evaluation
from tasks.heads import ensure_head, head_artifact_key
from usseg_core import report
from usseg_core.crf import CRFParams
from usseg_core.errors import ConfigError
from usseg_core.heads import get_head, list_heads
from usseg_core.retrieval import K_DEFAULT as RETRIEVAL_K
from usseg_core.retrieval import VOTE_DEFAULT as RETRIEVAL_VOTE
from usseg_core.store import ArtifactStore

DEFAULT_SEEDS = (0, 1, 2)


def route_overrides(heads: list[str], overrides: dict | None) -> dict[str, dict]:
    """Per head, the ``--set`` keys that apply to it.

    ``views.*`` / ``overseg.*`` / ``knn.*`` go to every head (heads that do not use the stage ignore them);
    ``SECTION.field`` to the heads with that section (``stego.steps`` sets STEGO's and OMH's length, OMH's
    primary section being STEGO's); a bare field to the heads whose primary section has it. A key that no
    compared head takes fails before any work, and so does ``seed`` (the comparison sets it per run).
    """
    out: dict[str, dict] = {h: {} for h in heads}
    for key, value in (overrides or {}).items():
        if key.startswith(STAGE_PREFIXES):
            for h in heads:
                out[h][key] = value
            continue
        if key.rpartition(".")[2] == "seed":
            raise ConfigError(f"--set {key}: the comparison sets every run's seed; use --seeds")
        takers = []
        for h in heads:
            try:
                get_head(h).split_key(key)
            except ConfigError:
                continue
            takers.append(h)
        if not takers:
            sections = {h: [s for s, _ in get_head(h).sections] for h in heads}
            raise ConfigError(f"--set {key}: no compared head has this field; namespace it by config section "
                              "(e.g. stego.steps, picie.epochs, hsg.epochs); sections: "
                              + "; ".join(f"{h}: {', '.join(s)}" for h, s in sections.items()))
        for h in takers:
            out[h][key] = value
    return out


@dataclass(frozen=True)
class CompareSpec:
    """A comparison: which heads and seeds, on which data, with which backbone and protocol."""

    dataset: str
    heads: tuple[str, ...] = ()  # () = every registered head
    seeds: tuple[int, ...] = DEFAULT_SEEDS
    data_root: str | None = None
    train_split: str = "train"
    eval_split: str = "val"
    backbone: str = DEFAULT_BACKBONE
    weights: str | None = None
    random_weights: bool = False
    storage: str | None = None
    overrides: dict = field(default_factory=dict)  # routed per head by route_overrides
    resolution: int = 224
    eval_resolution: int | None = None
    run_crf: bool = True
    dataset_options: dict | None = None
    n_clusters: int | None = None
    device: str = "auto"
    retrieval: bool = False  # the same protocol for every head: retrieval rows for all of them or none
    retrieval_k: int = RETRIEVAL_K
    retrieval_vote: str = RETRIEVAL_VOTE
    on_error: str = "raise"  # invalid image/label files: "raise" | "skip" (--on-error skip)

    def head_names(self) -> list[str]:
        return list(self.heads) or list_heads()

    def runs(self) -> list[RunSpec]:
        """One RunSpec per head x seed, head by head."""
        heads = self.head_names()
        per_head = route_overrides(heads, self.overrides)
        return [RunSpec(h, self.dataset, self.data_root, self.train_split, self.eval_split, self.backbone,
                        self.weights, self.random_weights, self.storage,
                        {**per_head[h], f"{get_head(h).primary}.seed": int(s)}, self.resolution,
                        self.eval_resolution, self.run_crf, self.dataset_options, self.n_clusters, self.device,
                        self.retrieval, self.retrieval_k, self.retrieval_vote, on_error=self.on_error)
                for h in heads for s in self.seeds]

    def validate(self) -> None:
        heads = self.head_names()
        for h in heads:
            get_head(h)
        if len(set(heads)) != len(heads) or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"heads {heads} and seeds {list(self.seeds)} must not repeat")
        if not self.seeds:
            raise ConfigError("--seeds: give at least one seed")
        for run in self.runs():
            run.validate()

    def params(self) -> dict:
        """The report's own parameters (everything else is in its runs' keys)."""
        return {"dataset": self.dataset, "eval_split": self.eval_split, "heads": self.head_names(),
                "seeds": [int(s) for s in self.seeds], "run_crf": self.run_crf, "backbone": self.backbone,
                "retrieval": self.retrieval, "n_overlay": N_OVERLAY}


def _train_all(runs: list[RunSpec], prepared: dict[str, dict]) -> list[dict]:
    """Every run's head and k-means (codes and raw), all submitted before any is awaited."""
    storage = runs[0].storage
    store = ArtifactStore(storage)
    submitted, raw = [], {}
    for run in runs:
        p = prepared[run.head]
        key, _, _ = head_artifact_key(run.head, run.dataset, p["n_classes"], p["inputs"], run.head_overrides())
        cached = store.get("head", key) is not None
        head = ensure_head.submit(storage, run.head, run.dataset, p["n_classes"], p["inputs"],
                                  run.head_overrides(), run.device)
        seed = run.seed()
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


def _main_predictor(group: dict) -> dict:
    """A head's main unsupervised predictor: its own clusterer, else k-means on its codes."""
    by_kind = {p["kind"]: p for p in group["predictors"]}
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


def _column(title: str, group: dict, pred: dict, evaluation: dict) -> dict:
    unique = {**pred, "name": f"{title}:{pred['name']}"}  # names key the predictions of one shard
    return {"title": title, "predictor": pred["name"], "evaluation_path": evaluation["path"],
            "group": {"method": group["method"], "head": group["head"], "predictors": [unique]}}


def compare_runs(spec: CompareSpec) -> dict:
    """The comparison body: inputs once per head, training fanned out, evaluations, the report."""
    spec.validate()  # every head and every routed --set, before any work
    storage = str(storage_root(spec.storage))
    spec = replace(spec, storage=storage, data_root=str(resolve_data_root(spec.dataset, spec.data_root, storage)))
    runs = spec.runs()
    prepared: dict[str, dict] = {}
    for run in runs:  # seeds share their head's inputs; each stage fans its own shards out
        if run.head not in prepared:
            prepared[run.head] = train_inputs(run)
    records, first = [], {}
    for t in _train_all(runs, prepared):
        run, trained = t["run"], t["trained"]
        plan = evaluation_plan(trained, run)
        evaluation = run_evaluation(storage=storage, run_crf=run.run_crf, crf=CRFParams(), device=run.device,
                                    **plan)
        baseline = baseline_name(trained["cluster_on"][0]["view"])
        first.setdefault(run.head, (plan, evaluation, baseline))
        main = _main_predictor(_head_group(plan, run.head))  # its row label, as the results table writes it
        records.append({"head": run.head, "seed": run.seed(), "baseline": baseline,
                        "main": main.get("label", main["kind"]), "head_key": trained["head"]["key"],
                        "evaluation_key": evaluation["key"], "evaluation_path": evaluation["path"],
                        "kmeans_key": trained["kmeans"]["key"], "raw_kmeans_key": trained["raw_kmeans"]["key"],
                        "trained_now": t["trained_now"]})
    class_names = first[runs[0].head][0]["class_names"]
    result = ensure_comparison(storage, spec.params(), records, class_names, _overlay_plan(first, spec.run_crf))
    result["trained"] = [f"{r['head']}/seed{r['seed']}" for r in records if r["trained_now"]]
    return result


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
def compare(dataset: str, data_root: str | None = None, heads: list[str] | None = None,
            seeds: list[int] | None = None, train_split: str = "train", eval_split: str = "val",
            backbone: str = DEFAULT_BACKBONE, weights: str | None = None, random_weights: bool = False,
            storage: str | None = None, overrides: dict | None = None, resolution: int = 224,
            eval_resolution: int | None = None, run_crf: bool = True, dataset_options: dict | None = None,
            n_clusters: int | None = None, device: str = "auto", retrieval: bool = False,
            retrieval_k: int = RETRIEVAL_K, retrieval_vote: str = RETRIEVAL_VOTE,
            task_runner: str = "threads", on_error: str = "raise") -> dict:
    """Every head (default: all registered) x seed (default 0, 1, 2) trained or found in the cache, evaluated
    under one protocol, and reported with mean ± std (``storage/compare/<key>/report.html``)."""
    spec = CompareSpec(dataset, tuple(heads or ()), tuple(DEFAULT_SEEDS if seeds is None else seeds), data_root,
                       train_split, eval_split, backbone, weights, random_weights, storage, overrides or {},
                       resolution, eval_resolution, run_crf, dataset_options, n_clusters, device, retrieval,
                       retrieval_k, retrieval_vote, on_error)
    result = compare_runs(spec)
    _publish(result, spec)
    publish_run(str(storage_root(storage)), "compare", result)
    return result
