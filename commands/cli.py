"""The ``usseg`` command line: every command starts a flow or inspects ``storage/``."""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Optional

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
# The temporary local API server can take a while to start on a busy 2-core machine.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
logging.getLogger("usseg.trainer").setLevel(logging.INFO)  # "resuming from checkpoint ..." reaches the console

import typer  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.markup import escape  # noqa: E402
from rich.table import Table  # noqa: E402
from rich.text import Text  # noqa: E402

from commands.common import (EXIT_CODES_HELP, EXIT_INTERRUPTED, BackboneOpt, OnErrorOpt, RandomWeightsOpt,  # noqa: E402
                               RunnerOpt, StorageOpt, choice_of, error_exit, existing_storage, human, interrupted,
                               path_or_none, spec_default)
from orchestration.settings import storage_root  # noqa: E402
from usseg_core.spec import ExtractSpec  # noqa: E402

app = typer.Typer(add_completion=False, no_args_is_help=True, epilog=EXIT_CODES_HELP,
                  help="usseg: unsupervised semantic segmentation on cached frozen features.")


@app.callback()
def _global(debug: bool = typer.Option(False, "--debug", help="Show Prefect's logs and tracebacks of "
                                       "failed runs in the terminal (default: in <storage>/logs/).")) -> None:
    import os

    from orchestration import console

    console.DEBUG = debug
    if debug:  # local Dask workers read it (orchestration/dask_worker.py)
        os.environ["USSEG_DEBUG"] = "1"


storage_app = typer.Typer(no_args_is_help=True, help="Inspect the artifact store.")
app.add_typer(storage_app, name="storage")
console = Console()

@app.command()
def extract(
    dataset: str = typer.Option(..., help="Dataset registry name, e.g. camvid11, cocostuff27, directory."),
    data_root: Optional[Path] = typer.Option(
        None, "--data-root", help="Root folder of the dataset (default: $USSEG_DATA_ROOT/<dataset folder>)."),
    split: str = typer.Option(spec_default(ExtractSpec, "split"), help="Split name."),
    backbone: str = BackboneOpt,
    weights: Optional[Path] = typer.Option(None, help="Local weights file (.pth/.safetensors)."),
    random_weights: bool = RandomWeightsOpt,
    resolution: Optional[int] = typer.Option(spec_default(ExtractSpec, "resolution"),
                                             help="Input side (center_crop/five_crop) or long side (full)."),
    policy: str = typer.Option(spec_default(ExtractSpec, "policy"), help="center_crop | five_crop | full",
                               callback=choice_of("--policy", ExtractSpec, "policy")),
    flip: bool = typer.Option(False, help="Mirror images (flip-TTA features)."),
    batch_size: int = typer.Option(spec_default(ExtractSpec, "batch_size")),
    shard_size: int = typer.Option(spec_default(ExtractSpec, "shard_size"),
                                   help="Items per task and per stored shard (fan-out unit)."),
    on_error: str = OnErrorOpt,
    precision: str = typer.Option(spec_default(ExtractSpec, "precision"),
                                  callback=choice_of("--precision", ExtractSpec, "precision"),
                                  help="auto (bf16 on CUDA, fp32 elsewhere) | fp32 | bf16: part of the key."),
    device: str = typer.Option(spec_default(ExtractSpec, "device"), help="auto | cpu | cuda[:i]: where the "
                                                                         "backbone runs."),
    task_runner: str = RunnerOpt,
    storage: Optional[str] = StorageOpt,
) -> None:
    """Extract dense features of a dataset split into the Zarr feature store (cached)."""
    from commands.launch import run_command  # Prefect (and torch): only once the spec is valid and not answered

    fields = dict(dataset=dataset, data_root=path_or_none(data_root), split=split, backbone=backbone,
                  weights=path_or_none(weights), random_weights=random_weights, policy=policy,
                  resolution=resolution, flip=flip, storage=str(storage_root(storage)), batch_size=batch_size,
                  shard_size=shard_size, on_error=on_error, precision=precision, device=device,
                  task_runner=task_runner)
    _, result = run_command("flows.extract:extract_features", ExtractSpec, fields,
                            say=lambda line: print(line, flush=True))
    if result["cache_hit"]:
        console.print(f"[green]cache hit[/]: features/{escape(result['key'])} ({result['n']} items) - "
                      "no backbone work done")
    else:
        console.print(f"[green]extracted[/]: features/{escape(result['key'])} ({result['n']} items)")
    skipped = (result.get("manifest") or {}).get("skipped") or []
    where = f"; {len(skipped)} files skipped (invalid; listed in {result['manifest']['path']})" if skipped else ""
    print(f"store: {result['path']}{where}", flush=True)


