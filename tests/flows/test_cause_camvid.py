"""CAUSE on CamVid (slow): `usseg compare --heads cause-mlp` over two seeds beside raw-feature k-means.

Train on the train + val images (labels unused), evaluate on val at full frame, EfficientNet-Lite0, CRF on,
the ``camvid11`` preset (docs/methods/cause.md). Skipped without ``../shared/data/camvid``. Knobs:
``USSEG_CAMVID_STORAGE`` (a storage to keep and re-use; docs/results.md used ``/work/camvid_storage``),
``USSEG_CAMVID_SEEDS`` (default ``0,1``). CAUSE-TR is not in this test: on 2 CPU cores its evaluation alone
(the decoder over the 2340 training five-crops for k-means on codes) takes about an hour per seed.

What it checks is what docs/results.md ("CAUSE on CamVid") reports: one clusterbook for both seeds, every
predictor row for each seed, CAUSE's linear probe far above raw k-means (labels buy a margin), and the
measured shortfall: CAUSE-MLP's best unsupervised row does NOT reach raw-feature k-means without CRF, the
issue's floor. That last check is a strict xfail: when a change lifts CAUSE above the floor it fails, and
the results page must be updated.
"""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from commands.cli import app
from tests.conftest import shared_path

pytestmark = pytest.mark.slow

SEEDS = [int(s) for s in os.environ.get("USSEG_CAMVID_SEEDS", "0,1").split(",")]


@pytest.fixture(scope="module")
def cause_compare(tmp_path_factory, prefect_harness) -> tuple[Path, Path]:
    keep = os.environ.get("USSEG_CAMVID_STORAGE")
    storage = Path(keep) if keep else tmp_path_factory.mktemp("camvid-storage")
    root = shared_path("data", "camvid")
    args = ["compare", "--dataset", "camvid11", "--data-root", str(root), "--train-split", "train,val",
            "--eval-split", "val", "--storage", str(storage), "--seeds", ",".join(map(str, SEEDS)),
            "--heads", "cause-mlp"]
    res = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output + repr(res.exception)
    print(res.output)
    folder = Path(next(line.split("report: ")[1] for line in res.output.splitlines() if "report: " in line)).parent
    return storage, folder


def _mean(rows: pd.DataFrame, method: str, clusterer: str, crf: bool) -> float:
    sel = rows[(rows.method == method) & (rows.clusterer == clusterer) & (rows.crf == crf)]
    assert len(sel) == len(SEEDS), (method, clusterer, crf, len(sel))
    return float(sel.miou.mean())


def test_cause_mlp_rows_one_clusterbook_and_the_linear_margin(cause_compare):
    storage, folder = cause_compare
    rows = pd.read_csv(folder / "rows.csv")
    for crf in (False, True):
        for clusterer in ("cluster-probe", "kmeans", "linear"):
            assert 0 < _mean(rows, "cause-mlp", clusterer, crf) <= 100
    books = [p for p in (storage / "clusterbook").iterdir() if (p / "_COMPLETE").exists()]
    heads = [p for p in (storage / "head").iterdir() if "cause-mlp" in (p / "meta.json").read_text()]
    used = {__import__("json").loads((h / "meta.json").read_text())["upstream"]["clusterbook"] for h in heads}
    assert len(used) == 1 and used <= {b.name for b in books}  # every seed trained on the same book
    raw = rows[(rows.method.str.startswith("raw")) & (rows.clusterer == "kmeans") & ~rows.crf].miou.max()
    assert _mean(rows, "cause-mlp", "linear", False) > raw + 5  # labels buy a clear margin


@pytest.mark.xfail(strict=True, reason="measured: CAUSE-MLP's best unsupervised row is below raw-feature k-means "
                                       "on CamVid (docs/results.md, CAUSE on CamVid)")
def test_cause_mlp_reaches_the_raw_kmeans_floor(cause_compare):
    _, folder = cause_compare
    rows = pd.read_csv(folder / "rows.csv")
    raw = rows[(rows.method.str.startswith("raw")) & (rows.clusterer == "kmeans") & ~rows.crf]
    best = max(_mean(rows, "cause-mlp", c, False) for c in ("cluster-probe", "kmeans"))
    assert best >= raw.groupby("method").miou.mean().max()
