"""``usseg compare`` (every head x seed, one table) and ``usseg demo`` (the comparison on synthetic scenes)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from commands.common import (BackboneOpt, CrfOpt, DataRootOpt, DatasetOpt, DeviceOpt, EvalResolutionOpt,
                               EvalSplitOpt, OnErrorOpt, OverclusterOpt, RandomWeightsOpt, ResolutionOpt, RunnerOpt,
                               StorageOpt, TrainSplitOpt, WeightsOpt, path_or_none, skipped_lines, spec_default)
from orchestration.settings import storage_root
from usseg_core.config import parse_set_options
from usseg_core.head_names import BUILTIN_HEADS, DEFAULT_DEMO_HEADS
from usseg_core.spec import CompareSpec

console = Console()
# The one line under the demo's table: what its numbers are and are not.
DEMO_MEANING = ("What the numbers mean: pixel accuracy / mIoU (%) on the synthetic val scenes after Hungarian "
                "matching of each head's clusters to the 5 classes (labels are used only to score); each head "
                "must beat the raw-feature k-means rows of the features it trains on to have learned anything. "
                "These are short demo trainings on easy scenes, not the papers' settings: the README's CamVid "
                "tables are the real comparison.")


def _csv_list(text: str | None, what: str, cast=str) -> list:
    if text is None:
        return []
    items = [t.strip() for t in text.split(",") if t.strip()]
    try:
        return [cast(t) for t in items]
    except ValueError:
        raise typer.BadParameter(f"{what}: expected a comma-separated list, got {text!r}") from None


def print_summary(result: dict, title: str) -> None:
    from usseg_core import report

    table = Table(title=title)
    for col in report.COMPACT_COLUMNS:
        table.add_column(col, justify="left" if col in ("method", "clusterer", "CRF") else "right")
    for row in result["summary"]:
        table.add_row(*(Text(cell) for cell in report.compact_cells(row)))  # literal: no markup in values
    console.print(table)


def run_compare(fields: dict) -> tuple[CompareSpec | None, dict]:
    """``(spec, result)`` of flow ``compare`` on ``CompareSpec(**fields)``, the cheapest way
    (commands.launch: answered from its record, the spec then None; else after the data check)."""
    from commands.common import check_data_fits
    from commands.launch import run_command

    return run_command("flows.compare:compare", CompareSpec, fields, say=lambda line: print(line, flush=True),
                       check=check_data_fits)


def _report_lines(result: dict) -> None:
    if result["cache_hit"]:
        console.print("[green]cache hit[/]: every run and the report were already computed")
    elif result["trained"]:
        n_runs, n_new = len(result["runs"]), len(result["trained"])
        cached = f"; the other {n_runs - n_new} were cache hits" if n_new < n_runs else ""
        console.print(f"trained in this run: {', '.join(result['trained'])}{cached}", markup=False)
    console.print(f"report: {result['path']}/report.html", soft_wrap=True, markup=False)
    console.print(f"  tables summary.csv, rows.csv, runs.json; pictures per_class_iou.png, overlays.png; "
                  f"`usseg storage lineage {result['key']}` lists every run behind it", soft_wrap=True, markup=False)


def next_steps(result: dict, root: Path, left_out: tuple[str, ...] = ()) -> list[str]:
    """What a new user should look at after the demo: the report, one hierarchy picture, and the commands that
    train on and segment their own photos (with a head the demo trained)."""
    runs = result.get("runs") or []
    lines = ["", "next:", f"  1. open the report: {result['path']}/report.html"]
    hierarchy = next((Path(r["evaluation_path"]) / "hierarchy.png" for r in runs if r.get("head") == "hsg"
                      and (Path(r["evaluation_path"]) / "hierarchy.png").exists()), None)
    if hierarchy is not None:
        lines.append(f"  2. HSG's hierarchy of segments, coarse to fine: {hierarchy}")
    model = next((r["head_key"] for r in runs if r.get("head") == "stego"), runs[0]["head_key"] if runs else None)
    if model is not None:
        lines.append(f"  3. segment your own photos with a head trained here: usseg segment --model {model} "
                     f"--data-root PHOTOS --storage {root}")
    lines.append("  4. train on your own photos and name the clusters in its gallery: usseg run stego --dataset "
                 "directory --data-root PHOTOS --set n_clusters=8  (docs/own-images.md)")
    if left_out:
        lines.append(f"  5. the heads a plain demo leaves out for time: usseg demo --heads {','.join(left_out)} "
                     f"--storage {root}")
    return lines


def register(app: typer.Typer) -> None:
    @app.command()
    def compare(
        dataset: str = DatasetOpt,
        data_root: Optional[Path] = DataRootOpt,
        heads: Optional[str] = typer.Option(None, help="Comma-separated heads (default: every registered head: "
                                                       + ",".join(BUILTIN_HEADS) + ")."),
        seeds: str = typer.Option(",".join(map(str, spec_default(CompareSpec, "seeds"))),
                                  help="Comma-separated seeds (each seeds a head and its k-means)."),
        train_split: str = TrainSplitOpt,
        eval_split: str = EvalSplitOpt,
        backbone: str = BackboneOpt,
        weights: Optional[Path] = WeightsOpt,
        random_weights: bool = RandomWeightsOpt,
        resolution: int = ResolutionOpt,
        eval_resolution: Optional[int] = EvalResolutionOpt,
        run_crf: bool = CrfOpt,
        retrieval: bool = typer.Option(spec_default(CompareSpec, "retrieval"), "--retrieval/--no-retrieval",
                                       help="Add HSG's segment-retrieval rows for every head (and the raw features)."),
        on_error: str = OnErrorOpt,
        overcluster: str = OverclusterOpt,
        overrides: Optional[List[str]] = typer.Option(
            None, "--set", help="Config override key=value (repeatable), routed to the heads that have it: "
                                "stego.steps=1000 (STEGO and OMH), picie.epochs=5, hsg.epochs=5, bare names to "
                                "every head whose main section has them, views.* / overseg.* / knn.* / crops.* to "
                                "all; n_clusters and dataset_options set the comparison's fields."),
        device: str = DeviceOpt,
        task_runner: str = RunnerOpt,
        storage: Optional[str] = StorageOpt,
    ) -> None:
        """Every head x seed on one cached feature set, under one protocol: mean ± std table, per-class IoU
        bars, side-by-side overlays and an HTML report (cached runs are reused; new seeds/heads train only
        themselves)."""
        fields = dict(dataset=dataset, data_root=path_or_none(data_root),
                      heads=_csv_list(heads, "--heads"), seeds=_csv_list(seeds, "--seeds", int),
                      train_split=train_split, eval_split=eval_split, backbone=backbone,
                      weights=path_or_none(weights), random_weights=random_weights, resolution=resolution,
                      eval_resolution=eval_resolution, run_crf=run_crf, retrieval=retrieval, on_error=on_error,
                      overcluster=overcluster, overrides=parse_set_options(overrides), device=device,
                      task_runner=task_runner, storage=str(storage_root(storage)))
        spec, result = run_compare(fields)
        print_summary(result, f"usseg compare: {dataset}/{eval_split}, mean ± std over seeds {seeds}")
        _report_lines(result)
        for line in skipped_lines(spec):
            print(line, flush=True)

    @app.command()
    def demo(
        storage: Optional[str] = StorageOpt,
        seeds: str = typer.Option("0,1", help="Seeds of every head."),
        heads: Optional[str] = typer.Option(None, help="Heads (default: every built-in head that fits the demo's "
                                                       "3 minutes: " + ",".join(DEFAULT_DEMO_HEADS) + ")."),
        n_train: int = typer.Option(40, help="Synthetic training images."),
        n_val: int = typer.Option(8, help="Synthetic validation images."),
    ) -> None:
        """The main job on the embedded default: synthetic scenes -> every head (CAUSE-TR only with --heads) x 2
        seeds vs raw-feature k-means (`usseg compare` with short training)."""
        from usseg_core.datasets.synthetic import DEMO_RESOLUTION, DEMO_SIZE, ensure_synthetic
        from usseg_core.head_names import BUILTIN_HEAD_CARDS

        root = storage_root(storage)
        names = _csv_list(heads, "--heads") or list(DEFAULT_DEMO_HEADS)
        if all(n in BUILTIN_HEAD_CARDS for n in names):  # the built-in heads' cards: no registry, no torch
            demo = {k: v for n in names for k, v in BUILTIN_HEAD_CARDS[n].demo.items()}
        else:  # a registered head of the user's (its module imported): the registry knows its demo
            from usseg_core.heads import demo_overrides

            demo = demo_overrides(names)
        height, width = DEMO_SIZE
        data_root = ensure_synthetic(root / "data" / f"synthetic-{n_train}-{n_val}-{height}x{width}",
                                     n_train=n_train, n_val=n_val, height=height, width=width)
        console.print(f"synthetic dataset: {data_root}", markup=False)
        _, result = run_compare(dict(dataset="synthetic", heads=names, seeds=_csv_list(seeds, "--seeds", int),
                                     overrides=demo, resolution=DEMO_RESOLUTION, storage=str(root),
                                     data_root=str(data_root)))
        print_summary(result, "usseg demo: every head vs raw-feature k-means on synthetic/val (mean ± std)")
        console.print(DEMO_MEANING, soft_wrap=True, markup=False)
        _report_lines(result)
        console.print(f"all artifacts under {root} (try `usseg storage ls --storage {root}`)", markup=False)
        left_out = () if heads else tuple(n for n in BUILTIN_HEAD_CARDS if n not in DEFAULT_DEMO_HEADS)
        for line in next_steps(result, root, left_out):
            console.print(line, markup=False, soft_wrap=True)
