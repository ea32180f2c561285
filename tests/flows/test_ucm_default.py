"""`usseg ucm IMG --out DIR` with no options runs: auto picks PiDiNet when its weights are where the user
keeps them, else the classical detector (no file needed), and says which it used."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from usseg_core.ucm import load_ucm2_mat

WEIGHTS = Path("/work/shared/weights/pidinet")


def _app() -> typer.Typer:
    from commands.edges import register

    app = typer.Typer()
    register(app)
    return app


def _img(path: Path) -> Path:
    rng = np.random.default_rng(0)
    img = np.zeros((40, 52, 3), np.uint8)
    img[:, 26:] = (200, 40, 40)
    img[8:30, 6:18] = (30, 60, 200)
    Image.fromarray(np.clip(img + rng.normal(0, 3, img.shape), 0, 255).astype(np.uint8)).save(path)
    return path


def test_ucm_with_no_options_runs_on_the_classical_detector(tmp_path, monkeypatch):
    monkeypatch.delenv("USSEG_DATA_ROOT", raising=False)
    monkeypatch.delenv("USSEG_PIDINET_WEIGHTS", raising=False)
    img = _img(tmp_path / "a.png")
    res = CliRunner().invoke(_app(), ["ucm", str(img), "--out", str(tmp_path / "u")])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "edge detector: classical" in res.output
    assert load_ucm2_mat(tmp_path / "u" / "a.mat").shape == (81, 105)


def test_auto_finds_pidinet_weights_next_to_the_data_root(tmp_path, monkeypatch):
    from commands.edges import resolve_detector

    (tmp_path / "weights" / "pidinet").mkdir(parents=True)
    (tmp_path / "data").mkdir()
    w = tmp_path / "weights" / "pidinet" / "table5_pidinet.pth"
    w.write_bytes(b"x")
    monkeypatch.delenv("USSEG_PIDINET_WEIGHTS", raising=False)
    monkeypatch.setenv("USSEG_DATA_ROOT", str(tmp_path / "data"))
    assert resolve_detector("auto", None) == ("pidinet", w)
    assert resolve_detector("pidinet", None) == ("pidinet", w)
    assert resolve_detector("classical", None) == ("classical", None)
    monkeypatch.setenv("USSEG_DATA_ROOT", str(tmp_path / "x" / "elsewhere"))
    assert resolve_detector("auto", None) == ("classical", None)
    monkeypatch.setenv("USSEG_PIDINET_WEIGHTS", str(w))
    assert resolve_detector("auto", None) == ("pidinet", w)


@pytest.mark.skipif(not (WEIGHTS / "table5_pidinet.pth").is_file(), reason="PiDiNet weights not present")
def test_ucm_with_no_options_uses_pidinet_where_the_user_keeps_it(tmp_path, monkeypatch):
    monkeypatch.delenv("USSEG_PIDINET_WEIGHTS", raising=False)
    monkeypatch.setenv("USSEG_DATA_ROOT", str(WEIGHTS.parent.parent / "data"))
    img = _img(tmp_path / "a.png")
    res = CliRunner().invoke(_app(), ["ucm", str(img), "--out", str(tmp_path / "u")])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "edge detector: pidinet (weights" in res.output and "table5_pidinet.pth" in res.output
    assert (tmp_path / "u" / "a.mat").is_file()
