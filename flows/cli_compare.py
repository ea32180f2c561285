"""``usseg compare`` (every head x seed, one table) and ``usseg demo`` (the comparison on synthetic scenes)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from flows.cli_common import (BackboneOpt, CrfOpt, DataRootOpt, DatasetOpt, EvalResolutionOpt, RandomWeightsOpt,
                               OnErrorOpt, ResolutionOpt, RunnerOpt, StorageOpt, TrainSplitOpt, WeightsOpt, on_error_mode,
                               reject_on_error_set)
from flows.settings import storage_root
from usseg_core.config import parse_set_options
from usseg_core.head_names import BUILTIN_HEADS

console = Console()
# The demo's test-sized lengths: every head learns something on 40 synthetic images in about a minute each.
DEMO_OVERRIDES = {"stego.steps": 200, "picie.epochs": 4, "hsg.epochs": 4}
# The one line under the demo's table: what its numbers are and are not.
DEMO_MEANING = ("What the numbers mean: pixel accuracy / mIoU (%) on the synthetic val scenes after Hungarian "
                "matching of each head's clusters to the 5 classes (labels are used only to score); each head "
                "must beat the raw-feature k-means rows of the features it trains on to have learned anything. "
                "These are short demo trainings on easy scenes, not the papers' settings: the README's CamVid "
                "tables are the real comparison.")


def demo_overrides(heads: list[str]) -> dict:
    """:data:`DEMO_OVERRIDES` for the sections these heads have."""
    from usseg_core.heads import get_head

    sections = {s for h in heads for s, _ in get_head(h).sections}
    return {k: v for k, v in DEMO_OVERRIDES.items() if k.split(".")[0] in sections}


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


def run_compare(dataset: str, data_root: str | None, heads: list[str], seeds: list[int], storage: Path,
                sets: dict, runner: str, **kw) -> dict:
    from flows.compare import CompareSpec, compare
    from flows.fastpath import run_flow

    reject_on_error_set(sets)
    dataset_options = sets.pop("dataset_options", None)
    n_clusters = sets.pop("n_clusters", None)
    spec = CompareSpec(dataset, tuple(heads), tuple(seeds) if seeds else CompareSpec.seeds, data_root,
                       storage=str(storage), overrides=sets, dataset_options=dataset_options, n_clusters=n_clusters,
                       **kw)
    spec.validate()  # every head and routed --set before any server starts
    params = dict(dataset=dataset, data_root=data_root, heads=list(spec.heads) or None, seeds=list(spec.seeds),
                  storage=str(storage), overrides=sets, dataset_options=dataset_options, n_clusters=n_clusters,
                  task_runner=runner, **kw)
    return run_flow(compare, params, say=lambda line: print(line, flush=True))


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


def register(app: typer.Typer) -> None:
    @app.command()
    def compare(
        dataset: str = DatasetOpt,
        data_root: Optional[Path] = DataRootOpt,
        heads: Optional[str] = typer.Option(None, help="Comma-separated heads (default: every registered head: "
                                                       + ",".join(BUILTIN_HEADS) + ")."),
        seeds: str = typer.Option("0,1,2", help="Comma-separated seeds (each seeds a head and its k-means)."),
        train_split: str = TrainSplitOpt,
        eval_split: str = typer.Option("val", help="Labelled split every head is evaluated on."),
        backbone: str = BackboneOpt,
        weights: Optional[Path] = WeightsOpt,
        random_weights: bool = RandomWeightsOpt,
        resolution: int = ResolutionOpt,
        eval_resolution: Optional[int] = EvalResolutionOpt,
        crf: bool = CrfOpt,
        retrieval: bool = typer.Option(False, "--retrieval/--no-retrieval",
                                       help="Add HSG's segment-retrieval rows for every head (and the raw features)."),
        on_error: str = OnErrorOpt,
        set_: Optional[List[str]] = typer.Option(
            None, "--set", help="Config override key=value (repeatable), routed to the heads that have it: "
                                "stego.steps=1000 (STEGO and OMH), picie.epochs=5, hsg.epochs=5, bare names to "
                                "every head whose main section has them, views.* / overseg.* / knn.* to all."),
        runner: str = RunnerOpt,
        storage: Optional[Path] = StorageOpt,
    ) -> None:
        """Every head x seed on one cached feature set, under one protocol: mean ± std table, per-class IoU
        bars, side-by-side overlays and an HTML report (cached runs are reused; new seeds/heads train only
        themselves)."""
        root = storage_root(storage)
        result = run_compare(dataset, str(data_root) if data_root else None, _csv_list(heads, "--heads"),
                             _csv_list(seeds, "--seeds", int), root, parse_set_options(set_), runner,
                             train_split=train_split, eval_split=eval_split, backbone=backbone,
                             weights=str(weights) if weights else None, random_weights=random_weights,
                             resolution=resolution, eval_resolution=eval_resolution, run_crf=crf,
                             retrieval=retrieval, on_error=on_error_mode(on_error))
        print_summary(result, f"usseg compare: {dataset}/{eval_split}, mean ± std over seeds {seeds}")
        _report_lines(result)

    @app.command()
    def demo(
        storage: Optional[Path] = StorageOpt,
        seeds: str = typer.Option("0,1", help="Seeds of every head."),
        heads: Optional[str] = typer.Option(None, help="Heads (default: every registered head)."),
        n_train: int = typer.Option(40, help="Synthetic training images."),
        n_val: int = typer.Option(12, help="Synthetic validation images."),
    ) -> None:
        """The main job on the embedded default: synthetic scenes -> every head x 2 seeds vs raw-feature k-means
        (`usseg compare` with short training)."""
        from usseg_core.datasets.synthetic import ensure_synthetic

        root = storage_root(storage)
        data_root = ensure_synthetic(root / "data" / f"synthetic-{n_train}-{n_val}", n_train=n_train,
                                     n_val=n_val)
        console.print(f"synthetic dataset: {data_root}", markup=False)
        from usseg_core.heads import list_heads

        names = _csv_list(heads, "--heads") or list_heads()
        result = run_compare("synthetic", str(data_root), names, _csv_list(seeds, "--seeds", int), root,
                             demo_overrides(names), "threads", resolution=128)
        print_summary(result, "usseg demo: every head vs raw-feature k-means on synthetic/val (mean ± std)")
        console.print(DEMO_MEANING, soft_wrap=True, markup=False)
        _report_lines(result)
        console.print(f"all artifacts under {root} (try `usseg storage ls --storage {root}`)", markup=False)
