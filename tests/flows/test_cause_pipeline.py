"""`usseg run cause-mlp` and `usseg run cause-tr` end to end on the synthetic scenes: five-crop features ->
concept clusterbook (one artifact for both variants) -> head -> the shared evaluation with the head's own
cluster probe; `usseg storage show` of the clusterbook prints its size and the modularity reached."""
from __future__ import annotations

import json

import pandas as pd
from typer.testing import CliRunner

from commands.cli import app
from tests.conftest import artifact_mtimes

SETS = ("clusterbook.concepts=16", "clusterbook.batch_size=4", "clusterbook.grid=2", "cause.batch_size=4",
        "cause.projection_dim=32", "cause.epochs=2", "cause.grid=2", "cause.tr_hidden=64")


def _run(head: str, data, storage, results):
    args = ["run", head, "--dataset", "synthetic", "--data-root", str(data), "--resolution", "64",
            "--storage", str(storage), "--results", str(results), "--no-crf",
            *(a for s in SETS for a in ("--set", s))]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    return pd.read_csv(results)


def test_run_both_cause_variants_share_one_clusterbook(synthetic_small, tmp_path, prefect_harness):
    from tasks.stage import CALLED, CHECKED

    storage = tmp_path / "storage"
    CALLED.discard("clusterbook")
    mlp = _run("cause-mlp", synthetic_small, storage, tmp_path / "mlp.csv")
    assert {("cause-mlp", "cluster-probe"), ("cause-mlp", "kmeans"), ("cause-mlp", "linear"),
            ("raw-features", "kmeans")} == set(zip(mlp.method, mlp.clusterer))
    assert (mlp[mlp.method == "cause-mlp"].accuracy > 20).all()  # 5 classes: above chance
    assert "clusterbook" in CALLED and ("clusterbook", "settings") in CHECKED  # its core call was key-checked

    (book,) = list((storage / "clusterbook").iterdir())
    meta = json.loads((book / "meta.json").read_text())
    assert meta["concepts"] == 16 and meta["dim"] > 0 and meta["params"]["grid"] == 2
    assert 0.0 < meta["modularity"] < 1.0 and (book / "concepts.png").stat().st_size > 0
    (head,) = list((storage / "head").iterdir())
    head_meta = json.loads((head / "meta.json").read_text())
    assert head_meta["upstream"]["clusterbook"] == book.name and head_meta["method"] == "cause-mlp"

    before = artifact_mtimes(storage)
    tr = _run("cause-tr", synthetic_small, storage, tmp_path / "tr.csv")
    assert ("cause-tr", "cluster-probe") in set(zip(tr.method, tr.clusterer))
    assert len(list((storage / "clusterbook").iterdir())) == 1  # the MLP's book, found by key
    assert artifact_mtimes(storage)[book / "meta.json"] == before[book / "meta.json"]

    shown = CliRunner().invoke(app, ["storage", "show", book.name, "--storage", str(storage)])
    assert shown.exit_code == 0 and '"modularity"' in shown.output and "concepts.png" in shown.output
