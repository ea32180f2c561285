"""`compare`: every head x seed on one cache, one protocol, one report; new seeds train only themselves."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from flows.compare import compare
from usseg_core.spec import CompareSpec, route_overrides
from commands.launch import cached_result
from tests.conftest import artifact_mtimes
from usseg_core import report
from usseg_core.catalog import lineage
from usseg_core.errors import ConfigError
from usseg_core.store import ArtifactStore

VIT = "vit_small_patch16_224.dino"
TOY = {"stego.steps": 8, "picie.epochs": 1, "picie.batch_size": 4, "views.n_views": 2}


def _compare_params(data_root: Path, storage: Path, seeds: list[int], **kw) -> dict:
    return dict(dataset="synthetic", data_root=str(data_root), heads=["stego", "picie"], seeds=seeds,
                backbone=VIT, random_weights=True, storage=str(storage), overrides=dict(TOY), resolution=32,
                run_crf=False, **kw)


def _compare(data_root: Path, storage: Path, seeds: list[int], **kw) -> dict:
    return compare(CompareSpec(**_compare_params(data_root, storage, seeds, **kw)))


# --- pure parts -------------------------------------------------------------------------------------

def test_summary_is_mean_sample_std_and_range_per_row():
    rows = [{"method": "a", "clusterer": "k", "crf": False, "accuracy": a, "miou": m, "iou_x": x, "seed": s}
            for s, (a, m, x) in enumerate([(50.0, 30.0, 10.0), (54.0, 33.0, None), (52.0, 36.0, 20.0)])]
    rows.append({"method": "b", "clusterer": "k", "crf": True, "accuracy": 70.0, "miou": 40.0, "iou_x": 5.0,
                 "seed": 0})
    a, b = report.summarise(rows)
    assert (a["n"], a["seeds"]) == (3, [0, 1, 2])
    assert a["accuracy_mean"] == pytest.approx(52.0) and a["accuracy_std"] == pytest.approx(2.0)  # ddof 1
    assert a["miou_mean"] == pytest.approx(33.0) and a["miou_std"] == pytest.approx(3.0)
    assert (a["miou_min"], a["miou_max"]) == (30.0, 36.0)
    assert a["iou_x_mean"] == pytest.approx(15.0) and a["iou_x_std"] == pytest.approx(math.sqrt(50))  # None skipped
    assert b["n"] == 1 and b["accuracy_std"] is None
    assert report.summary_cells(a)[4:] == ["52.00 ± 2.00", "50.00–54.00", "33.00 ± 3.00", "30.00–36.00"]
    assert report.summary_cells(b)[4] == "70.00"


def test_overrides_go_to_the_heads_that_have_them():
    heads = ["stego", "omh", "picie", "hsg"]
    out = route_overrides(heads, {"stego.steps": 100, "omh.w_match": 0.1, "epochs": 2, "views.n_views": 2})
    assert out["stego"] == {"stego.steps": 100, "views.n_views": 2}
    assert out["omh"] == {"stego.steps": 100, "omh.w_match": 0.1, "views.n_views": 2}
    assert out["picie"] == {"epochs": 2, "views.n_views": 2} and out["hsg"] == {"epochs": 2, "views.n_views": 2}
    with pytest.raises(ConfigError, match="no compared head has this field"):
        route_overrides(["stego"], {"picie.epochs": 1})
    with pytest.raises(ConfigError, match="use --seeds"):
        route_overrides(heads, {"seed": 3})


def test_a_bad_comparison_fails_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="unknown head"):
        CompareSpec(dataset="synthetic", heads=["stego", "nope"], storage=str(tmp_path))
    with pytest.raises(ConfigError, match="must not repeat"):
        CompareSpec(dataset="synthetic", heads=["stego"], seeds=[0, 0])
    with pytest.raises(ConfigError, match="views.bogus"):
        CompareSpec(dataset="synthetic", heads=["picie"], overrides={"views.bogus": 1})
    assert not any(tmp_path.iterdir())


def test_every_run_gets_its_seed_on_the_heads_primary_section():
    runs = CompareSpec(dataset="synthetic", heads=["omh", "hsg"], seeds=[0, 3], overrides={"stego.steps": 5}).runs()
    assert [(r.head, r.seed) for r in runs] == [("omh", 0), ("omh", 3), ("hsg", 0), ("hsg", 3)]
    assert runs[1].head_settings() == {"stego.steps": 5, "stego.seed": 3}


# --- the flow ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_seeds(synthetic_small, tmp_path_factory, prefect_harness):
    storage = tmp_path_factory.mktemp("compare") / "storage"
    return storage, _compare(synthetic_small, storage, [0, 1])


def test_comparison_writes_the_table_the_pictures_and_the_page(two_seeds):
    storage, out = two_seeds
    folder = Path(out["path"])
    assert folder.parent.name == "compare" and not out["cache_hit"]
    assert sorted(out["trained"]) == ["picie/seed0", "picie/seed1", "stego/seed0", "stego/seed1"]
    summary = pd.read_csv(folder / "summary.csv")
    methods = list(dict.fromkeys(summary.method))
    assert methods == ["raw-features (five-crops)", "raw-features (frames)", "stego", "picie"]  # baselines first
    assert set(summary.n) == {2}
    bars = Image.open(folder / "per_class_iou.png")
    assert bars.size[0] > 400
    overlays = np.asarray(Image.open(folder / "overlays.png").convert("RGB"))
    assert overlays.shape[1] > 6 * 150  # image | label | two baselines | stego | picie
    page = (folder / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "<table>" in page
    for row in out["summary"]:  # every summary row's cells are on the page
        assert all(cell in page for cell in report.summary_cells(row)[4:])
    for run in out["runs"]:  # the keys behind every number, with its training time
        assert run["head_key"] in page and run["evaluation_key"] in page
        assert run["train_seconds"] is not None and run["train_seconds"] >= 0


def test_table_equals_the_statistics_of_the_runs_results_files(two_seeds):
    _, out = two_seeds
    per_run = {}
    for run in out["runs"]:  # each run's own evaluation artifact, as `usseg run` wrote it
        res = pd.read_csv(Path(run["evaluation_path"]) / "results.csv")
        res.loc[res.method == "raw-features", "method"] = run["baseline"]
        for r in res.itertuples():
            per_run.setdefault((r.method, r.clusterer, bool(r.crf)), {})[run["seed"]] = (r.accuracy, r.miou)
    summary = pd.read_csv(Path(out["path"]) / "summary.csv")
    assert len(summary) == len(per_run)
    for s in summary.itertuples():
        vals = np.array(list(per_run[(s.method, s.clusterer, bool(s.crf))].values()))  # (seeds, 2)
        assert s.n == len(vals) == 2
        assert s.accuracy_mean == pytest.approx(vals[:, 0].mean()) and s.miou_mean == pytest.approx(vals[:, 1].mean())
        assert s.accuracy_std == pytest.approx(vals[:, 0].std(ddof=1))
        assert s.miou_std == pytest.approx(vals[:, 1].std(ddof=1))
        assert (s.miou_min, s.miou_max) == (vals[:, 1].min(), vals[:, 1].max())


def test_lineage_of_the_report_reaches_every_head(two_seeds):
    storage, out = two_seeds
    keys = lineage(ArtifactStore(storage), out["key"]).keys()
    assert {r["head_key"] for r in out["runs"]} <= keys
    assert {r["evaluation_key"] for r in out["runs"]} <= keys


def test_one_more_seed_trains_only_that_seed_and_a_rerun_is_a_lookup(two_seeds, synthetic_small):
    storage, first = two_seeds
    before = artifact_mtimes(storage)
    heads_before = set(ArtifactStore(storage).root.joinpath("head").iterdir())
    out = _compare(synthetic_small, storage, [0, 1, 2])
    assert sorted(out["trained"]) == ["picie/seed2", "stego/seed2"]
    after = artifact_mtimes(storage)
    assert all(after[p] == t for p, t in before.items())  # nothing of seeds 0 and 1 was rewritten
    new_heads = set(ArtifactStore(storage).root.joinpath("head").iterdir()) - heads_before
    assert len(new_heads) == 2
    assert out["key"] != first["key"] and set(pd.read_csv(Path(out["path"]) / "summary.csv").n) == {3}
    settled = artifact_mtimes(storage)
    again = _compare(synthetic_small, storage, [0, 1, 2])
    assert again["cache_hit"] and again["key"] == out["key"] and again["trained"] == []
    assert artifact_mtimes(storage) == settled  # every stage and the report itself: look-ups
    # The CLI's no-work path: the same body under lookups_only, no flow run, the same answer.
    looked = cached_result(compare, CompareSpec(**_compare_params(synthetic_small, storage, [0, 1, 2])))
    assert looked is not None and looked["key"] == out["key"] and looked["summary"] == again["summary"]
    assert artifact_mtimes(storage) == settled
    assert [r["seed"] for r in json.loads((Path(out["path"]) / "runs.json").read_text())] == [0, 1, 2] * 2


# --- the page in a real browser ------------------------------------------------------------------------

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars")


def chromium() -> str:
    """Debian's chromium, installed with apt-get where absent (root only); skip when it cannot be had."""
    import os
    import shutil
    import subprocess

    path = shutil.which("chromium")
    if path is None and shutil.which("apt-get") and os.geteuid() == 0:
        subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], capture_output=True, timeout=1200,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        path = shutil.which("chromium")
    if path is None:
        pytest.skip("Debian's chromium is absent and could not be installed (apt-get install chromium)")
    return path


