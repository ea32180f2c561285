"""`usseg run cause-tr` end to end on the synthetic scenes: five-crop features -> concept clusterbook -> head
-> the shared evaluation with the head's own cluster probe; `usseg storage show` of the clusterbook prints its
size and the modularity reached; the book's settings are the same for both variants and every seed."""
from __future__ import annotations

import json

import pandas as pd
from typer.testing import CliRunner

from commands.cli import app

SETS = ("clusterbook.concepts=16", "clusterbook.batch_size=4", "clusterbook.grid=2", "cause.batch_size=4",
        "cause.projection_dim=32", "cause.epochs=2", "cause.grid=2", "cause.tr_hidden=64")


def _run(head: str, data, storage, results):
    args = ["run", head, "--dataset", "synthetic", "--data-root", str(data), "--resolution", "64",
            "--storage", str(storage), "--results", str(results), "--no-crf",
            *(a for s in SETS for a in ("--set", s))]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    return pd.read_csv(results)


def test_run_cause_tr_end_to_end_and_the_clusterbook_is_shared(synthetic_small, tmp_path, prefect_harness):
    """One `usseg run` (CAUSE-TR: its decoder also meets another token grid at evaluation than in
    training); CAUSE-MLP's path from the same cached inputs is tests/core/test_cause.py's."""
    from tasks.stage import CALLED, CHECKED
    from usseg_core.heads import get_head

    storage = tmp_path / "storage"
    CALLED.discard("clusterbook")
    tr = _run("cause-tr", synthetic_small, storage, tmp_path / "tr.csv")
    assert {("cause-tr", "cluster-probe"), ("cause-tr", "kmeans"), ("cause-tr", "linear"),
            ("raw-features", "kmeans")} == set(zip(tr.method, tr.clusterer))
    assert (tr[tr.method == "cause-tr"].accuracy > 20).all()  # 5 classes: above chance
    assert "clusterbook" in CALLED and ("clusterbook", "settings") in CHECKED  # its core call was key-checked

    (book,) = list((storage / "clusterbook").iterdir())
    meta = json.loads((book / "meta.json").read_text())
    assert meta["concepts"] == 16 and meta["dim"] > 0 and meta["params"]["grid"] == 2
    assert 0.0 < meta["modularity"] < 1.0 and (book / "concepts.png").stat().st_size > 0
    (head,) = list((storage / "head").iterdir())
    head_meta = json.loads((head / "meta.json").read_text())
    assert head_meta["upstream"]["clusterbook"] == book.name and head_meta["method"] == "cause-tr"
    assert head_meta["front_steps"] == 2 * 10 and head_meta["probe_steps"] == 5 * 10  # 40 crops / 4; TR: 5 epochs

    # the book's key is its section and the features only: both variants and every seed share it
    from usseg_core.config import parse_set_options

    sets = parse_set_options(list(SETS))
    books = [get_head(h).config("synthetic", {**sets, "cause.seed": seed})["clusterbook"]
             for h in ("cause-mlp", "cause-tr") for seed in (0, 1)]
    assert all(b.fit_params() == books[0].fit_params() for b in books)

    shown = CliRunner().invoke(app, ["storage", "show", book.name, "--storage", str(storage)])
    assert shown.exit_code == 0 and '"modularity"' in shown.output and "concepts.png" in shown.output
