"""Fan-out: sharded extraction on a local Dask cluster of 2 worker processes equals the single-process
result bit for bit, and both workers executed shards."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from flows.extract import extract_features


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
        single = extract_features(storage=str(tmp_path / "threads"), task_runner="threads:1", **common)
    finally:
        torch.set_num_threads(threads)
    fanned = extract_features(storage=str(tmp_path / "dask"), task_runner="dask:2", **common)

    assert fanned["key"] == single["key"]  # the runner is not part of the key
    assert len(fanned["workers"]) == 2, fanned["workers"]  # 8 shards over 2 processes
    a, b = zarr.open_group(single["path"], mode="r"), zarr.open_group(fanned["path"], mode="r")
    assert np.array_equal(a["dense"][:], b["dense"][:])
    assert np.array_equal(a["pooled"][:], b["pooled"][:])
    assert a["done"][:].all() and b["done"][:].all()


def test_unknown_runner_setting_names_the_choices():
    from flows.runner import make_task_runner
    from usseg_core.errors import ConfigError

    with pytest.raises(ConfigError, match="threads"):
        make_task_runner("ray:4")