@pytest.mark.slow  # installs chromium on a fresh machine
def test_the_page_renders_its_table_and_pictures_in_headless_chromium(two_seeds, tmp_path):
    import subprocess

    from usseg_core.viz import palette

    _, out = two_seeds
    shot = tmp_path / "report.png"
    cmd = [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,2400",
           f"--screenshot={shot}", (Path(out["path"]) / "report.html").as_uri()]
    subprocess.run(cmd, capture_output=True, timeout=120, check=True)
    pic = np.asarray(Image.open(shot).convert("RGB")).astype(int)  # (2400, 1400, 3)
    assert pic.shape[:2] == (2400, 1400)
    header = (pic == 240).all(axis=2)  # the tables' header cells (#f0f0f0)
    assert header.sum() > 5000
    bars = palette(5)[1:]  # the bar chart's series colours (viz.iou_bars), as filled areas
    for colour in bars[:4]:
        assert (np.abs(pic - colour).max(axis=2) <= 2).sum() > 500, colour
    top_of_pictures = np.argmax((np.abs(pic - bars[0]).max(axis=2) <= 2).any(axis=1))
    assert header[:top_of_pictures].any()  # the results table comes first, then the pictures
    overlay_rows = pic[top_of_pictures + 400:]
    assert len(np.unique(overlay_rows.reshape(-1, 3), axis=0)) > 5000  # photographs, not flat colours


def test_demo_is_the_comparison_on_synthetic_scenes_and_reruns_as_a_lookup(tmp_path, monkeypatch, prefect_harness):
    import re

    from typer.testing import CliRunner

    import commands.compare as cli_compare
    from commands.cli import app

    import usseg_core.heads

    monkeypatch.setattr(usseg_core.heads, "demo_overrides", lambda heads: {"stego.steps": 4})  # --heads stego
    args = ["demo", "--storage", str(tmp_path / "s"), "--heads", "stego", "--seeds", "0", "--n-train", "8",
            "--n-val", "2"]
    first = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert first.exit_code == 0, first.output
    assert "raw-features (five-crops)" in first.output and "cluster-probe" in first.output
    assert cli_compare.DEMO_MEANING in " ".join(first.output.split("\n"))  # the one line saying what it means
    page = Path(re.search(r"report: (\S+report\.html)", first.output).group(1))
    assert page.exists() and "stego" in page.read_text()
    again = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert again.exit_code == 0 and "cache hit" in again.output
