"""``usseg import stego CKPT``: a published STEGO checkpoint as usseg artifacts.

Writes, keyed by the checkpoint's sha256 (importing the same file twice is a cache hit):

* ``backbone/<key>/backbone.safetensors`` — the DINO ViT, usable as ``--weights`` with its registry name;
* ``head/<key>/head.pt`` — the STEGO code head and its cluster probe, as ``tasks.heads.ensure_head`` writes
  it (``usseg_core.heads.save_head``), loadable by ``load_head``, evaluation and ``usseg segment --model``;
* ``linear-probe/<key>/probe.pt`` — the checkpoint's linear probe, as ``tasks.cluster.ensure_linear_probe``
  writes it (a ``LinearProbe`` state dict), when the checkpoint has one.

The head's upstream ``backbone`` is the backbone artifact: that is where ``usseg segment`` and
``usseg evaluate --model`` read the backbone name and weights of a head (``tasks.segment._backbone_of``; a
trained head's ``features0`` is its feature artifact, whose metadata carries the same two fields).

``usseg evaluate --model HEAD_KEY`` (registered here too; flow ``evaluate-model`` in
``flows/evaluate_model.py``) evaluates an existing head, imported or trained, without training anything.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import typer

from commands.common import CrfOpt, EvalResolutionOpt, RunnerOpt, StorageOpt, fail, path_or_none, spec_default
from orchestration.settings import storage_root
from usseg_core.errors import UssegError
from usseg_core.spec import EvaluateModelSpec

IMPORT_VERSION = 1
SOURCE = "stego-lightning"  # the format imported (params of every artifact written here)
BACKBONE_FILE = "backbone.safetensors"


@dataclass(frozen=True)
class Imported:
    """Keys and files of an import; ``cache_hit`` when every artifact was already in the store."""

    backbone: str
    weights: Path
    head_key: str
    head_path: Path
    probe_key: str | None
    probe_path: Path | None
    backbone_key: str
    cache_hit: bool


def import_stego(ckpt_path: str | Path, storage: str | Path, name: str | None = None) -> Imported:
    """Convert a STEGO Lightning checkpoint into backbone, head and linear-probe artifacts (see module doc)."""
    from safetensors.torch import save_file

    from tasks.cluster import PROBE_VERSION
    from tasks.heads import HEAD_VERSION
    from usseg_core.backbones import get_backbone
    from usseg_core.heads import config_to_dict, save_head
    from usseg_core.heads.stego_import import parse_stego_checkpoint, stego_config
    from usseg_core.store import file_sha256
    from usseg_core.store import ArtifactStore, artifact_key

    store, ckpt_path = ArtifactStore(storage), Path(ckpt_path)
    sha = file_sha256(ckpt_path) if ckpt_path.is_file() else None
    source = {"format": SOURCE, "sha256": sha}
    bkey = artifact_key("backbone", IMPORT_VERSION, source)
    bart = store.get("backbone", bkey)
    head_art = None
    if bart is not None:
        hkey = bart.meta.get("head_key")
        head_art = store.get("head", hkey) if hkey else None
    if bart is not None and head_art is not None:  # cache hit: nothing read but the file's hash
        pkey = head_art.meta.get("linear_probe")
        part = store.get("linear-probe", pkey) if pkey else None
        out = Imported(bart.meta["backbone"], Path(bart.meta["weights"]), head_art.key, head_art.file("head.pt"),
                       part.key if part else None, part.file("probe.pt") if part else None, bkey, True)
        _record(storage, sha, out)
        return out

    ck = parse_stego_checkpoint(ckpt_path, sha256=sha)  # any problem of the file: one line naming it
    info = {"imported_from": {"path": str(ckpt_path.resolve()), "sha256": ck.sha256, "format": SOURCE,
                              "name": name or ckpt_path.stem, "global_step": ck.global_step},
            "dataset": ck.dataset, "backbone": ck.backbone}
    bart = store.begin("backbone", bkey, version=IMPORT_VERSION, params=source, **info)
    weights = bart.file(BACKBONE_FILE)
    save_file({k: v.clone() for k, v in ck.backbone_state.items()}, str(weights))
    # loading it exactly as `--weights` will: checks the layout strictly and gives the fingerprint
    fingerprint = get_backbone(ck.backbone, weights=weights, device="cpu").fingerprint

    config = {"stego": stego_config(ck)}
    params = {"method": "stego", "n_classes": ck.n_clusters, "config": config_to_dict(config), "imported": source}
    upstream = {"backbone": bkey}
    hkey = artifact_key("head", HEAD_VERSION, params, upstream)
    head_art = store.begin("head", hkey, version=HEAD_VERSION, params=params, upstream=upstream, method="stego",
                           backbone_fingerprint=fingerprint, **info)
    save_head(head_art.file("head.pt"), "stego", ck.n_clusters, config,
              {"in_dim": ck.in_dim, "code_dim": ck.code_dim, "head": ck.head_state,
               "cluster": {"centroids": ck.centroids}})
    part = None
    if ck.linear_state is not None:
        pparams = {"n_classes": ck.n_classes, "imported": source}
        pupstream = {"head": hkey, "features": "imported"}
        pkey = artifact_key("linear-probe", PROBE_VERSION, pparams, pupstream)
        part = store.begin("linear-probe", pkey, version=PROBE_VERSION, params=pparams, upstream=pupstream,
                           dataset=ck.dataset, split="imported", imported_from=info["imported_from"])
        import torch

        torch.save(ck.linear_state, part.file("probe.pt"))
        store.finish(part, n_classes=ck.n_classes, code_dim=ck.code_dim)
    store.finish(head_art, steps=ck.global_step, n_classes_dataset=ck.n_classes, projection=ck.projection,
                 reference_config=ck.hparams, linear_probe=part.key if part else None)
    # the backbone artifact is finished last: it names the head, so a complete one means a complete import
    store.finish(bart, weights=str(weights), backbone_fingerprint=fingerprint, head_key=hkey)
    out = Imported(ck.backbone, weights, hkey, head_art.file("head.pt"), part.key if part else None,
                   part.file("probe.pt") if part else None, bkey, False)
    _record(storage, ck.sha256, out)
    return out


def _record(storage: str | Path, sha: str, out: Imported) -> None:
    """A run record naming the imported keys, as flow runs leave (``usseg storage gc --unreferenced`` keeps
    what a record names); one per checkpoint, rewritten by a re-import."""
    from orchestration.publish import runs_folder
    from usseg_core.store import atomic_write_json, now_iso

    run_id = f"import-stego-{sha[:16]}"
    keys = [k for k in (out.backbone_key, out.head_key, out.probe_key) if k]
    atomic_write_json(runs_folder(storage) / f"{run_id}.json", {"flow": "import-stego", "flow_run_id": run_id,
                                                                "created": now_iso(), "storage": str(storage),
                                                                "keys": keys})


import_app = typer.Typer(no_args_is_help=True, help="Import checkpoints of reference implementations.")


@import_app.command("stego")
def stego_command(
    ckpt: Path = typer.Argument(..., help="STEGO PyTorch-Lightning checkpoint (.ckpt), e.g. "
                                          "cocostuff27_vit_base_5.ckpt."),
    name: Optional[str] = typer.Option(None, "--name", help="A name recorded in the metadata (default: file stem)."),
    storage: Optional[str] = StorageOpt,
) -> None:
    """Write the checkpoint's DINO ViT as a --weights file and its head + probes as store artifacts."""
    try:
        out = import_stego(ckpt, storage_root(storage), name)
    except UssegError as exc:
        fail(exc)
    typer.echo(("cache hit: " if out.cache_hit else "imported: ") + str(ckpt))
    typer.echo(f"backbone weights: {out.weights}")
    typer.echo(f"  use: usseg run stego --backbone {out.backbone} --weights {out.weights} ...")
    typer.echo(f"head artifact: {out.head_key}  (usseg segment --model {out.head_key} IMAGES --out DIR)")
    if out.probe_key:
        typer.echo(f"linear probe artifact: {out.probe_key}  ({out.probe_path})")


