"""Feature extraction on bad inputs (issue 12): a huge first image under a full view, tiny images."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from prefect import flow

import tasks.extract as extract
from tasks.backbone import BackboneRef
from tasks.manifest import DataRef
from tasks.extract import ensure_features
from usseg_core.views import ViewSpec

BACKBONE = "tf_efficientnet_lite0"  # random init, input multiple 32


def _png(path: Path, h: int, w: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(h * w)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)


@flow(name="test-bad-inputs-extract")
def _extract(storage: str, root: str, view: ViewSpec) -> dict:
    return ensure_features(storage, DataRef("directory", root, "all"), BackboneRef(BACKBONE, random_weights=True),
                           view, batch_size=2)


def test_full_view_of_a_folder_with_a_huge_first_image(tmp_path, prefect_harness, monkeypatch):
    monkeypatch.delenv("USSEG_FULL_MAX_SIDE", raising=False)
    root = tmp_path / "photos"
    _png(root / "images" / "a_huge.png", 1500, 2400)  # sorts first
    _png(root / "images" / "b_small.png", 300, 400)
    out = _extract(str(tmp_path / "storage"), str(root), ViewSpec("full", None))
    assert out["view"]["size"] == [640, 1024]  # long side capped at 1024, not 1504x2400
    assert out["n"] == 2


def test_tiny_images_are_named_in_warnings(tmp_path, prefect_harness, monkeypatch):
    root = tmp_path / "icons"
    for i in range(7):
        _png(root / "images" / f"icon{i}.png", 8, 8)
    _png(root / "images" / "zz_big.png", 64, 64)  # 32 / 64: not upscaled
    named = []
    real = extract.warn_if_upscaled
    monkeypatch.setattr(extract, "warn_if_upscaled",
                        lambda hw, view, path, log=None: named.append((Path(path).name, hw)) or real(hw, view, path, log))
    out = _extract(str(tmp_path / "storage"), str(root), ViewSpec("center_crop", 32))
    assert out["n"] == 8
    assert named == [(f"icon{i}.png", (8, 8)) for i in range(extract.UPSCALE_WARN_NAMED)]
