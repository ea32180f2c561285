"""The artifact keys of one fixed synthetic run, pinned.

A refactoring that changes a key (a parameter renamed, a default moved, an upstream entry added) silently
orphans every cached artifact of that stage and of every stage below it. A key that changes on purpose gets
its stage's version bumped, with the reason in the version constant's comment, and is re-pinned here.

The run goes through the command line only (its options are the stable surface): `usseg compare` of STEGO
(five-crops + KNN), PiCIE (view bank) and HSG (view bank + oversegmentation), one seed, with retrieval
rows; then `usseg run stego` and `usseg extract` on the same cache. Lengths are tiny: a key depends on
parameters and upstream keys only, never on what training computed. About 40 s on 2 cores.

Not pinned: the manifest's own key, which covers the data folder's absolute path and the files' mtimes (so
a moved or re-rendered dataset gets a new manifest folder). Every downstream key takes the manifest's
content hash instead, which is pinned (:data:`MANIFEST_HASHES`).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from usseg_core.store import ArtifactStore

HEADS = "stego,picie,hsg"
SETS = ("stego.steps=4", "stego.batch_size=4", "picie.epochs=1", "picie.batch_size=4", "hsg.epochs=1",
        "hsg.batch_size=4", "hsg.anchors_per_view=16", "views.n_views=2")
COMMON = ("--dataset", "synthetic", "--resolution", "64", "--no-crf")

# Stages upstream first: on a mismatch the first stage listed is the likely cause, the rest follow from it.
STAGE_ORDER = ("manifest", "features", "views", "oversegment", "knn", "head", "kmeans", "linear-probe",
               "segment-memory", "evaluation", "compare")

# Content hash of each split's manifest (usseg_core.datasets.manifest.Manifest.hash) of the synthetic scenes.
MANIFEST_HASHES = {
    "train": "841e399c9f48f88d12784b1c01d70a665e4858cafc69f5c1ba29ae440b7679f8",
    "val": "7ec54eeb7f380f3f8617780dd44383271bbcce6ca804d2d57bbcb4be2de275b7",
}

# command -> artifact label (stage/what, see `label`) -> key; only the artifacts that command added.
# Pinned from commit 4e45b9c, before the redesign of flows/ and the command line; re-pinned when the
# features and views stages went to version 2 (crc32c in every Zarr chunk, every chunk written: the
# on-disk format changed, and version-1 stores cannot be checked), which moves every key below them; and
# again at version 3 (dense maps in shards of S items: another on-disk layout).
PINNED = {
    "compare": {
        "features/train/five_crop@64": "b967294761a665ba",
        "features/train/full@64x64": "cda3b8126f6c4445",
        "features/train/full@96x128": "92bb279472e9d316",
        "features/val/full+flip@96x128": "85445f6f3515bc96",
        "features/val/full@96x128": "af8a774819143b73",
        "views/train/full@64x64": "2c97e8446d6f1f3d",
        "oversegment/train": "eab98f1188b5bb9e",
        "knn/train/five_crop@64": "f5d22e9168a5d54d",
        "head/hsg": "40f88cec44abdfd2",
        "head/picie": "d30828d106956570",
        "head/stego": "e62c83f7ca9bb9de",
        "kmeans/hsg/train/full@64x64": "ac0883f024a3a5d1",
        "kmeans/picie/train/full@64x64": "68cd049fdfaf53df",
        "kmeans/raw/train/five_crop@64": "0309525b6ddece6c",
        "kmeans/raw/train/full@64x64": "c34255da024186d7",
        "kmeans/stego/train/five_crop@64": "2bdeb1eb7112b4b7",
        "linear-probe/hsg/train/full@96x128": "d42923c017af6c6e",
        "linear-probe/picie/train/full@96x128": "56bf7af300b80b1a",
        "linear-probe/stego/train/full@96x128": "a075e8ca68880d70",
        "segment-memory/hsg/train/full@96x128": "b0590ece014cd3ad",
        "segment-memory/picie/train/full@96x128": "932ffc47825ced8f",
        "segment-memory/raw/train/full@96x128": "1f31cd458b129a34",
        "segment-memory/stego/train/full@96x128": "e5b1035109eb0fd1",
        "evaluation/hsg": "b81e9170451ed190",
        "evaluation/picie": "2df5773912f996df",
        "evaluation/stego": "dbd266ac3b1f3c06",
        "compare/stego,picie,hsg": "cd80d46819a870a9",
    },
    # the same head (`steps=4` is `stego.steps=4`, seed 0 is the default) and k-means: only the evaluation
    # is new (no retrieval rows)
    "run stego": {
        "evaluation/stego": "b61dd9d1be8d11ea",
    },
    "extract": {
        "features/val/center_crop@64": "d30813ed85880dc8",
    },
}


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    """The run's own synthetic scenes (not the shared fixture's: a change there must not move these keys)."""
    from usseg_core.datasets.synthetic import ensure_synthetic

    return ensure_synthetic(tmp_path_factory.mktemp("keys") / "synthetic", n_train=8, n_val=3, height=96,
                            width=128)


def _invoke(*args: str) -> None:
    from commands.cli import app

    res = CliRunner().invoke(app, list(args))
    assert res.exit_code == 0, f"usseg {' '.join(args)}\n{res.output}{res.exception!r}"


def _view_label(meta: dict) -> str:
    view = meta["params"]["view"]
    flip = "+flip" if view.get("flip") else ""
    size = "x".join(map(str, view["size"])) if view.get("size") else view["resolution"]
    return f"{meta['split']}/{view['policy']}{flip}@{size}"


def label(art, heads: dict[str, str], views: dict[str, str]) -> str:
    """What an artifact is, in words that do not depend on any key: stage/split/view/head."""
    meta, up, stage = art.meta, art.meta.get("upstream", {}), art.stage
    if stage in ("manifest", "oversegment"):
        return f"{stage}/{meta['split']}"
    if stage in ("features", "views"):
        return f"{stage}/{_view_label(meta)}"
    if stage == "head":
        return f"head/{meta['params']['method']}"
    if stage == "knn":
        return "knn/" + "+".join(views[up[k]] for k in sorted(up))
    if stage in ("kmeans", "linear-probe", "segment-memory"):
        on = "+".join(views[up[k]] for k in sorted(up) if k.startswith("features"))
        return f"{stage}/{heads.get(up['head'], 'raw')}/{on}"
    if stage == "evaluation":
        return "evaluation/" + next(g["method"] for g in meta["params"]["groups"] if g["method"] != "raw-features")
    if stage == "compare":
        return "compare/" + ",".join(meta["params"]["heads"])
    raise AssertionError(f"stage {stage!r} has no label in {__name__}: add one, and pin its key")


def collect(storage: Path, seen: set[str]) -> dict[str, str]:
    """label -> key of every complete artifact whose key is not in ``seen`` (they are added to it)."""
    arts = [a for a in ArtifactStore(storage).iter_artifacts() if a.complete]
    heads = {a.key: a.meta["params"]["method"] for a in arts if a.stage == "head"}
    views = {a.key: _view_label(a.meta) for a in arts if a.stage in ("features", "views")}
    keys: dict[str, str] = {}
    for a in arts:
        if a.key in seen or a.stage == "manifest":  # the manifest's key covers the path: see the docstring
            continue
        name = label(a, heads, views)
        assert name not in keys, f"two artifacts are labelled {name!r} ({keys[name]}, {a.key}): refine `label`"
        keys[name] = a.key
    seen.update(keys.values())
    return keys


def key_changes(command: str, found: dict[str, str]) -> list[str]:
    """One line per changed, missing or new artifact of ``command``, upstream stages first."""
    pinned = PINNED[command]
    order = {s: i for i, s in enumerate(STAGE_ORDER)}
    lines = []
    for name in sorted(set(pinned) | set(found), key=lambda n: (order.get(n.split("/")[0], 99), n)):
        stage = name.split("/")[0]
        was, now = pinned.get(name), found.get(name)
        if was == now:
            continue
        if was is None:
            lines.append(f"`usseg {command}` made a new artifact {name} ({now}): pin it in PINNED")
        elif now is None:
            lines.append(f"`usseg {command}` no longer makes {name} (pinned {was})")
        else:
            lines.append(f"`usseg {command}`: the key of stage '{stage}' ({name}) changed {was} -> {now}; "
                         f"every cached '{stage}' artifact and all below it are orphaned. If meant, bump the "
                         f"'{stage}' stage's version, document why beside it, and re-pin here; if not, restore it")
    return lines


@pytest.mark.timeout(300)  # about 40 s on 2 cores
def test_artifact_keys_of_a_fixed_synthetic_run_are_pinned(scenes, tmp_path, monkeypatch, prefect_harness):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # "auto" precision is bf16 on CUDA: another key
    storage = tmp_path / "storage"
    base = (*COMMON, "--data-root", str(scenes), "--storage", str(storage))
    seen: set[str] = set()
    found = {}
    _invoke("compare", *base, "--heads", HEADS, "--seeds", "0", "--retrieval", *(a for s in SETS for a in ("--set", s)))
    found["compare"] = collect(storage, seen)
    _invoke("run", "stego", *base, "--set", "steps=4", "--set", "batch_size=4")
    found["run stego"] = collect(storage, seen)
    _invoke("extract", "--dataset", "synthetic", "--data-root", str(scenes), "--split", "val", "--policy",
            "center_crop", "--resolution", "64", "--storage", str(storage))
    found["extract"] = collect(storage, seen)

    hashes = {a.meta["split"]: a.meta["manifest_hash"] for a in ArtifactStore(storage).iter_artifacts("manifest")}
    assert hashes == MANIFEST_HASHES, (
        "the synthetic scenes' manifest hashes changed (the renderer, PNG encoding or Manifest.hash): every key "
        f"below changes with them; found {hashes}")
    changes = [line for command in PINNED for line in key_changes(command, found[command])]
    assert not changes, "\n".join(changes)
