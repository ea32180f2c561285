"""bench/rehearsal.py: the growth exponent, the verdicts and the table from hand-made rows, and a real tiny
run of its first stages (forked stage processes, Prefect flow runs, artifacts counted on disk)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bench.rehearsal import STAGES, exponent, growth, parse_args, rehearse, table


def _row(stage: str, n: int, seconds: float, rss: float, above: float = 100.0, backend: str = "local") -> dict:
    return {"backend": backend, "n": n, "stage": stage, "seconds": seconds, "peak_rss_mib": rss,
            "rss_above_mib": above, "objects": 3, "bytes": 2048}


def test_exponent_of_hand_made_power_laws():
    assert exponent(1000, 2.0, 4000, 8.0) == pytest.approx(1.0)  # linear: 4x N, 4x time
    assert exponent(1000, 3.0, 4000, 3.0) == pytest.approx(0.0)  # constant
    assert exponent(1000, 1.0, 4000, 16.0) == pytest.approx(2.0)  # quadratic
    assert exponent(500, 1.0, 2000, 8.0) == pytest.approx(1.5)  # 4^1.5 = 8
    assert exponent(250, 1.0, 1000, 4 ** 1.2) == pytest.approx(1.2)


def test_growth_judges_the_two_largest_sizes_against_each_target():
    rows = [
        _row("manifest", 100, 99.0, 100),  # the smallest N is not used: only 400 -> 1600
        _row("manifest", 400, 1.0, 500), _row("manifest", 1600, 4.0, 520),  # a = 1, RSS x1.04: both met
        _row("five-crops", 400, 1.0, 500), _row("five-crops", 1600, 4 ** 1.3, 650),  # a = 1.3, RSS x1.3: missed
        _row("knn", 400, 1.0, 500), _row("knn", 1600, 4 ** 1.15, 900),  # a = 1.15 <= 1.2; RSS not judged
        _row("train", 400, 10.0, 600, 50.0), _row("train", 1600, 9.0, 610, 200.0),  # faster: met
    ]
    by = {s["stage"]: s for s in growth(rows)}
    assert set(by) == {"manifest", "five-crops", "knn", "train"}
    m = by["manifest"]
    assert (m["n1"], m["n2"]) == (400, 1600) and m["a"] == pytest.approx(1.0)
    assert m["time_met"] and m["rss_met"] and m["rss_ratio"] == pytest.approx(1.04)
    f = by["five-crops"]
    assert f["a"] == pytest.approx(1.3) and not f["time_met"] and not f["rss_met"]
    k = by["knn"]
    assert k["a"] == pytest.approx(1.15) and k["time_met"] and k["rss_met"] is None and not k["rss_target"]
    t = by["train"]
    assert t["a"] < 0 and t["time_met"] and t["rss_above_ratio"] == pytest.approx(4.0)


def test_table_prints_every_row_and_each_verdict():
    rows = [_row("knn", 400, 1.0, 500), _row("knn", 1600, 4 ** 1.3, 520)]
    warm = [{"backend": "local", "n": 1600, "what": "usseg run stego (recorded answer)", "seconds": 1.5,
             "imports_s": 1.2, "beyond_s": 0.3, "met": True}]
    text = table(rows, growth(rows), warm)
    assert "| local | 400 | knn | 1.00 | 500 | 100 | 3 | 2.0 KB |" in text
    assert "| local | knn | 400→1600 | 1.30 | MISSED (<= 1.2) |" in text
    assert "n/a (in memory by design)" in text
    assert "| local | 1600 | usseg run stego (recorded answer) | 1.50 | 1.20 | 0.30 | met (<= 2.0 s) |" in text


def test_sizes_must_grow():
    with pytest.raises(SystemExit):
        parse_args(["--sizes", "800", "200"])
    with pytest.raises(SystemExit):
        parse_args(["--sizes", "200", "800", "--s3-sizes", "400"])


def test_a_tiny_real_rehearsal_of_the_first_stages(tmp_path, prefect_harness):
    """Two sizes through manifest and features: each stage a flow run in a forked process, its artifact
    counted on disk, the exponent fitted on the measured rows."""
    from prefect.settings import PREFECT_API_URL

    args = parse_args(["--sizes", "4", "8", "--val", "2", "--until", "features", "--repeats", "0", "--keep",
                       "--prefect-api", PREFECT_API_URL.value()])
    lines: list[str] = []
    result = rehearse(args, tmp_path, say=lines.append)
    rows = result["rows"]
    assert [(r["n"], r["stage"]) for r in rows] == [(n, s) for n in (4, 8) for s in STAGES[:2]]
    for r in rows:
        assert r["seconds"] > 0 and r["peak_rss_mib"] >= r["rss_before_mib"] > 0
        assert len(r["artifacts"]) == 1 and r["artifacts"][0].split("/")[0] == r["stage"]
        folder = tmp_path / f"local-{r['n']}" / "storage" / r["artifacts"][0]
        files = [p for p in folder.rglob("*") if p.is_file()]
        assert r["objects"] == len(files) and r["bytes"] == sum(p.stat().st_size for p in files)
    manifest = json.loads(next((tmp_path / "local-8" / "storage" / "manifest").glob("*/manifest.json")).read_text())
    assert len(manifest["entries"]) == 8 and manifest["split"] == "train"
    feats = [r for r in rows if r["stage"] == "features"]
    # shards of 128 items: 4 and 8 items are one object per array each, and the bytes grow with the items
    assert feats[1]["objects"] == feats[0]["objects"] and feats[1]["bytes"] > feats[0]["bytes"]
    by = {s["stage"]: s for s in result["summary"]}
    f4, f8 = feats
    assert by["features"]["a"] == pytest.approx(math.log(f8["seconds"] / f4["seconds"]) / math.log(2))
    assert result["warm"] == [] and any("features" in line for line in lines)


def test_extrapolation_is_at_least_linear_and_keeps_fixed_work():
    from bench.rehearsal import extrapolate

    rows = [_row("five-crops", 500, 10.0, 500), _row("five-crops", 2000, 20.0, 500),  # a = 0.5: scaled as 1
            _row("knn", 500, 1.0, 400), _row("knn", 2000, 4 ** 1.2, 400),  # a = 1.2
            _row("train", 500, 30.0, 600), _row("train", 2000, 31.0, 600)]  # fixed steps: kept
    out = extrapolate(rows, growth(rows), 20000)
    assert out["five-crops"] == pytest.approx(200.0)
    assert out["knn"] == pytest.approx(4 ** 1.2 * 10 ** 1.2)
    assert out["train"] == pytest.approx(31.0)
