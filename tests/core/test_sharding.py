"""Sharded feature stores (docs/architecture.md, "Feature store"): about N / S objects per array, one writer
per shard (Dask workers filling disjoint shards give the single-process arrays), and exact resume after a
real kill (SIGKILL) between two shards and inside one. Damage inside a shard: tests/core/test_integrity.py.

The "backbone" here is average pooling times a per-channel scale: elementwise after the pooling, so an
item's features are the same bits whatever batch it is embedded in (a resumed run batches differently).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from usseg_core.chunk_reads import direct_reader
from usseg_core.features import FeatureStore, extract_into

REPO = Path(__file__).resolve().parents[2]
C, SIDE, STRIDE = 6, 16, 4  # features (C, 4, 4) of (3, 16, 16) images
ITEM_BYTES = C * (SIDE // STRIDE) ** 2 * 2


class Pool(torch.nn.Module):
    """(B, 3, 16, 16) -> (B, 6, 4, 4): 4x4 average pooling, channels twice, each scaled."""

    dim, stride = C, STRIDE

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.linspace(0.5, 1.5, C))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, STRIDE).repeat(1, 2, 1, 1) * self.scale[None, :, None, None]


def load_item(i: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(i).random((3, SIDE, SIDE), dtype=np.float32))


def create(path: Path, n: int, shard: int, sharded: bool = True) -> FeatureStore:
    return FeatureStore.create(path, n, C, SIDE // STRIDE, SIDE // STRIDE, shard_size=shard, sharded=sharded)


def fill(path: Path, n: int, shard: int, sharded: bool = True, **kw) -> FeatureStore:
    store = create(path, n, shard, sharded)
    extract_into(store, Pool(), load_item, range(n), batch_size=4, **kw)
    return FeatureStore(path)


def write_shard(path: str, start: int, stop: int) -> tuple[int, int, int]:
    """A Dask task: embed and write the items of one shard; returns (start, stop, process id)."""
    store = FeatureStore(path, mode="r+")
    extract_into(store, Pool(), load_item, store.missing(start, stop), batch_size=3)
    return start, stop, os.getpid()


def _arrays(path: Path) -> dict[str, np.ndarray]:
    store = FeatureStore(path)
    return {"dense": np.asarray(store.dense[:]).view(np.uint16), "pooled": np.asarray(store.pooled[:]).view(np.uint32),
            "done": np.asarray(store.done[:])}


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_an_array_of_n_items_is_n_over_s_objects_and_reads_the_same(tmp_path):
    sharded = fill(tmp_path / "s.zarr", 200, 64)
    chunked = fill(tmp_path / "c.zarr", 200, 64, sharded=False)
    for name in ("dense", "pooled", "done"):  # ceil(200 / 64) = 4 objects each, and the array's zarr.json
        assert len(_files(tmp_path / "s.zarr" / name)) == 4 + 1, name
    assert len(_files(tmp_path / "c.zarr" / "dense")) == 200 + 1  # the layout before shards: one per item
    # the whole store: 4 zarr.json, 12 objects; before: 212 (the 214 files of the issue, with meta.json, _COMPLETE)
    assert len(_files(tmp_path / "s.zarr")) == 16 and len(_files(tmp_path / "c.zarr")) == 212
    assert sharded.group["dense"].shards == (64, C, 4, 4) and sharded._files is not None
    idx = np.array([199, 3, 64, 3, 130, 0])
    want = torch.stack([load_item(int(i)) for i in idx])
    want = Pool()(want).detach().numpy().astype(np.float16)
    via_zarr = FeatureStore(tmp_path / "s.zarr")
    via_zarr._files = None
    ranges = FeatureStore(tmp_path / "s.zarr")  # byte ranges through the Zarr store, as from an object store
    ranges._files = direct_reader(ranges.dense, tmp_path / "s.zarr/dense", lambda a, b: None, local=False)
    for store in (sharded, chunked, via_zarr, ranges):  # shard files, chunk files, Zarr, ranges: the same bits
        assert np.array_equal(store.read_batch(idx).view(np.uint16), want.view(np.uint16))
    assert np.array_equal(sharded.pooled_all(), chunked.pooled_all())


def test_a_write_must_stay_inside_one_shard(tmp_path):
    store = create(tmp_path / "f.zarr", 20, 8)
    with pytest.raises(ValueError, match="inside one shard"):
        store.write([6, 7, 8], np.zeros((3, C, 4, 4), np.float16), np.zeros((3, C), np.float32))


def test_extraction_writes_each_shard_once(tmp_path, monkeypatch):
    writes = []
    store = create(tmp_path / "f.zarr", 40, 16)
    real = FeatureStore.write
    monkeypatch.setattr(FeatureStore, "write", lambda self, idx, d, p: (writes.append(list(idx)), real(self, idx, d, p)))
    extract_into(store, Pool(), load_item, range(40), batch_size=4)  # 10 batches of 4
    assert writes == [list(range(0, 16)), list(range(16, 32)), list(range(32, 40))]
    writes.clear()
    store = create(tmp_path / "g.zarr", 40, 16)
    extract_into(store, Pool(), load_item, range(40), batch_size=4, flush_bytes=8 * ITEM_BYTES)
    assert writes == [list(range(a, a + 8)) for a in range(0, 40, 8)]  # at most 8 items held


# --- crash resume: a real SIGKILL at a set point, then the rest; equal to an uninterrupted run -------------

KILLER = textwrap.dedent("""
    import os, signal, sys
    from tests.core.test_sharding import Pool, load_item
    from usseg_core.features import FeatureStore, extract_into

    path, kill_after, flush = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

    class Killed(FeatureStore):
        written = 0

        def write(self, indices, dense, pooled):
            super().write(indices, dense, pooled)
            Killed.written += len(indices)
            if Killed.written >= kill_after:  # done marks are on disk: the process dies here
                os.kill(os.getpid(), signal.SIGKILL)

    extract_into(Killed(path, mode="r+"), Pool(), load_item, range(40), batch_size=4, flush_bytes=flush)
