"""The issue's one table on CamVid (slow): `usseg compare` of every head, CAUSE-MLP and CAUSE-TR beside STEGO,
OMH, PiCIE, HSG and raw-feature k-means, over two seeds, with and without the CRF.

Train on the train + val images (labels unused), evaluate on val at full frame, EfficientNet-Lite0, every head
at its ``camvid11`` preset (docs/methods/*.md). Skipped without ``../shared/data/camvid``. Knobs:
``USSEG_CAMVID_STORAGE`` (a storage to keep and re-use; docs/results.md used ``/work/camvid_storage``),
``USSEG_CAMVID_SEEDS`` (default ``0,1``), ``USSEG_CAMVID_HEADS`` (default every built-in head). Cold on
2 CPU cores the six heads take four to five hours: trainings of 3 (CAUSE-MLP) to ~11 min (PiCIE, HSG) per
seed, CAUSE-TR's k-means on its decoder's codes ~13 min per seed, and 12 evaluations of 10-15 min each
(docs/results.md, "CAUSE beside the other heads"); the session that wrote it ran
``USSEG_CAMVID_HEADS=stego,cause-mlp,cause-tr``.

What it checks is what docs/results.md reports: one clusterbook shared by both CAUSE variants and every seed,
every predictor row of every head for each seed with and without the CRF, each head's training time in the
report, CAUSE's linear probes far above raw k-means (labels buy a margin), and the measured shortfall: neither
CAUSE variant's best unsupervised row reaches raw-feature k-means without CRF, the issue's floor. That check
is a strict xfail: when a change lifts CAUSE above the floor it fails, and the results page must be updated.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from commands.cli import app
from tests.conftest import shared_path
from usseg_core.head_names import BUILTIN_HEAD_CARDS
from usseg_core.heads import get_head

pytestmark = pytest.mark.slow

SEEDS = [int(s) for s in os.environ.get("USSEG_CAMVID_SEEDS", "0,1").split(",")]
HEADS = os.environ.get("USSEG_CAMVID_HEADS", ",".join(BUILTIN_HEAD_CARDS)).split(",")
CAUSE = [h for h in HEADS if h.startswith("cause-")]


@pytest.fixture(scope="module")
def one_table(tmp_path_factory, prefect_harness) -> tuple[Path, Path]:
    keep = os.environ.get("USSEG_CAMVID_STORAGE")
    storage = Path(keep) if keep else tmp_path_factory.mktemp("camvid-storage")
    root = shared_path("data", "camvid")
    args = ["compare", "--dataset", "camvid11", "--data-root", str(root), "--train-split", "train,val",
            "--eval-split", "val", "--storage", str(storage), "--seeds", ",".join(map(str, SEEDS)),
            "--heads", ",".join(HEADS)]
    res = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output + repr(res.exception)
    print(res.output)
    folder = Path(next(line.split("report: ")[1] for line in res.output.splitlines() if "report: " in line)).parent
    return storage, folder


def _mean(rows: pd.DataFrame, method: str, clusterer: str, crf: bool) -> float:
    sel = rows[(rows.method == method) & (rows.clusterer == clusterer) & (rows.crf == crf)]
    assert len(sel) == len(SEEDS), (method, clusterer, crf, len(sel))
    return float(sel.miou.mean())


def _raw_floor(rows: pd.DataFrame) -> float:
    raw = rows[(rows.method.str.startswith("raw")) & (rows.clusterer == "kmeans") & ~rows.crf]
    return float(raw.groupby("method").miou.mean().max())


def test_every_head_every_seed_every_row(one_table):
    _, folder = one_table
    rows = pd.read_csv(folder / "rows.csv")
    for head in HEADS:
        own = get_head(head).clusterer  # its own clusterer's row name (None: HSG has none)
        for crf in (False, True):
            for clusterer in [c for c in (own, "kmeans", "linear") if c]:
                assert 0 < _mean(rows, head, clusterer, crf) <= 100, (head, clusterer, crf)
    runs = json.loads((folder / "runs.json").read_text())
    assert {(r["head"], r["seed"]) for r in runs} == {(h, s) for h in HEADS for s in SEEDS}
    assert all(r.get("train_seconds") for r in runs), [r["head"] for r in runs if not r.get("train_seconds")]
    assert "training wall s" in (folder / "report.md").read_text()


@pytest.mark.skipif(not CAUSE, reason="no CAUSE head in USSEG_CAMVID_HEADS")
def test_cause_one_clusterbook_and_the_linear_margin(one_table):
    storage, folder = one_table
    rows = pd.read_csv(folder / "rows.csv")
    books = [p for p in (storage / "clusterbook").iterdir() if (p / "_COMPLETE").exists()]
    metas = [json.loads((h / "meta.json").read_text()) for h in (storage / "head").iterdir()
             if (h / "meta.json").exists()]
    used = {m["upstream"]["clusterbook"] for m in metas if "clusterbook" in m.get("upstream", {})}
    assert len(used) == 1 and used <= {b.name for b in books}  # both variants and every seed: one book
    for head in CAUSE:
        assert _mean(rows, head, "linear", False) > _raw_floor(rows) + 5  # labels buy a clear margin


@pytest.mark.skipif(not CAUSE, reason="no CAUSE head in USSEG_CAMVID_HEADS")
@pytest.mark.xfail(strict=True, reason="measured: CAUSE's best unsupervised row is below raw-feature k-means "
                                       "on CamVid (docs/results.md, CAUSE beside the other heads)")
def test_cause_reaches_the_raw_kmeans_floor(one_table):
    _, folder = one_table
    rows = pd.read_csv(folder / "rows.csv")
    best = max(_mean(rows, h, c, False) for h in CAUSE for c in (get_head(h).clusterer, "kmeans"))
    assert best >= _raw_floor(rows)
