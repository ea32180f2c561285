"""A head that needs {"views", "oversegment"} (HSG's inputs) is fed both by `flows.train.run`, aligned
image by image, and each input is invalidated by exactly what it depends on: the backbone re-runs the
features, the views and the head but not the oversegmentation; the edge/UCM settings re-run the
oversegmentation and the head but not the views."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from prefect import flow

from flows.train import run
from usseg_core.spec import RunSpec
from tests.conftest import artifact_mtimes
from usseg_core.datasets.manifest import Manifest
from usseg_core.datasets.synthetic import ensure_synthetic
from usseg_core.errors import ConfigError
from usseg_core.heads import HeadSpec, TrainedHead, TrainedState, get_head, register_head, unregister_head
from usseg_core.overseg import OversegSchedule

H, W = 48, 64  # synthetic image size: the size every segment map must have


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    return ensure_synthetic(tmp_path_factory.mktemp("data") / "synthetic", n_train=4, n_val=2, height=H, width=W)


@dataclass
class SegToyConfig:
    dim: int = 3  # a random projection to 3 channels


class SegToyTrained(TrainedHead):
    method = "segtoy"

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__(in_dim, dim, 0)
        self.proj = torch.nn.Conv2d(in_dim, dim, 1)

    def codes(self, feats):
        return self.proj(feats)


def _train_segtoy(inputs, config, **_):
    """Checks the HeadInputs.segments contract against the view banks, then trains nothing."""
    from usseg_core.overseg import SegmentFolder

    assert inputs.views is not None and inputs.segments is not None
    assert len(inputs.views) == len(inputs.segments) >= 1  # one of each per training split
    regions = []
    for bank, segs in zip(inputs.views, inputs.segments):
        assert isinstance(segs, SegmentFolder) and len(segs) == bank.n_images
        # the view bank's images are its manifest's, in order: so are the segment maps
        manifest = bank.path.parent.parent / "manifest" / bank.meta["upstream"]["manifest"] / "manifest.json"
        assert segs.ids == Manifest.from_json(manifest).ids
        for i in range(len(segs)):
            seg = segs[i]
            assert seg.shape == (H, W) and seg.dtype == np.int32 and seg.min() == 0  # original size, 0..n-1
            regions.append(int(seg.max()) + 1)
    torch.manual_seed(0)
    head = SegToyTrained(int(inputs.views[0].shape[0]), config["segtoy"].dim)
    return TrainedState(payload={"in_dim": head.in_dim, "code_dim": head.code_dim, "proj": head.proj.state_dict()},
                        meta={"n_images": len(regions), "regions": regions})


def _load_segtoy(ckpt):
    head = SegToyTrained(ckpt["in_dim"], ckpt["code_dim"])
    head.proj.load_state_dict(ckpt["proj"])
    return head


@pytest.fixture()
def segtoy_head():
    register_head(HeadSpec(name="segtoy", summary="checks views + oversegment inputs",
                           sections=(("segtoy", SegToyConfig),), presets=lambda ds: {},
                           needs=frozenset({"views", "oversegment"}), train=_train_segtoy, load=_load_segtoy))
    yield get_head("segtoy")
    unregister_head("segtoy")


@flow
def _run_flow(spec: RunSpec) -> dict:
    return run(spec)


def _keys(storage, stage: str) -> set[str]:
    return {p.parent.name for p in (storage / stage).glob("*/meta.json")}


def test_views_and_oversegment_feed_a_head_and_invalidate_separately(segtoy_head, synthetic_root, tmp_path,
                                                                     prefect_harness):
    storage = tmp_path / "storage"
    base = RunSpec(head="segtoy", dataset="synthetic", data_root=str(synthetic_root), train_split="train",
                   eval_split=None, storage=str(storage),
                   overrides={"views.n_views": 2, "overseg.max_regions": 16}, resolution=64)

    # (a) a fresh store: manifest -> edges -> UCM -> segments, features -> views -> head, in one run
    first = _run_flow(base)["trained"]
    (oref,), (vref,) = first["oversegment"], first["views"]
    assert not oref["cache_hit"] and not vref["cache_hit"] and oref["n_images"] == 4
    art = storage / "oversegment" / oref["key"]
    for sub, ext in (("edges", "png"), ("ucm2", "mat"), ("segments", "png")):
        assert len(list((art / sub).glob(f"*.{ext}"))) == 4, sub
    assert json.loads((art / "meta.json").read_text())["params"]["schedule"]["max_regions"] == 16
    head_meta = json.loads((storage / "head" / first["head"]["key"] / "meta.json").read_text())
    assert sorted(head_meta["upstream"]) == ["oversegment0", "views0"]
    assert head_meta["upstream"]["oversegment0"] == oref["key"] and head_meta["n_images"] == 4
    assert all(2 <= r < 16 for r in head_meta["regions"])  # the cap reached the schedule
    assert "overseg" not in json.dumps(head_meta["params"]["config"])  # not a head config field
    features = _keys(storage, "features")

    # (b) another backbone: features, views and head again; the oversegmentation is a cache hit
    other = _run_flow(base.changed(random_weights=True))["trained"]
    assert other["oversegment"][0]["key"] == oref["key"] and other["oversegment"][0]["cache_hit"]
    assert not other["views"][0]["cache_hit"] and other["views"][0]["key"] != vref["key"]
    assert other["head"]["key"] != first["head"]["key"]
    assert len(_keys(storage, "features")) == len(features) + 1 and len(_keys(storage, "oversegment")) == 1

    # (c) other edge/UCM settings: oversegmentation and head again; the views are a cache hit
    t0 = base.changed(overrides={**base.overrides, "overseg.t0": 0.1})
    moved = _run_flow(t0)["trained"]
    assert not moved["oversegment"][0]["cache_hit"] and moved["oversegment"][0]["key"] != oref["key"]
    assert moved["views"][0]["cache_hit"] and moved["views"][0]["key"] == vref["key"]
    assert moved["head"]["key"] not in {first["head"]["key"], other["head"]["key"]}
    assert len(_keys(storage, "features")) == len(features) + 1 and len(_keys(storage, "views")) == 2

    before = artifact_mtimes(storage)
    again = _run_flow(t0)["trained"]  # nothing changed: key look-ups only
    assert again["head"]["key"] == moved["head"]["key"]
    assert artifact_mtimes(storage) == before


@pytest.mark.parametrize("bad, says", [
    ("overseg.foo", r"overseg\.foo.*valid: overseg\.detector, overseg\.max_regions, overseg\.t0, overseg\.weights"),
    ("overseg.t0", r"--set overseg\.t0=high: expected a number"),
    ("overseg.detector", r"unknown edge detector.*classical"),
])
def test_bad_overseg_settings_fail_before_any_artifact(bad, says, segtoy_head, synthetic_root, tmp_path):
    storage = tmp_path / "storage"
    value = {"overseg.t0": "high", "overseg.detector": "sobel"}.get(bad, 1)
    with pytest.raises(ConfigError) as err:  # the spec itself refuses it: before any flow or task
        RunSpec(head="segtoy", dataset="synthetic", data_root=str(synthetic_root), storage=str(storage),
                overrides={bad: value})
    assert re.search(says, str(err.value)), str(err.value)
    assert not storage.exists() or not any(p for p in storage.rglob("meta.json"))


def test_segment_folder_reads_in_the_given_order_and_names_bad_files(tmp_path):
    from PIL import Image

    from usseg_core.errors import InputError
    from usseg_core.overseg import SegmentFolder

    (tmp_path / "segments").mkdir()
    small = np.arange(12, dtype=np.uint8).reshape(3, 4)
    large = (np.arange(12, dtype=np.uint16) * 100).reshape(3, 4)  # > 255 regions: a 16-bit PNG
    Image.fromarray(small).save(tmp_path / "segments" / "a__x.png")
    Image.fromarray(large).save(tmp_path / "segments" / "b.png")
    folder = SegmentFolder(tmp_path, ["b", "a/x"])
    assert len(folder) == 2 and folder.load_all()
    assert folder[0].dtype == np.int32 and np.array_equal(folder[0], large) and np.array_equal(folder[-1], small)
    with pytest.raises(IndexError):
        folder[2]
    with pytest.raises(InputError, match=r"c\.png: missing region map"):
        SegmentFolder(tmp_path, ["a/x", "c"])
    (tmp_path / "segments" / "c.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match=r"c\.png: unreadable region map"):
        SegmentFolder(tmp_path, ["c"])[0]


def test_cli_rejects_bad_overseg_settings_before_any_work_and_heads_never_see_them(tmp_path):
    from typer.testing import CliRunner

    from commands.cli import app

    res = CliRunner().invoke(app, ["run", "picie", "--dataset", "synthetic", "--storage", str(tmp_path),
                                   "--set", "overseg.tzero=0.1"])
    assert isinstance(res.exception, ConfigError) and "valid: overseg.detector" in str(res.exception)
    assert not list(tmp_path.iterdir())  # nothing was computed
    spec = RunSpec(head="picie", dataset="synthetic", overrides={"overseg.t0": 0.1, "views.n_views": 2, "epochs": 1})
    assert spec.head_overrides() == {"epochs": 1}
    assert spec.overseg_config().schedule("cityscapes27") == OversegSchedule(0.1, 1024)
