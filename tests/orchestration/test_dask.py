"""Fan-out: sharded extraction, view-bank extraction and oversegmentation on a local Dask cluster of 2
worker processes equal the single-process results bit for bit, and both workers executed shards."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from prefect import flow

from flows.extract import extract_features
from usseg_core.spec import CompareSpec, ExtractSpec
from orchestration.runner import SettingTaskRunner


def test_two_dask_workers_share_shards_and_match_threads_bit_for_bit(prefect_harness, tmp_path):
    from usseg_core.datasets.synthetic import ensure_synthetic

    root = ensure_synthetic(tmp_path / "synthetic", n_train=8, n_val=2)
    common = dict(dataset="synthetic", data_root=str(root), split="train", random_weights=True,
                  policy="five_crop", resolution=64, shard_size=5, batch_size=5)
    # Dask workers run torch with one intra-op thread (the nanny sets OMP_NUM_THREADS=1); CPU kernels may
    # sum in another order with another thread count, so the reference uses one thread too.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = extract_features(ExtractSpec(storage=str(tmp_path / "threads"), task_runner="threads:1", **common))
    finally:
        torch.set_num_threads(threads)
    fanned = extract_features(ExtractSpec(storage=str(tmp_path / "dask"), task_runner="dask:2", **common))

    assert fanned["key"] == single["key"]  # the runner is not part of the key
    assert len(fanned["workers"]) == 2, fanned["workers"]  # 8 shards over 2 processes
    a, b = zarr.open_group(single["path"], mode="r"), zarr.open_group(fanned["path"], mode="r")
    assert b["dense"].shards == (5, *b["dense"].shape[1:])  # a task per stored shard: one writer per object
    assert np.array_equal(a["dense"][:], b["dense"][:])
    assert np.array_equal(a["pooled"][:], b["pooled"][:])
    assert a["done"][:].all() and b["done"][:].all()


@flow(name="test-views-and-oversegment", task_runner=SettingTaskRunner(parameter="task_runner"))
def _views_and_oversegment(data_root: str, storage: str, task_runner: str = "threads") -> dict:
    """The two per-image input stages of HSG in one flow run (one Dask cluster for both)."""
    from tasks.backbone import BackboneRef
    from tasks.manifest import DataRef
    from tasks.oversegment import ensure_oversegmentation
    from tasks.views import ensure_views
    from usseg_core.overseg import OversegSchedule
    from usseg_core.viewbank import ViewBankConfig
    from usseg_core.views import ViewSpec

    data = DataRef("synthetic", data_root, "train")
    overseg = ensure_oversegmentation(storage, data, "classical", None, OversegSchedule(0.05, 16), shard_size=1)
    views = ensure_views(storage, data, BackboneRef("tf_efficientnet_lite0", random_weights=True),
                         ViewSpec("full", 64), ViewBankConfig(n_views=2), shard_size=2, batch_size=2)
    return {"oversegment": overseg, "views": views}


def test_views_and_oversegment_shards_fan_out_over_dask_workers(prefect_harness, tmp_path):
    from usseg_core.ucm import load_ucm2_mat

    root = str(ensure_synthetic_small(tmp_path))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the Dask workers (see above)
    try:
        single = _views_and_oversegment(root, str(tmp_path / "threads"), task_runner="threads:1")
    finally:
        torch.set_num_threads(threads)
    fanned = _views_and_oversegment(root, str(tmp_path / "dask"), task_runner="dask:2")

    for stage in ("oversegment", "views"):
        assert fanned[stage]["key"] == single[stage]["key"], stage
        assert not fanned[stage]["cache_hit"] and len(fanned[stage]["workers"]) == 2, (stage, fanned[stage])
    a, b = (Path(r["oversegment"]["path"]) for r in (single, fanned))
    names = sorted(p.name for p in (a / "segments").iterdir())
    assert len(names) == 6 and names == sorted(p.name for p in (b / "segments").iterdir())
    for name in names:
        for sub in ("segments", "edges"):
            assert (a / sub / name).read_bytes() == (b / sub / name).read_bytes(), (sub, name)
        mat = name.replace(".png", ".mat")
        assert np.array_equal(load_ucm2_mat(a / "ucm2" / mat), load_ucm2_mat(b / "ucm2" / mat))
    for store in ("plain.zarr", "warped.zarr"):
        x, y = (zarr.open_group(str(Path(r["views"]["path"]) / store), mode="r") for r in (single, fanned))
        assert x["done"][:].all() and y["done"][:].all()
        assert np.array_equal(x["dense"][:], y["dense"][:]) and np.array_equal(x["pooled"][:], y["pooled"][:])
    assert (Path(single["views"]["path"]) / "draws.json").read_bytes() == (
        Path(fanned["views"]["path"]) / "draws.json").read_bytes()


def ensure_synthetic_small(tmp_path):
    from usseg_core.datasets.synthetic import ensure_synthetic

    return ensure_synthetic(tmp_path / "synthetic", n_train=6, n_val=1, height=96, width=128)


def test_unknown_runner_setting_names_the_choices():
    from orchestration.runner import make_task_runner
    from usseg_core.errors import ConfigError

    with pytest.raises(ConfigError, match="threads"):
        make_task_runner("ray:4")


def test_compare_trains_heads_and_seeds_on_dask_workers_and_matches_threads(prefect_harness, tmp_path):
    """Every head x seed's training is a task of the runner: on two Dask processes the four trainings
    spread over both, and the table equals the one-thread run's to the last digit (no shared RNG state)."""
    import json

    import pandas as pd

    from flows.compare import compare
    from usseg_core.datasets.synthetic import ensure_synthetic

    root = ensure_synthetic(tmp_path / "synthetic", n_train=8, n_val=2, height=64, width=96)
    common = dict(dataset="synthetic", data_root=str(root), heads=["stego", "picie"], seeds=[0, 1],
                  backbone="vit_small_patch16_224.dino", random_weights=True, resolution=32, run_crf=False,
                  overrides={"stego.steps": 6, "picie.epochs": 1, "picie.batch_size": 4, "views.n_views": 2})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the Dask workers run (see above)
    try:
        single = compare(CompareSpec(storage=str(tmp_path / "threads"), task_runner="threads:1", **common))
    finally:
        torch.set_num_threads(threads)
    fanned = compare(CompareSpec(storage=str(tmp_path / "dask"), task_runner="dask:2", **common))

    assert fanned["key"] == single["key"]  # neither the runner nor the store's location is part of any key
    workers = {json.loads((tmp_path / "dask" / "head" / r["head_key"] / "meta.json").read_text())["worker"]
               for r in fanned["runs"]}
    assert len(workers) == 2, workers  # the four trainings ran in both worker processes
    a = pd.read_csv(Path(single["path"]) / "summary.csv")
    b = pd.read_csv(Path(fanned["path"]) / "summary.csv")
    pd.testing.assert_frame_equal(a, b)
