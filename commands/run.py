"""``usseg run``, ``usseg oversegment`` and ``usseg segment`` (flow ``segment``)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from commands.common import (BackboneOpt, CrfOpt, DataRootOpt, DatasetOpt, DeviceOpt, EvalResolutionOpt,
                               EvalSplitOpt, OnErrorOpt, OverclusterOpt, RandomWeightsOpt, ResolutionOpt, RunnerOpt,
                               SetOpt, StorageOpt, TrainSplitOpt, WeightsOpt, choice_of, path_or_none, skipped_lines,
                               spec_default)
from orchestration.settings import storage_root
from usseg_core.config import parse_set_options
from usseg_core.head_names import BUILTIN_HEADS
from usseg_core.segment_spec import SegmentSpec
from usseg_core.spec import OversegmentSpec, RunSettings, RunSpec

console = Console()


def print_results(rows: list[dict], title: str) -> None:
    table = Table(title=title)
    for col in ("method", "clusterer", "crf", "accuracy", "miou"):
        table.add_column(col, justify="right" if col in ("accuracy", "miou") else "left")
    for r in rows:
        table.add_row(r["method"], r["clusterer"], "yes" if r["crf"] else "no", f"{r['accuracy']:.2f}",
                      f"{r['miou']:.2f}")
    console.print(table)


def write_results_csv(rows: list[dict], path: Path) -> None:
    import pandas as pd

    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(path, index=False)


def run_pipeline(fields: dict) -> tuple[RunSpec | None, dict]:
    """``(spec, result)`` of flow ``pipeline`` on ``RunSpec(**fields)``, the cheapest way (commands.launch:
    answered from its record, the spec then None; else after the data check)."""
    from commands.common import check_data_fits
    from commands.launch import run_command

    return run_command("flows.train:pipeline", RunSpec, fields, say=lambda line: print(line, flush=True),
                       check=check_data_fits)


def _run_help() -> str:
    heads = "\n\n".join(f"{h}: {summary}" for h, summary in BUILTIN_HEADS.items())
    return f"Run the whole pipeline (train + evaluate) for one head and print the results table.\n\n{heads}"


def register(app: typer.Typer) -> None:
    @app.command(help=_run_help())
    def run(
        head: str = typer.Argument(..., help="Head: " + " | ".join(BUILTIN_HEADS) + " (the head registry)."),
        dataset: str = DatasetOpt,
        data_root: Optional[Path] = DataRootOpt,
        train_split: str = TrainSplitOpt,
        eval_split: str = EvalSplitOpt,
        backbone: str = BackboneOpt,
        weights: Optional[Path] = WeightsOpt,
        random_weights: bool = RandomWeightsOpt,
        resolution: int = ResolutionOpt,
        eval_resolution: Optional[int] = EvalResolutionOpt,
        run_crf: bool = CrfOpt,
        seed: int = typer.Option(spec_default(RunSpec, "seed"), help="The run's seed (the head, both k-means, "
                                                                   "the linear probe); --set seed=S says the same."),
        retrieval: Optional[bool] = typer.Option(
            None, "--retrieval/--no-retrieval", help="Segment-retrieval rows (HSG's kNN label transfer from "
                                                     "the labelled training split; default: on for hsg)."),
        retrieval_k: int = typer.Option(spec_default(RunSettings, "retrieval_k"),
                                        help="Retrieval: memory segments voting per test segment (twke18/HSG: 20)."),
        retrieval_vote: str = typer.Option(spec_default(RunSettings, "retrieval_vote"),
                                           callback=choice_of("--retrieval-vote", RunSettings, "retrieval_vote"),
                                           help="Retrieval vote: majority (twke18/HSG) | weighted."),
        retrieval_labels: Optional[str] = typer.Option(
            None, callback=choice_of("--retrieval-labels", RunSettings, "retrieval_labels"),
            help="Retrieval memory labels: valid-majority (ours) | reference (twke18/HSG); default: the "
                 "dataset's (reference on cocostuff27, cityscapes27, potsdam3)."),
        results: Optional[Path] = typer.Option(None, help="Write the results table as CSV here."),
        on_error: str = OnErrorOpt,
        overcluster: str = OverclusterOpt,
        overrides: Optional[List[str]] = SetOpt,
        device: str = DeviceOpt,
        task_runner: str = RunnerOpt,
        storage: Optional[str] = StorageOpt,
    ) -> None:
        fields = dict(head=head, dataset=dataset, data_root=path_or_none(data_root),
                      train_split=train_split, eval_split=eval_split, backbone=backbone,
                      weights=path_or_none(weights), random_weights=random_weights, resolution=resolution,
                      eval_resolution=eval_resolution, run_crf=run_crf, retrieval=retrieval,
                      retrieval_k=retrieval_k, retrieval_vote=retrieval_vote, retrieval_labels=retrieval_labels,
                      on_error=on_error,
                      overcluster=overcluster, overrides=parse_set_options(overrides), seed=seed, device=device,
                      task_runner=task_runner, storage=str(storage_root(storage)))
        spec, out = run_pipeline(fields)
        ev = out.get("evaluation")
        if ev is not None:
            print_results(ev["rows"], f"{head} on {dataset}/{eval_split}")
            console.print(f"evaluation artifact: {ev['path']}", markup=False, soft_wrap=True)
        if results and ev is not None:
            write_results_csv(ev["rows"], results)
            console.print(f"results written to {results}", markup=False, soft_wrap=True)
        for line in out.get("notes", []):  # an unlabelled evaluation split: which rows were skipped
            print(line, flush=True)
        if out.get("gallery") is not None:
            console.print(f"cluster gallery: {out['gallery']['path']}  (name the clusters in a copy of its "
                          "names.yaml)", markup=False, soft_wrap=True)
        console.print(f"head artifact: {out['trained']['head']['key']}  (use with `usseg segment --model`)",
                      markup=False, soft_wrap=True)
        for line in skipped_lines(spec):
            print(line, flush=True)

    @app.command()
    def oversegment(
        dataset: str = typer.Option(..., help="Dataset registry name."),
        data_root: Path = typer.Option(..., "--data-root"),
        split: str = typer.Option(spec_default(OversegmentSpec, "split")),
        detector: str = typer.Option(spec_default(OversegmentSpec, "detector"),
                                     help="pidinet | pidinet-tiny | classical | hed | sed"),
        weights: Optional[Path] = typer.Option(None, help="Detector weights file (PiDiNet .pth, ...)."),
        t0: Optional[float] = typer.Option(None, help="Initial UCM threshold (default: dataset schedule)."),
        max_regions: Optional[int] = typer.Option(None, help="Region cap (default: dataset schedule)."),
        on_error: str = OnErrorOpt,
        task_runner: str = RunnerOpt,
        storage: Optional[str] = StorageOpt,
    ) -> None:
        """Edges + OWT-UCM + HSG threshold schedule for every image of a split (flow `oversegment`)."""
        from commands.launch import run_command  # Prefect: only once the spec is valid and not answered

        fields = dict(dataset=dataset, data_root=path_or_none(data_root), split=split,
                      detector=detector, weights=path_or_none(weights), t0=t0, max_regions=max_regions,
                      on_error=on_error, task_runner=task_runner, storage=str(storage_root(storage)))
        _, out = run_command("flows.oversegment:oversegment_flow", OversegmentSpec, fields,
                             say=lambda line: print(line, flush=True))
        state = "cache hit" if out["cache_hit"] else "computed"
        console.print(f"{state}: oversegment/{out['key']} -> {out['path']} (edges/, ucm2/, segments/)")

    @app.command()
    def segment(
        images: Optional[List[Path]] = typer.Argument(None, help="Image files to segment (or --data-root)."),
        model: str = typer.Option(..., "--model", help="Head artifact key (see `usseg storage ls --stage head`)."),
        data_root: Optional[Path] = typer.Option(None, "--data-root", help="A folder of images to segment (or "
                                                 "the root of --dataset)."),
        dataset: str = typer.Option(spec_default(SegmentSpec, "dataset"), help="Dataset registry name of "
                                    "--data-root (directory: a folder of your own)."),
        split: str = typer.Option(spec_default(SegmentSpec, "split"), help="Split to segment (directory: all)."),
        names: Optional[Path] = typer.Option(None, "--names", help="names.yaml: cluster id -> name (the cluster "
                                             "gallery of `usseg run` writes one to copy)."),
        out: Optional[Path] = typer.Option(None, "--out", help="Also copy the pictures, areas.parquet and "
                                           "index.html here (default: they stay in the store)."),
        clusterer: str = typer.Option(spec_default(SegmentSpec, "clusterer"),
                                      callback=choice_of("--clusterer", SegmentSpec, "clusterer"),
                                      help="own (the head's: STEGO cluster probe, PiCIE centroids; k-means for "
                                           "HSG) | kmeans"),
        k: Optional[int] = typer.Option(None, "--k", help="K of the k-means clusterer (--clusterer kmeans; "
                                                          "default: the number of classes of the head's dataset)."),
        run_crf: bool = typer.Option(spec_default(SegmentSpec, "run_crf"), "--crf/--no-crf",
                                     help="Dense CRF refinement of the labels."),
        long_side: int = typer.Option(spec_default(SegmentSpec, "long_side"),
                                      help="Images are resized to this long side for the backbone."),
        shard_size: int = typer.Option(spec_default(SegmentSpec, "shard_size"), help="Images per task (fan-out)."),
        on_error: str = OnErrorOpt,
        device: str = DeviceOpt,
        task_runner: str = RunnerOpt,
        storage: Optional[str] = StorageOpt,
    ) -> None:
        """Label PNGs, colour maps, overlays, class areas (areas.parquet) and an index page (index.html) for a
        folder of images or image files, with a trained head (+ clusterer, + CRF); HSG heads also write their
        hierarchy (one PNG per level, coarse to fine, and a strip). Flow `segment`: cached, resumable per image."""
        from commands.launch import run_command  # Prefect: only once the spec is valid and not answered

        fields = dict(images=[str(p) for p in images or []], model=model,
                      data_root=path_or_none(data_root), dataset=dataset, split=split, names=path_or_none(names),
                      out=path_or_none(out), clusterer=clusterer, k=k, run_crf=run_crf, long_side=long_side,
                      shard_size=shard_size, on_error=on_error, device=device, task_runner=task_runner,
                      storage=str(storage_root(storage)))
        _, result = run_command("flows.segment:segment", SegmentSpec, fields,
                                say=lambda line: print(line, flush=True))
        seg, report = result["segmentation"], result["report"]
        done = len(seg["ids"])
        state = "cache hit" if seg["cache_hit"] else f"{seg['written']} segmented, {done - seg['written']} already done"
        console.print(f"{done} images ({state}): segment/{seg['key']}", markup=False, soft_wrap=True)
        console.print(f"index: {report['path']}", markup=False, soft_wrap=True)
        console.print(f"class areas: {report['areas']}", markup=False, soft_wrap=True)
        if result.get("exported"):
            console.print(f"copied to {out} (index: {result['exported']})", markup=False, soft_wrap=True)
