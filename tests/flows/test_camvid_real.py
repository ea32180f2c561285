"""Real-data runs on CamVid (slow): `usseg run stego`, `omh` and `picie`, EfficientNet-Lite0, CRF on.

Train on the train + val images (labels unused), evaluate on val at full frame — the protocol of issue 3.
Skipped without ``../shared/data/camvid``. Knobs (environment):

* ``USSEG_CAMVID_STEPS`` — head training steps (default 1500; the reference's 5000 takes ~30 min per
  run on 2 CPU cores),
* ``USSEG_CAMVID_SEEDS`` — comma-separated training seeds for STEGO (default ``0,1``: the issue's target
  is an average over two seeds),
* ``USSEG_CAMVID_PICIE_EPOCHS`` — PiCIE epochs (default 10, the paper's),
* ``USSEG_CAMVID_HSG_EPOCHS`` — HSG epochs (default 10, ``HsgConfig``'s),
* ``USSEG_CAMVID_STORAGE`` — a storage root to keep (and re-use) the cached features between runs,
* ``USSEG_CAMVID_RESULTS`` — a folder where each run's results CSV is written for the report.

The assertions check what must hold on any honest run: every predictor row with and without CRF, scores
in range, labels buying a clear margin (the linear probe above the cluster probe on the same codes and above
raw k-means), clusterers far above chance, CRF not hurting raw k-means accuracy. The margins are printed and asserted at
what the README's CamVid numbers support: STEGO's cluster probe above raw k-means on the mean of the seeds
(+1.4 mIoU measured), STEGO above OMH, PiCIE above its raw k-means and above STEGO in accuracy.
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

STEPS = int(os.environ.get("USSEG_CAMVID_STEPS", "1500"))
SEEDS = [int(s) for s in os.environ.get("USSEG_CAMVID_SEEDS", "0,1").split(",")]
PICIE_EPOCHS = int(os.environ.get("USSEG_CAMVID_PICIE_EPOCHS", "10"))  # the paper's 10
HSG_EPOCHS = int(os.environ.get("USSEG_CAMVID_HSG_EPOCHS", "10"))  # HsgConfig's default


@pytest.fixture(scope="module")
def camvid_storage(tmp_path_factory) -> Path:
    keep = os.environ.get("USSEG_CAMVID_STORAGE")
    return Path(keep) if keep else tmp_path_factory.mktemp("camvid-storage")


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory) -> Path:
    keep = os.environ.get("USSEG_CAMVID_RESULTS")
    out = Path(keep) if keep else tmp_path_factory.mktemp("camvid-results")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _run(method: str, seed: int, storage: Path, results: Path) -> pd.DataFrame:
    root = shared_path("data", "camvid")
    length = {"picie": f"epochs={PICIE_EPOCHS}", "hsg": f"epochs={HSG_EPOCHS}"}.get(method, f"steps={STEPS}")
    args = ["run", method, "--dataset", "camvid11", "--data-root", str(root), "--train-split", "train,val",
            "--eval-split", "val", "--storage", str(storage), "--results", str(results),
            "--set", length, "--set", f"seed={seed}"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    print(res.output)
    return pd.read_csv(results)


def _score(df: pd.DataFrame, method: str, clusterer: str, crf: bool) -> pd.Series:
    rows = df[(df.method == method) & (df.clusterer == clusterer) & (df.crf == crf)]
    assert len(rows) == 1, f"expected one row for {method}/{clusterer}/crf={crf}, got {len(rows)}"
    return rows.iloc[0]


def _check_common(df: pd.DataFrame, method: str, own: str = "cluster-probe") -> None:
    assert ((df.accuracy >= 0) & (df.accuracy <= 100) & (df.miou >= 0) & (df.miou <= 100)).all()
    for crf in (False, True):
        for clusterer in (own, "kmeans", "linear"):
            _score(df, method, clusterer, crf)
        _score(df, "raw-features", "kmeans", crf)
    raw = _score(df, "raw-features", "kmeans", False)
    probe = _score(df, method, own, False)
    linear = _score(df, method, "linear", False)
    # 11 classes: chance mIoU is a few percent; both clusterers must find the large classes
    assert raw.miou > 20 and probe.miou > 20, (raw.miou, probe.miou)
    # labels buy a clear margin: the supervised probe on the codes beats the unsupervised one on the same
    # codes, and k-means on the raw features (OMH's codes keep less linear information than STEGO's: its
    # linear probe is ~40 mIoU against ~51, README)
    assert linear.miou > probe.miou + 5 and linear.miou > raw.miou, (linear.miou, raw.miou, probe.miou)
    assert _score(df, "raw-features", "kmeans", True).accuracy >= raw.accuracy


def test_camvid_stego_two_seeds(camvid_storage, results_dir, prefect_harness):
    margins = []
    for seed in SEEDS:
        df = _run("stego", seed, camvid_storage, results_dir / f"stego_seed{seed}.csv")
        _check_common(df, "stego")
        margins.append(_score(df, "stego", "cluster-probe", False).miou
                       - _score(df, "raw-features", "kmeans", False).miou)
    print(f"STEGO cluster probe − raw k-means, mIoU, per seed: {margins}; mean {sum(margins) / len(margins):.2f}")
    # README (CamVid): +1.4 mIoU on average over the two seeds (+1.92 / +0.96); a seed moves k-means by a
    # point or so, so the claim asserted is the sign of the mean, with no seed more than 2 points below it
    assert sum(margins) / len(margins) > 0, margins
    assert min(margins) > -2, margins


def test_camvid_omh_vs_stego_same_seed(camvid_storage, results_dir, prefect_harness):
    seed = SEEDS[0]
    stego = _run("stego", seed, camvid_storage, results_dir / f"stego_seed{seed}.csv")  # a cache hit after the test above
    omh = _run("omh", seed, camvid_storage, results_dir / f"omh_seed{seed}.csv")
    _check_common(omh, "omh")
    # same features, same raw-feature baseline: the k-means row is one cached artifact for both
    pd.testing.assert_series_equal(_score(stego, "raw-features", "kmeans", False),
                                   _score(omh, "raw-features", "kmeans", False), check_names=False)
    for crf in (False, True):
        s, o = _score(stego, "stego", "cluster-probe", crf), _score(omh, "omh", "cluster-probe", crf)
        print(f"crf={crf}: STEGO {s.miou:.2f} mIoU / {s.accuracy:.2f} acc; OMH {o.miou:.2f} / {o.accuracy:.2f}")
        # README: OMH's hierarchy costs 5.7 mIoU (6.6 with CRF) against STEGO alone on this data
        assert s.miou > o.miou + 2, (crf, s.miou, o.miou)


def test_camvid_picie_two_seeds_against_raw_kmeans_and_stego(camvid_storage, results_dir, prefect_harness):
    """PiCIE on the view bank of the same images; its own raw-feature k-means row (un-augmented frames) is
    the floor the issue sets. Margins are printed and asserted; STEGO is read from the runs above (cache hits)."""
    lines, checks = [], []
    for seed in SEEDS:
        df = _run("picie", seed, camvid_storage, results_dir / f"picie_seed{seed}.csv")
        _check_common(df, "picie", own="centroids")
        stego = _run("stego", seed, camvid_storage, results_dir / f"stego_seed{seed}.csv")
        for crf in (False, True):
            p, r = _score(df, "picie", "centroids", crf), _score(df, "raw-features", "kmeans", crf)
            s = _score(stego, "stego", "cluster-probe", crf)
            lines.append(f"seed {seed} crf={crf}: PiCIE {p.accuracy:.2f} / {p.miou:.2f}, raw k-means "
                         f"{r.accuracy:.2f} / {r.miou:.2f}, STEGO {s.accuracy:.2f} / {s.miou:.2f} (acc / mIoU)")
            checks.append((seed, crf, p, r, s))
    print("\n".join(lines))
    for seed, crf, p, r, s in checks:
        # README: PiCIE's own centroids beat the raw k-means of the same frames by 6.2-7.2 mIoU (no CRF /
        # CRF, both seeds) and STEGO's cluster probe by 15-18 points of accuracy; its mIoU against STEGO's
        # (+0.9 / +1.8) is within the seed spread and is not asserted
        assert p.miou > r.miou + 3, (seed, crf, p.miou, r.miou)
        assert p.accuracy > s.accuracy + 5, (seed, crf, p.accuracy, s.accuracy)


def test_camvid_hsg_two_seeds_both_protocols(camvid_storage, results_dir, prefect_harness):
    """HSG on the view bank + classical-edge UCM segments of the same images. The issue's floor is asserted
    (HSG's k-means on codes >= raw-feature k-means on the same frames, mean of the seeds, no CRF); the
    retrieval protocol's rows sit beside the same protocol on raw features, and are printed."""
    lines, margins = [], []
    for seed in SEEDS:
        df = _run("hsg", seed, camvid_storage, results_dir / f"hsg_seed{seed}.csv")
        for crf in (False, True):
            for method, clusterer in (("hsg", "kmeans"), ("hsg", "linear"), ("hsg", "retrieval-k20"),
                                      ("raw-features", "kmeans"), ("raw-features", "retrieval-k20")):
                _score(df, method, clusterer, crf)
        h, r = _score(df, "hsg", "kmeans", False), _score(df, "raw-features", "kmeans", False)
        hr, rr = _score(df, "hsg", "retrieval-k20", False), _score(df, "raw-features", "retrieval-k20", False)
        margins.append(h.miou - r.miou)
        assert hr.miou > 20 and rr.miou > 20, (hr.miou, rr.miou)  # labels transferred: far above chance
        lines.append(f"seed {seed}: HSG k-means {h.accuracy:.2f} / {h.miou:.2f}, raw k-means {r.accuracy:.2f} / "
                     f"{r.miou:.2f}; retrieval HSG {hr.accuracy:.2f} / {hr.miou:.2f}, raw {rr.accuracy:.2f} / "
                     f"{rr.miou:.2f} (acc / mIoU, no CRF)")
    print("\n".join(lines))
    assert sum(margins) / len(margins) >= 0, margins


def test_camvid_compare_every_head_over_the_seeds(camvid_storage, results_dir, prefect_harness):
    """`usseg compare` over the runs above: every head x seed is a cache hit (same keys as `usseg run`), the
    table holds every head with one row per seed behind each mean, and each run's numbers are its own
    evaluation's. The README's comparison table is this command's output."""
    root = shared_path("data", "camvid")
    args = ["compare", "--dataset", "camvid11", "--data-root", str(root), "--train-split", "train,val",
            "--eval-split", "val", "--storage", str(camvid_storage), "--seeds", ",".join(map(str, SEEDS)),
            "--heads", "stego,omh,picie,hsg",  # CAUSE's CamVid comparison is tests/flows/test_cause_camvid.py
            "--set", f"stego.steps={STEPS}", "--set", f"picie.epochs={PICIE_EPOCHS}",
            "--set", f"hsg.epochs={HSG_EPOCHS}"]
    res = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output + repr(res.exception)
    folder = Path(next(line.split("report: ")[1] for line in res.output.splitlines() if "report: " in line)).parent
    summary = pd.read_csv(folder / "summary.csv")
    assert {"stego", "omh", "picie", "hsg"} <= set(summary.method)
    assert set(summary[~summary.method.str.startswith("raw")].n) == {len(SEEDS)}
    rows = pd.read_csv(folder / "rows.csv")
    for seed in SEEDS:  # the compare's rows are the per-head runs' rows
        own = pd.read_csv(results_dir / f"picie_seed{seed}.csv")
        a = _score(own, "picie", "centroids", False)
        b = rows[(rows.method == "picie") & (rows.clusterer == "centroids") & ~rows.crf & (rows.seed == seed)]
        assert (b.miou.item(), b.accuracy.item()) == (a.miou, a.accuracy)
    (results_dir / "compare_summary.md").write_text((folder / "report.md").read_text())
    print((folder / "report.md").read_text())
