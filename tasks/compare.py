"""The comparison artifact ``storage/compare/<key>/``: every head x seed's evaluation rows in one table with
mean ± std and min–max, the raw-feature baselines beside them, per-class IoU bars, side-by-side overlays,
training times and the keys behind every row, as CSV, markdown and one self-contained HTML page.

The key covers the evaluation and head artifacts of every run (hence everything they were computed from):
the same comparison again is a look-up, one more seed is a new report over the cached runs plus the new one.
"""
from __future__ import annotations

import html
import json
from datetime import datetime
from pathlib import Path

import numpy as np

from tasks.manifest import DataRef
from tasks.stage import CompareRef, Work, declare, logger, run_stage, stage_task
from tasks.evaluate import evaluate_shard, evaluation_rows, predictor_scores
from usseg_core import report
from usseg_core.store import ArtifactStore, artifact_key

COMPARE_VERSION = 1
COMPARE = declare("compare", COMPARE_VERSION, "usseg_core.report.summarise")
N_OVERLAY = 4  # example images in the side-by-side overlay (evenly spaced over the split)
# Raw-feature baselines are named after the features their k-means is fitted on (a head's training input).
FITTED_ON = {"five_crop": "five-crops", "full": "frames", "center_crop": "centre crops"}
RUN_COLUMNS = ("head", "seed", "head key", "evaluation key", "k-means key", "raw k-means key", "steps",
               "s / step", "training wall s", "this run")


def baseline_name(view_params: dict) -> str:
    """``raw-features (five-crops)``: the baseline row of heads whose k-means is fitted on those features."""
    policy = view_params.get("policy", "?")
    return f"raw-features ({FITTED_ON.get(policy, policy)})"


def training_record(storage: str, head_key: str) -> dict:
    """Steps, seconds per step and wall seconds of a head artifact's training (from its metadata)."""
    meta = ArtifactStore(storage).open("head", head_key).meta
    wall = None
    if meta.get("created") and meta.get("completed"):
        wall = (datetime.fromisoformat(meta["completed"]) - datetime.fromisoformat(meta["created"])).total_seconds()
    return {"steps": meta.get("steps"), "seconds_per_step": meta.get("seconds_per_step"), "train_seconds": wall,
            "config": meta.get("params", {}).get("config")}


def run_rows(store: ArtifactStore, run: dict) -> list[dict]:
    """The evaluation rows of one run, baseline rows renamed after their features, tagged with the seed."""
    rows = evaluation_rows(store.open("evaluation", run["evaluation_key"]))
    out = []
    for r in rows:
        base = r["method"] == "raw-features"
        out.append({**r, "method": run["baseline"] if base else run["head"], "seed": run["seed"],
                    "head_key": None if base else run["head_key"], "evaluation_key": run["evaluation_key"]})
    return out


def collect_rows(store: ArtifactStore, runs: list[dict]) -> list[dict]:
    """Every run's rows, the baselines first; a baseline shared by several heads (same features, same seed)
    is counted once."""
    seen, baselines, heads = set(), [], []
    for run in runs:
        for r in run_rows(store, run):
            ident = (r["method"], r["clusterer"], r["crf"], r["seed"])
            if r["head_key"] is None and ident in seen:
                continue
            seen.add(ident)
            (baselines if r["head_key"] is None else heads).append(r)
    return baselines + heads


def comparison_key(params: dict, runs: list[dict]) -> tuple[str, dict]:
    upstream = {}
    for r in runs:
        upstream[f"{r['head']}.seed{r['seed']}.head"] = r["head_key"]
        upstream[f"{r['head']}.seed{r['seed']}.evaluation"] = r["evaluation_key"]
    return artifact_key("compare", COMPARE_VERSION, params, upstream), upstream


