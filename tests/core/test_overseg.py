"""HSG oversegmentation schedule, oversegment(), and the edges/ucm CLI."""
from __future__ import annotations

import numpy as np
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from usseg_core.edges import get_edge_detector
from usseg_core.errors import ConfigError
from usseg_core.overseg import SCHEDULES, OversegSchedule, choose_level, oversegment, schedule_for_dataset
from usseg_core.ucm import load_ucm2_mat, owt_ucm, ucm_labels


def _image(seed=0, h=48, w=64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.uint8)
    for _ in range(12):  # random flat rectangles + mild noise
        y, x = rng.integers(0, h - 8), rng.integers(0, w - 8)
        img[y : y + rng.integers(6, 20), x : x + rng.integers(6, 25)] = rng.integers(0, 255, 3)
    return np.clip(img + rng.normal(0, 3, img.shape), 0, 255).astype(np.uint8)


def test_schedules_match_methods_table():
    assert SCHEDULES["coco"] == OversegSchedule(0.25, 48)
    assert SCHEDULES["cityscapes"] == OversegSchedule(0.05, 1024)
    assert SCHEDULES["potsdam"] == OversegSchedule(0.5, 128)
    assert schedule_for_dataset("cocostuff27") is SCHEDULES["coco"]
    assert schedule_for_dataset("cityscapes27") is SCHEDULES["cityscapes"]
    assert schedule_for_dataset("potsdam3") is SCHEDULES["potsdam"]
    assert schedule_for_dataset("camvid11") is SCHEDULES["cityscapes"]
    assert schedule_for_dataset("directory") is SCHEDULES["coco"]  # declared by the dataset, not a fallback
    with pytest.raises(ConfigError, match="unknown dataset 'something-else'; known: .*camvid11"):
        schedule_for_dataset("something-else")
    with pytest.raises(ConfigError, match="max_regions"):
        OversegSchedule(0.1, 1)


@pytest.mark.parametrize("cap", [2, 5, 20, 10_000])
def test_choose_level_equals_linear_scan(cap):
    ucm2 = owt_ucm(get_edge_detector("classical")(_image(1)))
    sch = OversegSchedule(0.02, cap, step=0.01)
    t, lab = choose_level(ucm2, sch)
    k = 0
    while ucm_labels(ucm2, sch.t0 + k * sch.step).max() + 1 >= cap:  # the paper's loop, literally
        k += 1
    assert t == pytest.approx(sch.t0 + k * sch.step)
    assert np.array_equal(lab, ucm_labels(ucm2, t))
    assert lab.max() + 1 < cap


def test_oversegment_result():
    img = _image(2)
    r = oversegment(img, get_edge_detector("classical"), OversegSchedule(0.0, 8))
    assert r.labels.shape == img.shape[:2] and r.labels.dtype == np.int32
    assert r.n_regions == r.labels.max() + 1 < 8
    assert r.ucm2.shape == (97, 129)
    assert np.array_equal(np.unique(r.labels), np.arange(r.n_regions))


def _app() -> typer.Typer:
    from commands.edges import register

    app = typer.Typer()
    register(app)
    return app


def test_cli_edges_and_ucm(tmp_path):
    for i in range(2):
        Image.fromarray(_image(i, 40, 52)).save(tmp_path / f"im{i}.png")
    imgs = [str(tmp_path / f"im{i}.png") for i in range(2)]
    runner = CliRunner()
    res = runner.invoke(_app(), ["edges", *imgs, "--detector", "classical", "--out", str(tmp_path / "e")])
    assert res.exit_code == 0, res.output
    e = np.asarray(Image.open(tmp_path / "e" / "im0.png"))
    assert e.shape == (40, 52) and e.dtype == np.uint8 and e.max() > 100
    res = runner.invoke(
        _app(),
        ["ucm", *imgs, "--detector", "classical", "--levels", "0.1,0.3", "--schedule", "coco", "--out", str(tmp_path / "u")],
    )
    assert res.exit_code == 0, res.output
    u = load_ucm2_mat(tmp_path / "u" / "im1.mat")
    assert u.shape == (81, 105)
    lab = np.asarray(Image.open(tmp_path / "u" / "im1_t0.1.png"))
    assert np.array_equal(lab, ucm_labels(u, 0.1))
    t, _ = choose_level(u, SCHEDULES["coco"])
    assert (tmp_path / "u" / f"im1_t{t:g}.png").is_file()


def test_cli_reports_bad_arguments(tmp_path):
    runner = CliRunner()
    Image.fromarray(_image(0, 20, 20)).save(tmp_path / "a.png")
    res = runner.invoke(_app(), ["ucm", str(tmp_path / "a.png"), "--detector", "classical", "--levels", "x", "--out", str(tmp_path)])
    assert res.exit_code == 3 and "--levels" in res.output  # a bad setting: EXIT_CONFIG
    res = runner.invoke(_app(), ["edges", str(tmp_path / "nope.png"), "--detector", "classical", "--out", str(tmp_path)])
    assert res.exit_code == 4 and "nope.png" in res.output  # bad input: EXIT_INPUT
    res = runner.invoke(_app(), ["edges", str(tmp_path / "a.png"), "--detector", "pidinet", "--out", str(tmp_path)])
    assert res.exit_code == 4 and "weights" in res.output  # missing weights: EXIT_INPUT