@storage_app.command("ls")
def storage_ls(
    stage: Optional[str] = typer.Option(None, help="Only this stage."),
    dataset: Optional[str] = typer.Option(None, help="Only artifacts of this dataset."),
    backbone: Optional[str] = typer.Option(None, help="Only artifacts of this backbone."),
    storage: Optional[str] = StorageOpt,
) -> None:
    """List artifacts: stage, key, dataset, backbone, size, created, complete or not."""
    from usseg_core.store import ArtifactStore

    store = ArtifactStore(existing_storage(storage))
    table = Table(title=f"artifacts in {store.url}")
    for col in ("stage", "key", "dataset", "backbone", "size", "created", "complete"):
        table.add_column(col, no_wrap=col == "key", overflow="fold")  # keys are printed whole
    rows = []
    for art in store.iter_artifacts(stage):
        meta = art.meta
        if dataset and meta.get("dataset") != dataset:
            continue
        if backbone and meta.get("backbone") != backbone:
            continue
        size = store.size_of(art)
        rows.append((art.stage, art.key, str(meta.get("dataset", "")), str(meta.get("backbone", "")),
                     human(size or 0), str(meta.get("created", "")), "yes" if art.complete else "no"))
    if not sys.stdout.isatty():  # piped: tab-separated, whole keys, no colours
        print("\t".join(("stage", "key", "dataset", "backbone", "size", "created", "complete")))
        for row in rows:
            print("\t".join(row))
        return
    for row in rows:
        table.add_row(*(Text(cell, style={"yes": "green", "no": "yellow"}.get(cell, "") if i == 6 else "")
                        for i, cell in enumerate(row)))
    console.print(table)


@storage_app.command("show")
def storage_show(key: str = typer.Argument(..., help="Artifact key (a unique prefix is enough)."),
                 storage: Optional[str] = StorageOpt) -> None:
    """Print an artifact's metadata (params, upstream keys, code version, created, files)."""
    from usseg_core.store import ArtifactStore

    store = ArtifactStore(existing_storage(storage))
    art = store.find(key)
    meta = dict(art.meta)
    meta["complete"] = art.complete
    meta["path"] = str(art.path)
    meta["files"] = store.file_names(art)
    console.print_json(json.dumps(meta, default=str))
    from usseg_core.viewbank import DRAW_COLUMNS, DRAWS_FILE, draw_rows, load_draws

    if art.stage == "views" and (art.path / DRAWS_FILE).exists():  # a view bank: its recorded draws
        draws = load_draws(art.file(DRAWS_FILE))
        table = Table(title=f"draws of the first {min(5, len(draws))} of {len(draws)} images "
                      "(item = image x views + view)")
        for col in DRAW_COLUMNS:
            table.add_column(col)
        for row in draw_rows(draws[:5]):
            table.add_row(*row)
        console.print(table)
        console.print(f"all draws: {art.file(DRAWS_FILE)}", soft_wrap=True)


def _register_optional() -> None:
    """Commands of other areas register themselves here (one app, one help)."""
    import importlib

    for module in ("commands.edges", "commands.run", "commands.compare", "commands.ops", "commands.importing",
                   "commands.data"):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        mod.register(app)


_register_optional()


# The Ctrl-Cs this process received. Python drops a KeyboardInterrupt raised inside a finalizer or a
# weakref callback ("Exception ignored in ..."), and the run would then go on to exit 0: the recorded
# interrupt still ends the command with its line and exit 130.
_INTERRUPTS: list[int] = []


def _record_interrupt(signum, frame) -> None:
    _INTERRUPTS.append(signum)
    raise KeyboardInterrupt


def main() -> None:
    """Console entry point: a usseg error prints one plain line on stderr (last), with its exit code."""
    # Nothing of Prefect is imported here (2.5 s for prefect, 4 s more for its server on a 2-core machine;
    # `usseg --help` must stay under a second): every command that runs a flow calls
    # commands.launch.prepare_flow_process() first (run_flow does, and `usseg oversegment`).
    from commands import common

    common.OWNS_SERVER = True
    signal.signal(signal.SIGINT, _record_interrupt)
    try:
        app()
    except SystemExit as exc:  # typer turns Ctrl-C into exit 130, silently: say it (error_exit)
        if (exc.code == EXIT_INTERRUPTED and interrupted(exc)) or _INTERRUPTS:
            error_exit(KeyboardInterrupt() if _INTERRUPTS else exc)
        raise
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - every failure ends in one line and a code
        error_exit(exc)


if __name__ == "__main__":
    main()
