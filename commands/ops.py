"""``usseg up`` / ``down`` / ``status`` (the Prefect service) and ``usseg storage lineage`` / ``du`` / ``gc`` /
``verify``."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.tree import Tree

from commands.common import EXIT_INPUT, StorageOpt, existing_storage, human

console = Console()


def referenced_keys(storage: Path) -> set[str]:
    """Keys named by the run records in ``<storage>/_runs/`` (what flow runs used or produced)."""
    from orchestration.publish import runs_folder

    keys: set[str] = set()
    for record in sorted(runs_folder(storage).glob("*.json")):
        keys.update(json.loads(record.read_text()).get("keys", []))
    return keys


def _storage_app(app: typer.Typer) -> typer.Typer:
    for group in app.registered_groups:
        if group.name == "storage":
            return group.typer_instance
    storage_app = typer.Typer(no_args_is_help=True, help="Inspect the artifact store.")
    app.add_typer(storage_app, name="storage")
    return storage_app


def register(app: typer.Typer) -> None:
    register_service(app)
    register_storage(_storage_app(app))
    register_verify(_storage_app(app))


def register_service(app: typer.Typer) -> None:
    @app.command()
    def up(
        port: Optional[int] = typer.Option(None, help="API/UI port on 127.0.0.1 (default 4200; 0 = any free)."),
        data_root: Optional[Path] = typer.Option(
            None, "--data-root", help="Folder with one subfolder per dataset (default $USSEG_DATA_ROOT)."),
        schedules: bool = typer.Option(True, "--schedules/--no-schedules", help="Deploy cron schedules active."),
        concurrency: int = typer.Option(1, help="Flow runs at once on the pool (runs on one storage share "
                                                "artifacts: keep 1 unless they touch different data)."),
        prefect_file: Optional[Path] = typer.Option(None, "--prefect-file", help="Deployments file "
                                                    "(default deployments/prefect.yaml)."),
        storage: Optional[str] = StorageOpt,
    ) -> None:
        """Start a Prefect server, the work pool, every deployment and a worker (idempotent)."""
        from orchestration import service

        console.print("starting (server, work pool, deployments, worker) - this takes about a minute ...")
        state = service.up(storage, data_root, port, prefect_file or service.PREFECT_FILE,
                           schedules=schedules, concurrency=concurrency)
        console.print(f"[green]up[/]: UI {escape(state['ui_url'])}  (API {escape(state['api_url'])})")
        console.print(f"storage {state['storage']}; data root {state['data_root'] or '(unset: synthetic only)'}",
                      markup=False, soft_wrap=True)
        console.print(f"logs and state: {state['state_dir']}", markup=False, soft_wrap=True)
        console.print(f"use it from this shell: [bold]export PREFECT_API_URL={state['api_url']}[/]  then e.g. "
                      "`prefect deployment run train-stego/synthetic --watch`")

    @app.command()
    def down(storage: Optional[str] = StorageOpt) -> None:
        """Stop the worker (and its runs), then the server."""
        from orchestration import service

        stopped = service.down(storage)
        console.print("stopped: " + ", ".join(stopped) if stopped else "nothing was running", markup=False)

    @app.command()
    def status(storage: Optional[str] = StorageOpt) -> None:
        """Say what runs: server, worker, API health, deployments, flow runs by state."""
        from orchestration import service

        st = service.status(storage)
        for name in ("server", "worker", "healthy"):
            console.print(f"{name:8s} {'[green]yes[/]' if st[name] else '[red]no[/]'}")
        for name in ("ui_url", "api_url", "storage", "data_root", "state_dir", "deployments", "flow_runs"):
            if st.get(name) is not None:
                console.print(f"{name:8s} {st[name]}", markup=False, soft_wrap=True)


def register_storage(storage_app: typer.Typer) -> None:
    @storage_app.command("lineage")
    def lineage(key: str = typer.Argument(..., help="Artifact key (a unique prefix is enough)."),
                storage: Optional[str] = StorageOpt) -> None:
        """The tree of upstream artifacts of KEY (external inputs such as backbone fingerprints as leaves)."""
        from usseg_core.catalog import lineage as build
        from usseg_core.store import ArtifactStore

        node = build(ArtifactStore(existing_storage(storage)), key)
        tree = Tree(_label(node))
        _grow(tree, node)
        console.print(tree)

    @storage_app.command("du")
    def du(storage: Optional[str] = StorageOpt) -> None:
        """Size per stage."""
        from usseg_core.catalog import usage
        from usseg_core.store import ArtifactStore

        store = ArtifactStore(existing_storage(storage))
        table = Table(title=f"disk use of {escape(store.url)}")
        for col in ("stage", "complete", "incomplete", "size"):
            table.add_column(col, justify="left" if col == "stage" else "right")
        total = 0
        for row in usage(store):
            table.add_row(row.stage, str(row.n_complete), str(row.n_incomplete), human(row.bytes))
            total += row.bytes
        table.add_row("[bold]total[/]", "", "", f"[bold]{human(total)}[/]")
        console.print(table)

    @storage_app.command("gc")
    def gc(
        unreferenced: bool = typer.Option(False, "--unreferenced", help="Also complete artifacts that no other "
                                          "artifact lists upstream and no run record names."),
        min_age_hours: float = typer.Option(1.0, "--min-age-hours", help="Keep incomplete artifacts touched "
                                            "more recently (a running flow may be writing them)."),
        delete: bool = typer.Option(False, "--delete", help="Really delete (default: dry run, list only)."),
        storage: Optional[str] = StorageOpt,
    ) -> None:
        """Remove incomplete artifacts (and, with --unreferenced, unreferenced ones). Dry run by default."""
        from usseg_core.catalog import gc_plan, remove
        from usseg_core.store import ArtifactStore

        root = existing_storage(storage)
        store = ArtifactStore(root)
        plan = gc_plan(store, referenced_keys(root), unreferenced=unreferenced, min_age_s=min_age_hours * 3600)
        for item in plan:
            console.print(f"{'remove' if delete else 'would remove'} {item.artifact.stage}/{item.artifact.key} "
                          f"({item.reason}, {human(item.bytes)})", markup=False, soft_wrap=True)
        size = sum(i.bytes for i in plan)
        if delete:
            remove(store, plan)
            console.print(f"removed {len(plan)} artifacts, {human(size)} freed")
        else:
            console.print(f"{len(plan)} artifacts, {human(size)}: dry run, pass --delete to remove them")


def register_verify(storage_app: typer.Typer) -> None:
    @storage_app.command("verify")
    def verify(key: Optional[str] = typer.Argument(None, help="Artifact key (a unique prefix); default every "
                                                   "artifact."),
               storage: Optional[str] = StorageOpt) -> None:
        """Check whole artifacts: recorded file digests, every Zarr chunk's checksum and presence, finite
        values, done marks, loadable .pt/.npy/.json files. One line per artifact; exit 4 if any is damaged."""
        import time

        from usseg_core.integrity import verify_artifact
        from usseg_core.store import ArtifactStore

        store = ArtifactStore(existing_storage(storage))
        arts = [store.find(key)] if key else list(store.iter_artifacts())
        counts: dict[str, int] = {}
        damaged = []
        t0 = time.perf_counter()
        for n, art in enumerate(arts, 1):
            v = verify_artifact(_fetched(store, art))
            counts[v.status] = counts.get(v.status, 0) + 1
            what = "; ".join(v.problems) if v.problems else "; ".join(v.notes)
            console.print(f"[{n}/{len(arts)}] {art.stage}/{art.key}: {v.status}" + (f" ({what})" if what else ""),
                          markup=False, soft_wrap=True)
            if v.status == "damaged":
                damaged.append(art)
        summary = ", ".join(f"{c} {s}" for s, c in sorted(counts.items())) or "no artifacts"
        console.print(f"{len(arts)} artifacts checked in {time.perf_counter() - t0:.1f} s: {summary}", markup=False)
        if damaged:
            many = len(damaged) > 1
            sys.stdout.flush()
            sys.stderr.write(f"error: {len(damaged)} damaged artifact{'s' * many}: delete "
                             + " ".join(str(a.path) for a in damaged) + f" to recompute {'them' if many else 'it'}\n")
            raise typer.Exit(code=EXIT_INPUT)


def _fetched(store, art):
    """``art`` itself, or on an object store its committed attempt fetched into the mirror (a damaged fetch
    is verified as it lies in the mirror, which names what is wrong)."""
    from usseg_core.errors import DamagedArtifact

    if store.remote is None or not art.complete:
        return art
    try:
        return store.get(art.stage, art.key) or art
    except DamagedArtifact:
        return store.open(art.stage, art.key)


def _label(node) -> str:
    if node.artifact is None:
        return f"[dim]{escape(str(node.role))}: {escape(str(node.value))}[/] (external input)"
    meta = node.artifact.meta
    what = escape(", ".join(f"{k}={meta[k]}" for k in ("dataset", "split", "backbone", "method") if meta.get(k)))
    done = "" if node.artifact.complete else " [yellow](incomplete)[/]"
    return f"{escape(str(node.role))}: [bold]{node.artifact.stage}/{escape(str(node.value))}[/] {what}{done}"


def _grow(tree: Tree, node) -> None:
    for child in node.children:
        _grow(tree.add(_label(child)), child)