def evaluate_command(
    model: str = typer.Option(..., "--model", help="Head artifact key, trained or imported (see `usseg storage "
                                                   "ls --stage head`); a unique prefix is enough."),
    dataset: str = typer.Option(..., help="Dataset registry name (its class count must be the head's)."),
    data_root: Optional[Path] = typer.Option(
        None, "--data-root", help="Dataset root folder (default: $USSEG_DATA_ROOT/<dataset folder>)."),
    eval_split: str = typer.Option(spec_default(EvaluateModelSpec, "eval_split"), help="Labelled split to evaluate on."),
    run_crf: bool = CrfOpt,
    eval_resolution: Optional[int] = EvalResolutionOpt,
    device: str = typer.Option(spec_default(EvaluateModelSpec, "device"),
                               help="auto | cpu | cuda[:i]: where the backbone and head run."),
    results: Optional[Path] = typer.Option(None, help="Write the results table as CSV here."),
    task_runner: str = RunnerOpt,
    storage: Optional[str] = StorageOpt,
) -> None:
    """Evaluate an existing head artifact (flow `evaluate-model`): its own clusterer, its linear probe and
    k-means when the store has them, CRF on/off, under the dataset's evaluation protocol and with the head's
    own backbone. Nothing is trained."""
    from commands.launch import run_command
    from commands.run import print_results, write_results_csv

    def check(spec: EvaluateModelSpec) -> None:
        from flows.evaluate_model import check_model  # Prefect: only when the command is not answered

        for note in check_model(spec)["notes"]:
            typer.echo(note)

    try:  # a bad key or a class-count mismatch: one line, before any flow run or server starts
        fields = dict(model=model, dataset=dataset, data_root=path_or_none(data_root),
                      eval_split=eval_split, storage=str(storage_root(storage)), run_crf=run_crf,
                      eval_resolution=eval_resolution, device=device, task_runner=task_runner)
        _, out = run_command("flows.evaluate_model:evaluate_model", EvaluateModelSpec, fields,
                             say=lambda line: print(line, flush=True), check=check)
    except UssegError as exc:
        fail(exc)
    ev = out["evaluation"]
    print_results(ev["rows"], f"{out['head']['method']} head {out['head']['key']} on {dataset}/{eval_split}")
    typer.echo(f"evaluation artifact: {ev['path']}")
    if results:
        write_results_csv(ev["rows"], results)
        typer.echo(f"results written to {results}")


def register(app: typer.Typer) -> None:
    app.add_typer(import_app, name="import")
    app.command("evaluate")(evaluate_command)