@stage_task("compare-report")
def ensure_comparison(storage: str, params: dict, runs: list[dict], class_names: list[str],
                      overlay: dict | None) -> CompareRef:
    """The comparison artifact over finished runs (cached by their keys); writes every file users look at.

    ``runs``: one dict per head x seed (``head``, ``seed``, ``baseline``, ``main``, ``head_key``,
    ``evaluation_key`` / ``_path``, ``kmeans_key``, ``raw_kmeans_key``, ``trained_now``).
    ``overlay``: what :func:`overlay_examples` needs (the evaluation plan's split, features and one predictor
    column per head), or None for no overlay picture.
    """
    _, upstream = comparison_key(params, runs)
    rows: list = []

    def body(work: Work) -> dict:
        art = work.art
        for r in runs:
            r.update(training_record(storage, r["head_key"]))
        rows.extend(collect_rows(work.store, runs))
        summary = work.core(report.summarise, rows)
        _write_tables(art, rows, summary, runs)
        series = _iou_series(summary, runs, class_names, params["run_crf"])
        from usseg_core.viz import iou_bars, overlay_grid

        crf = "with CRF" if params["run_crf"] else "no CRF"
        iou_bars(art.file("per_class_iou.png"), class_names, series,
                 f"{params['dataset']}/{params['eval_split']}: per-class IoU, mean ± std over seeds ({crf})")
        pictures = ["per_class_iou.png"]
        if overlay:
            examples, columns = overlay_examples(overlay)
            if examples:
                overlay_grid(art.file("overlays.png"), examples, len(class_names), columns=columns)
                pictures.append("overlays.png")
        page = _html(params, summary, runs, art, pictures)
        art.file("report.html").write_text(page)
        art.file("report.md").write_text(summary_markdown(params, summary, runs))
        logger().info("compare/%s: %d runs, %d summary rows -> %s", art.key, len(runs), len(summary),
                      art.file("report.html"))
        return {"summary": summary, "n_runs": len(runs), "pictures": pictures}

    def ref(art, hit: bool) -> CompareRef:
        if hit:
            return CompareRef.of(art, str(art.path), True, **_load(ArtifactStore(storage), art))
        return CompareRef.of(art, str(art.path), False, summary=art.meta["summary"], runs=runs, rows=rows)

    return run_stage(storage, COMPARE, params, upstream, body, ref,
                     info={"dataset": params["dataset"], "backbone": params.get("backbone")})


def _load(store: ArtifactStore, art) -> dict:
    runs = json.loads(art.file("runs.json").read_text())
    return {"summary": art.meta["summary"], "runs": runs, "rows": collect_rows(store, runs)}


def _write_tables(art, rows: list[dict], summary: list[dict], runs: list[dict]) -> None:
    import pandas as pd

    pd.DataFrame(rows).to_csv(art.file("rows.csv"), index=False)
    pd.DataFrame([{k: v for k, v in s.items() if k != "seeds"} | {"seeds": " ".join(map(str, s["seeds"]))}
                  for s in summary]).to_csv(art.file("summary.csv"), index=False)
    art.file("runs.json").write_text(json.dumps(runs, indent=1, default=str))


def main_rows(summary: list[dict], runs: list[dict], run_crf: bool) -> list[dict]:
    """The summary row of each baseline and each head's main unsupervised predictor (its own clusterer,
    else k-means on its codes), at the comparison's CRF setting, in run order."""
    wanted = {r["baseline"]: "kmeans" for r in runs} | {r["head"]: r["main"] for r in runs}
    order = list(wanted)
    by = {(s["method"], s["clusterer"], s["crf"]): s for s in summary}
    return [by[(m, wanted[m], run_crf)] for m in order if (m, wanted[m], run_crf) in by]


def _iou_series(summary, runs, class_names, run_crf) -> list[dict]:
    out = []
    for s in main_rows(summary, runs, run_crf):
        out.append({"label": f"{s['method']} · {s['clusterer']}",
                    "mean": [s.get(f"iou_{c}_mean") for c in class_names],
                    "std": [s.get(f"iou_{c}_std") for c in class_names]})
    return out


def overlay_examples(overlay: dict) -> tuple[list[dict], list[str]]:
    """The same images through every column's predictor (CRF as in the comparison), mapped to classes with
    the assignment its evaluation found: rows for :func:`usseg_core.viz.overlay_grid`."""
    n = overlay["n_items"]
    picks = sorted(set(np.linspace(0, n - 1, min(N_OVERLAY, n)).astype(int).tolist()))
    cols = overlay["columns"]
    groups = [c["group"] for c in cols]
    flag = "yes" if overlay["run_crf"] else "no"
    assignments = []
    for c in cols:
        cms = np.load(Path(c["evaluation_path"]) / "confusion.npz")
        pred = c["group"]["predictors"][0]
        assignments.append(predictor_scores(pred, cms[f"{c['predictor']}__crf_{flag}"]).assignment)
    examples = []
    for i in picks:
        kept = evaluate_shard.fn(DataRef(**overlay["data"]), overlay["manifest_path"], overlay["feats_path"],
                                 overlay["flips_path"], view=overlay["view"], groups=groups,
                                 n_classes=overlay["n_classes"], start=i, stop=i + 1, run_crf=overlay["run_crf"],
                                 crf=overlay["crf"], examples=[i])["examples"][i]
        row = {"image": kept["image"], "label": kept["label"]}
        for c, a in zip(cols, assignments):
            p = kept["pred"][f"{c['group']['predictors'][0]['name']}|{flag}"]
            row[c["title"]] = np.where(p >= 0, a[np.clip(p, 0, None)], -1)
        examples.append(row)
    return examples, ["image", "label", *(c["title"] for c in cols)]