""")


@pytest.mark.parametrize("where, kill_after, flush_items, done_at_kill", [
    ("between shards", 16, 10**6, 16),  # shard 0 written whole, shards 1 and 2 never begun on disk
    ("inside a shard", 24, 8, 24),  # shard 1 half written (its first 8 items), held items lost
], ids=["between-shards", "inside-a-shard"])
def test_a_killed_extraction_resumes_item_by_item_to_the_same_arrays(tmp_path, where, kill_after, flush_items,
                                                                     done_at_kill):
    path = tmp_path / "f.zarr"
    create(path, 40, 16)
    proc = subprocess.run([sys.executable, "-c", KILLER, str(path), str(kill_after), str(flush_items * ITEM_BYTES)],
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    store = FeatureStore(path, mode="r+")
    assert store.missing() == list(range(done_at_kill, 40)), where
    shards = _files(path / "dense")
    assert shards == ["c/0/0/0/0", "zarr.json"] if where == "between shards" else [
        "c/0/0/0/0", "c/1/0/0/0", "zarr.json"], shards
    resumed = []
    extract_into(store, Pool(), load_item, store.missing(), batch_size=4,
                 progress=lambda k: resumed.append(k))
    assert sum(resumed) == 40 - done_at_kill  # only the items not written were embedded again
    clean = fill(tmp_path / "clean.zarr", 40, 16)
    got, want = _arrays(path), _arrays(tmp_path / "clean.zarr")
    for name in want:
        assert np.array_equal(got[name], want[name]), (where, name)
    assert clean.is_complete()
    assert not [f for f in _files(path) if f.endswith(".partial")]  # no temporary object left behind


def test_a_shard_write_that_fails_half_way_leaves_the_shard_as_it_was(tmp_path, monkeypatch):
    """A write into a shard replaces the object at once (zarr's LocalStore: a temporary file, then a rename):
    a write that dies half way (a full disk, a kill) keeps the items written before, and marks nothing done."""
    from zarr.storage import _local

    fill_path = tmp_path / "f.zarr"
    store = create(fill_path, 12, 16)
    extract_into(store, Pool(), load_item, range(8), batch_size=4)
    before = (fill_path / "dense/c/0/0/0/0").read_bytes()

    def half(path, value, exclusive=False):  # half the bytes reach the temporary file, then the write fails
        with _local._atomic_write(path, "wb", exclusive=exclusive) as f:
            f.write(value.as_buffer_like()[: len(value) // 2])
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(_local, "_put", half)
    with pytest.raises(OSError, match="No space"):
        extract_into(store, Pool(), load_item, range(8, 12), batch_size=4)
    monkeypatch.undo()
    assert (fill_path / "dense/c/0/0/0/0").read_bytes() == before
    store = FeatureStore(fill_path, mode="r+")
    assert store.missing() == [8, 9, 10, 11]
    extract_into(store, Pool(), load_item, store.missing(), batch_size=4)
    fill(tmp_path / "clean.zarr", 12, 16)
    got, want = _arrays(fill_path), _arrays(tmp_path / "clean.zarr")
    for name in want:
        assert np.array_equal(got[name], want[name]), name
    assert not [f for f in _files(fill_path) if f.endswith(".partial")]


# --- one writer per shard: Dask workers (a real local cluster) fill disjoint shards --------------------------

@pytest.mark.timeout(300)
def test_dask_workers_filling_disjoint_shards_give_the_single_process_arrays(tmp_path):
    from distributed import Client, LocalCluster

    single = fill(tmp_path / "single.zarr", 45, 8)  # 6 shards, the last of 5 items
    store = create(tmp_path / "dask.zarr", 45, 8)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        workers = sorted(client.scheduler_info()["workers"])
        futures = [client.submit(write_shard, str(tmp_path / "dask.zarr"), a, b, workers=[workers[k % 2]], pure=False)
                   for k, (a, b) in enumerate(store.shards())]  # shard k on worker k % 2
        results = client.gather(futures)
    assert [(a, b) for a, b, _ in results] == store.shards()
    assert len({pid for _, _, pid in results}) == 2 and os.getpid() not in {pid for _, _, pid in results}
    got, want = _arrays(tmp_path / "dask.zarr"), _arrays(tmp_path / "single.zarr")
    for name in want:
        assert np.array_equal(got[name], want[name]), name
    assert single.is_complete() and len(_files(tmp_path / "dask.zarr" / "dense")) == 6 + 1


def test_the_command_line_default_is_the_store_s_shard_size():
    from usseg_core.features import SHARD_SIZE
    from usseg_core.spec import ExtractSpec

    assert ExtractSpec.model_fields["shard_size"].default == SHARD_SIZE == 128
