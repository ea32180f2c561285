"""ensure_views: the view-bank artifact, cache hits, keys, resume, identity views and `storage show`."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from prefect import flow

from tasks.backbone import BackboneRef
from tasks.manifest import DataRef
from tasks.views import ensure_views
from usseg_core.datasets.synthetic import ensure_synthetic
from usseg_core.viewbank import ViewBank, ViewBankConfig
from usseg_core.views import ViewSpec

BACKBONE = "tf_efficientnet_lite0"  # random init (fast to build): 472 x 4 x 4 maps at 32 px
N_IMAGES = 3


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return ensure_synthetic(tmp_path_factory.mktemp("data") / "synthetic", n_train=N_IMAGES, n_val=0,
                            height=48, width=64)


@flow(name="test-views")
def _views(storage: str, root: str, config: ViewBankConfig) -> dict:
    data = DataRef("synthetic", root, "train")
    return ensure_views(storage, data, BackboneRef(BACKBONE, random_weights=True), ViewSpec("center_crop", 32),
                        config, batch_size=4, shard_size=4)


def _mtimes(folder: Path) -> dict:
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_view_bank_artifact_then_cache_hit_and_keys(tmp_path, root, prefect_harness):
    storage = str(tmp_path / "storage")
    cfg = ViewBankConfig(n_views=2)
    first = _views(storage, str(root), cfg)
    assert not first["cache_hit"] and first["n_images"] == N_IMAGES and first["n_views"] == 2
    folder = Path(first["path"])
    bank = ViewBank(folder)
    assert (bank.n_images, bank.n_views, bank.shape) == (N_IMAGES, 2, (472, 4, 4))
    for name in ("plain.zarr", "warped.zarr"):
        group = zarr.open_group(str(folder / name), mode="r")
        assert group["dense"].shape == (N_IMAGES * 2, 472, 4, 4) and np.asarray(group["done"][:]).all()
    draws = json.loads((folder / "draws.json").read_text())
    assert len(draws) == N_IMAGES and all(len(v) == 2 for v in draws)
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["n_views"] == 2 and meta["n_images"] == N_IMAGES and meta["config"] == cfg.params()
    assert set(meta["draws_summary"]) >= {"flipped", "gray", "blurred", "jittered", "mean_crop_side"}
    assert meta["params"]["views"] == cfg.params() and meta["params"]["precision"] == "fp32"
    assert bank.plain_batch([0, 2], [1, 0]).shape == (2, 472, 4, 4)
    assert np.array_equal(bank.warped_batch([2], 1)[0].numpy(), bank.warped(2, 1).astype(np.float32))
    assert not np.array_equal(bank.plain(1, 0), bank.warped(1, 0))  # a random draw changes the view

    before = _mtimes(folder)
    again = _views(storage, str(root), cfg)
    assert again["cache_hit"] and again["key"] == first["key"] and again["path"] == first["path"]
    assert _mtimes(folder) == before  # nothing rewritten

    other = _views(storage, str(root), ViewBankConfig(n_views=2, seed=1))
    assert other["key"] != first["key"] and not other["cache_hit"]
    assert json.loads((Path(other["path"]) / "draws.json").read_text()) != draws

    from typer.testing import CliRunner

    from commands.cli import app

    res = CliRunner().invoke(app, ["storage", "show", first["key"], "--storage", storage])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert f"draws of the first {N_IMAGES} of {N_IMAGES} images" in res.output
    assert "crop box" in res.output and str(folder / "draws.json") in res.output


def test_interrupted_view_bank_resumes_only_missing_items(tmp_path, root, prefect_harness):
    storage = str(tmp_path / "storage")
    cfg = ViewBankConfig(n_views=2, seed=3)
    first = _views(storage, str(root), cfg)
    folder = Path(first["path"])
    (folder / "_COMPLETE").unlink()  # as if killed before finishing
    plain = zarr.open_group(str(folder / "plain.zarr"), mode="r+")
    warped = zarr.open_group(str(folder / "warped.zarr"), mode="r+")
    expected = {"plain": np.asarray(plain["dense"][:]), "warped": np.asarray(warped["dense"][:])}
    plain["done"][1] = False  # item 1 (image 0, view 1) lost in plain, item 4 in both stores
    plain["done"][4] = False
    warped["done"][4] = False
    for group in (plain, warped):
        group["dense"][1] = 0
        group["dense"][4] = 0
        group["dense"][0] = 7.0  # a done item: must not be recomputed

    resumed = _views(storage, str(root), cfg)
    assert not resumed["cache_hit"] and resumed["key"] == first["key"] and (folder / "_COMPLETE").exists()
    for name, group in (("plain", plain), ("warped", warped)):
        dense = np.asarray(group["dense"][:])
        assert (dense[0] == 7.0).all() and np.asarray(group["done"][:]).all()
        np.testing.assert_allclose(dense[4], expected[name][4], atol=1e-3)
    np.testing.assert_allclose(np.asarray(plain["dense"][1]), expected["plain"][1], atol=1e-3)
    assert (np.asarray(warped["dense"][1]) == 0).all()  # still done in warped: left alone


def test_identity_draws_give_warped_equal_to_plain(tmp_path, root, prefect_harness):
    cfg = ViewBankConfig(n_views=1, jitter_p=0.0, gray_p=0.0, blur_p=0.0, crop_scale=(1.0, 1.0), flip_p=0.0)
    bank = ViewBank(_views(str(tmp_path / "storage"), str(root), cfg)["path"])
    for i in range(N_IMAGES):
        assert bank.geometry(i, 0).box == (0.0, 0.0, 1.0, 1.0)
        assert np.array_equal(bank.plain(i, 0), bank.warped(i, 0))