def _run_cells(r: dict) -> list[str]:
    sps = r.get("seconds_per_step")
    wall = r.get("train_seconds")
    return [r["head"], str(r["seed"]), r["head_key"], r["evaluation_key"], r["kmeans_key"], r["raw_kmeans_key"],
            str(r.get("steps") or "–"), f"{sps:.3f}" if sps else "–", f"{wall:.0f}" if wall is not None else "–",
            "trained" if r.get("trained_now") else "cached"]


def training_rows(runs: list[dict]) -> list[list[str]]:
    """Per head: runs, mean training wall time and seconds per step (as recorded by each head artifact)."""
    out = []
    for head in dict.fromkeys(r["head"] for r in runs):
        mine = [r for r in runs if r["head"] == head]
        walls = [r["train_seconds"] for r in mine if r.get("train_seconds") is not None]
        sps = [r["seconds_per_step"] for r in mine if r.get("seconds_per_step")]
        out.append([head, str(len(mine)), f"{np.mean(walls):.0f}" if walls else "–",
                    f"{np.mean(sps):.3f}" if sps else "–", str(mine[0].get("steps") or "–")])
    return out


TRAINING_COLUMNS = ("head", "runs", "training wall s (mean)", "s / step (mean)", "steps")


def summary_markdown(params: dict, summary: list[dict], runs: list[dict]) -> str:
    title = f"usseg compare: {params['dataset']}/{params['eval_split']} ({params.get('backbone')})"
    return (f"# {title}\n\nheads {', '.join(params['heads'])}; seeds {', '.join(map(str, params['seeds']))}; "
            "mean ± sample std (ddof 1) over seeds.\n\n"
            + report.markdown_table(report.SUMMARY_COLUMNS, map(report.summary_cells, summary))
            + "\n## Training\n\n" + report.markdown_table(TRAINING_COLUMNS, training_rows(runs))
            + "\n## Runs (`usseg storage lineage KEY` explains any of them)\n\n"
            + report.markdown_table(RUN_COLUMNS, map(_run_cells, runs)))


def _html(params, summary, runs, art, pictures) -> str:
    configs = "".join(f"<details><summary>{html.escape(r['head'])} seed {r['seed']} — head {r['head_key']}</summary>"
                      "<pre>" + html.escape("\n".join(f"{section}: {json.dumps(fields)}" for section, fields in
                                                      (r.get("config") or {}).items())) + "</pre></details>"
                      for r in runs)
    captions = {"per_class_iou.png": "Per-class IoU of each head's main predictor and the baselines (mean ± std)",
                "overlays.png": f"The same images, one column per head (seed {runs[0]['seed']}, main predictor, "
                                f"CRF {'on' if params['run_crf'] else 'off'}); label = ground truth"}
    blocks = [
        ("Results", f"<p class='note'>heads {', '.join(params['heads'])}; seeds "
                    f"{', '.join(map(str, params['seeds']))}; mean ± sample std (ddof 1) over seeds; "
                    f"accuracy and mIoU in %, Hungarian-matched unless the clusterer outputs classes.</p>"
                    + report.html_table(report.SUMMARY_COLUMNS, map(report.summary_cells, summary))),
        *((captions[p], report.inline_png(art.file(p), p)) for p in pictures),
        ("Training time per head", report.html_table(TRAINING_COLUMNS, training_rows(runs))),
        ("Runs and their artifact keys", report.html_table(RUN_COLUMNS, map(_run_cells, runs))
         + "<p class='note'><code>usseg storage lineage KEY</code> prints everything a key was computed "
           "from.</p>"),
        ("Configuration of every run", configs),
    ]
    return report.html_page(f"usseg compare: {params['dataset']}/{params['eval_split']} "
                            f"({params.get('backbone')})", blocks)
