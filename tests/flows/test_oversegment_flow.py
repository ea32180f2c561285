"""`usseg oversegment`: cached, resumable edges + UCM + schedule artifacts for a dataset split."""
from __future__ import annotations

import json

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from commands.cli import app
from usseg_core.ucm import load_ucm2_mat


def _scene(path, seed):
    rng = np.random.default_rng(seed)
    img = np.zeros((48, 64, 3), np.uint8)
    img[:24] = (200, 40, 40)
    img[24:, :32] = (40, 200, 40)
    img[24:, 32:] = (40, 40, 200)
    img = np.clip(img.astype(int) + rng.integers(-8, 9, img.shape), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(path)


def test_oversegment_flow_writes_and_reuses(tmp_path, prefect_harness):
    images = tmp_path / "data" / "images"
    images.mkdir(parents=True)
    for i in range(3):
        _scene(images / f"s{i}.png", i)
    storage = tmp_path / "storage"
    args = ["oversegment", "--dataset", "directory", "--data-root", str(tmp_path / "data"), "--split", "all",
            "--detector", "classical", "--t0", "0.05", "--max-regions", "8", "--storage", str(storage)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "computed" in res.output
    (art,) = list((storage / "oversegment").iterdir())
    for i in range(3):
        edges = np.asarray(Image.open(art / "edges" / f"s{i}.png"))
        assert edges.shape == (48, 64) and edges.dtype == np.uint8 and edges.max() > 100
        ucm2 = load_ucm2_mat(art / "ucm2" / f"s{i}.mat")
        assert ucm2.shape == (97, 129)
        seg = np.asarray(Image.open(art / "segments" / f"s{i}.png"))
        assert seg.shape == (48, 64) and 2 <= len(np.unique(seg)) < 8  # fewer than the cap
    meta = json.loads((art / "meta.json").read_text())
    assert meta["params"]["schedule"]["max_regions"] == 8 and meta["detector_fingerprint"]
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and "cache hit" in again.output
