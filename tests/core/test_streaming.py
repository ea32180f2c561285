"""Training that streams: batched chunk reads, the read-ahead planner, the in-memory / streamed choice.

Streamed (every batch read from Zarr) and in-memory reads must give the same batches bit for bit, hence
the same trained heads, and a run interrupted while batches were read ahead must resume bit-identically.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from usseg_core.errors import ConfigError
from usseg_core.features import (IN_MEMORY, MEMORY_ENV, STREAMED, ConcatFeatures, FeatureStore, choose_read_mode,
                                 memory_budget, read_items)
from usseg_core.heads import HeadInputs, get_head
from usseg_core.heads.picie_train import PicieMethod, train_picie_head
from usseg_core.heads.stego import StegoConfig
from usseg_core.heads.stego_train import StegoMethod, train_stego
from usseg_core.trainer import Prefetcher, TrainingMethod, run_training
from usseg_core.viewbank import DRAWS_FILE, PLAIN, WARPED, ViewBank, ViewBankConfig, draw_views, save_draws

pytestmark = pytest.mark.usefixtures("one_thread")

N, C, H = 30, 8, 6


def _bits(a) -> np.ndarray:
    a = a.numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    return a.view(np.uint16 if a.dtype == np.float16 else np.uint32)


def _store(path: Path, n: int = N, seed: int = 0, shard: int = 8) -> FeatureStore:
    rng = np.random.default_rng(seed)
    dense = rng.normal(size=(n, C, H, H)).astype(np.float16)
    store = FeatureStore.create(path, n, C, H, H, shard_size=shard)
    for a, b in store.shards():
        store.write(list(range(a, b)), dense[a:b], dense[a:b].astype(np.float32).mean((2, 3)))
    return FeatureStore(path)


def _bank(path: Path, n_images: int = 10, n_views: int = 3, seed: int = 0) -> ViewBank:
    """A real view-bank folder (plain/warped Zarr stores, draws.json) with random features."""
    path.mkdir(parents=True)
    _store(path / PLAIN, n_images * n_views, seed)
    _store(path / WARPED, n_images * n_views, seed + 1)
    cfg = ViewBankConfig(n_views=n_views)
    save_draws(path / DRAWS_FILE, [draw_views(cfg, f"img{i}", (4 * H, 4 * H)) for i in range(n_images)])
    (path / "meta.json").write_text(json.dumps({"view": {"policy": "full", "resolution": 4 * H}}))
    return ViewBank(path)


@pytest.fixture()
def store(tmp_path) -> FeatureStore:
    return _store(tmp_path / "f.zarr")


# --- batched reads ---------------------------------------------------------------------------------

def test_read_batch_equals_item_reads_for_unsorted_indices_with_repeats(store, tmp_path):
    idx = np.array([17, 3, 3, 29, 0, 17, 8, 3])
    want = np.stack([np.asarray(store.dense[int(i)]) for i in idx])
    got = store.read_batch(idx)
    assert got.dtype == np.float16 and got.shape == (8, C, H, H)
    assert np.array_equal(_bits(got), _bits(want))
    into = store.read_batch(idx, out=np.empty((8, C, H, H), np.float32))  # cast once, same values
    assert np.array_equal(into, want.astype(np.float32))
    assert store.read_batch([]).shape == (0, C, H, H)
    with pytest.raises(IndexError, match="30"):
        store.read_batch([0, 30])
    assert store.load_all() and store.in_memory
    assert np.array_equal(_bits(store.read_batch(idx)), _bits(want))
    # several stores as one: one read per store, values where the indices say
    other = _store(tmp_path / "g.zarr", n=12, seed=5)
    both = ConcatFeatures([store, other])
    cat = np.array([35, 2, 41, 2, 30, 29])
    want = np.stack([np.asarray(both[int(i)]) for i in cat])
    assert np.array_equal(_bits(both.read_batch(cat)), _bits(want))
    assert np.array_equal(_bits(read_items([np.asarray(both[int(i)]) for i in range(42)], cat)), _bits(want))


def test_direct_chunk_reads_equal_zarr_reads_and_unwritten_items_hold_the_fill_value(store, tmp_path):
    assert store._files is not None  # the layout FeatureStore.create writes: chunk files decoded directly
    idx = np.array([5, 1, 5, 22])
    direct = store.read_batch(idx)
    store._files = None  # any other layout reads through Zarr
    assert np.array_equal(_bits(store.read_batch(idx)), _bits(direct))
    partial = FeatureStore.create(tmp_path / "partial.zarr", 16, C, H, H, shard_size=8)
    partial.write(list(range(8)), np.ones((8, C, H, H), np.float16), np.ones((8, C), np.float32))
    got = FeatureStore(tmp_path / "partial.zarr").read_batch([3, 12])
    assert (got[0] == 1).all() and (got[1] == 0).all()


def test_view_bank_batches_read_the_recorded_items(tmp_path):
    bank = _bank(tmp_path / "bank")
    idx, vs = np.array([4, 1, 4, 9]), np.array([2, 0, 1, 2])
    want = np.stack([bank.warped(int(i), int(v)) for i, v in zip(idx, vs)])
    assert np.array_equal(_bits(bank.read_batch("warped", idx, vs)), _bits(want))
    assert torch.equal(bank.warped_batch(idx, vs), torch.from_numpy(want.astype(np.float32)))
    assert torch.equal(bank.plain_batch(idx, 1), torch.from_numpy(
        np.stack([bank.plain(int(i), 1) for i in idx]).astype(np.float32)))
    with pytest.raises(ConfigError, match="plain"):
        bank.read_batch("base", idx, vs)


# --- the in-memory / streamed choice ---------------------------------------------------------------

def test_mode_choice_follows_the_memory_budget(store, tmp_path, monkeypatch):
    bank = _bank(tmp_path / "bank")
    total = store.nbytes + bank.nbytes
    assert store.nbytes == N * C * H * H * 2
    choice = choose_read_mode([store, bank], max_bytes=total)
    assert choice.mode == IN_MEMORY and store.in_memory and bank.in_memory and choice.nbytes == total
    choice = choose_read_mode([store, bank], max_bytes=total - 1)  # together too big: everything streams
    assert choice.mode == STREAMED and not store.in_memory and not bank.in_memory
    assert "streamed" in str(choice) and MEMORY_ENV in str(choice)
    monkeypatch.setenv(MEMORY_ENV, "512M")
    assert memory_budget() == 512 << 20
    monkeypatch.setenv(MEMORY_ENV, "0")
    assert choose_read_mode([store]).mode == STREAMED
    monkeypatch.setenv(MEMORY_ENV, "1.5G")
    assert memory_budget() == 3 << 29
    monkeypatch.setenv(MEMORY_ENV, "lots")
    with pytest.raises(ConfigError, match=MEMORY_ENV):
        memory_budget()
    monkeypatch.delenv(MEMORY_ENV)
    assert memory_budget() == 8 << 30


# --- STEGO: same batches, same head, bit-identical resume while streaming ---------------------------

def _knn(n: int = N, k: int = 8) -> np.ndarray:
    rng = np.random.default_rng(1)
    return np.concatenate([np.arange(n)[:, None], rng.integers(0, n, size=(n, k - 1))], axis=1)


def _stego_config(**kw) -> StegoConfig:
    base = dict(dim=4, batch_size=8, steps=9, feature_samples=3, neg_samples=2, log_every=1, checkpoint_every=3,
                shifts=(0.3, 0.3, 0.3))
    return StegoConfig(**{**base, **kw})


def _plans_and_batches(method: TrainingMethod, steps: int, depth: int = 3) -> list:
    feed = Prefetcher(method, 0, steps, depth)
    try:
        return [feed.next() for _ in range(steps)]
    finally:
        feed.close()


def _same_run(a: list, b: list) -> None:
    assert len(a) == len(b)
    for (plan_a, batch_a), (plan_b, batch_b) in zip(a, b):
        for x, y in zip(plan_a, plan_b):
            assert np.array_equal(x, y)
        batch_a = batch_a if isinstance(batch_a, tuple) else (batch_a,)
        batch_b = batch_b if isinstance(batch_b, tuple) else (batch_b,)
        for x, y in zip(batch_a, batch_b, strict=True):
            assert x.dtype == torch.float32 and np.array_equal(_bits(x), _bits(y))


def test_stego_streamed_and_in_memory_batches_are_identical(store):
    cfg, knn = _stego_config(), _knn()
    streamed = _plans_and_batches(StegoMethod(store, knn, 2, cfg, (0.3,) * 3, torch.device("cpu"), None), 9)
    store.load_all()
    in_memory = _plans_and_batches(StegoMethod(store, knn, 2, cfg, (0.3,) * 3, torch.device("cpu"), None), 9)
    _same_run(streamed, in_memory)
    plan, batch = streamed[0]
    want = np.stack([np.asarray(store.dense[int(i)]) for i in np.concatenate([plan.idx, plan.pos])])
    assert np.array_equal(batch.numpy(), want.astype(np.float32))  # images, then their positives


def _equal_states(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_stego_trains_the_same_head_streamed_in_memory_and_from_arrays(store):
    cfg, knn = _stego_config(), _knn()
    streamed = train_stego(store, knn, 2, cfg, device="cpu", progress=False)
    arrays = train_stego([np.asarray(store.dense[i]) for i in range(N)], knn, 2, cfg, device="cpu", progress=False)
    store.load_all()
    in_memory = train_stego(store, knn, 2, cfg, device="cpu", progress=False)
    for other in (arrays, in_memory):
        _equal_states(streamed.head_state, other.head_state)
        _equal_states(streamed.cluster_state, other.cluster_state)
        assert streamed.history == other.history


class Interrupt(Exception):
    pass


def _stop_at(step: int):
    def on_step(s, stats):
        assert isinstance(stats["loss"], float)  # on_step sees floats
        if s == step:
            raise Interrupt
    return on_step


def test_streamed_stego_resumes_bit_identical_after_an_interrupt(store, tmp_path):
    cfg, knn = _stego_config(), _knn()  # 30 items / batch 8: an epoch every 3 steps, checkpoints every 3
    full = train_stego(store, knn, 2, cfg, device="cpu", progress=False)
    ckpt = tmp_path / "checkpoint.pt"
    with pytest.raises(Interrupt):  # batches of steps 6..8 were already planned and read at step 5
        train_stego(store, knn, 2, cfg, checkpoint_path=ckpt, device="cpu", progress=False, on_step=_stop_at(5))
    saved = torch.load(ckpt, weights_only=True)
    assert saved["step"] == 3
    # the planning state is the one after step 3's plan, not after the plans read ahead
    probe = StegoMethod(store, knn, 2, cfg, (0.3,) * 3, torch.device("cpu"), None)
    for s in range(3):
        probe.plan(s)
    assert saved["method_state"]["numpy_rng"] == probe.rng.bit_generator.state
    assert saved["method_state"]["cursor"] == probe.epochs.cursor
    resumed = train_stego(store, knn, 2, cfg, checkpoint_path=ckpt, device="cpu", progress=False)
    _equal_states(full.head_state, resumed.head_state)
    _equal_states(full.cluster_state, resumed.cluster_state)
    assert full.history == resumed.history


def test_read_ahead_depth_changes_nothing(store):
    cfg, knn = _stego_config(steps=5), _knn()
    results = []
    for depth in (1, 4):
        torch.manual_seed(0)
        method = StegoMethod(store, knn, 2, cfg, (0.3,) * 3, torch.device("cpu"), None)
        results.append(run_training(method, cfg.to_dict(), steps=5, checkpoint_every=100, log_every=1,
                                    progress=False, prefetch=depth))
    _equal_states(results[0].states["head"], results[1].states["head"])
    assert results[0].history == results[1].history


def test_a_failed_read_surfaces_in_the_training_loop(store):
    class Broken(StegoMethod):
        def read(self, plan):
            raise OSError("disk on fire")

    method = Broken(store, _knn(), 2, _stego_config(), (0.3,) * 3, torch.device("cpu"), None)
    with pytest.raises(OSError, match="disk on fire"):
        run_training(method, {}, steps=3, checkpoint_every=100, log_every=1, progress=False)


# --- a bank head: PiCIE on a real view bank ---------------------------------------------------------

def _picie_config(**kw):
    base = dict(dim=4, epochs=2, batch_size=4, kmeans_samples=200, kmeans_iters=3, checkpoint_every=2, log_every=1)
    return get_head("picie").config("synthetic", {**base, **kw})


def test_picie_streamed_and_in_memory_batches_and_heads_are_identical(tmp_path):
    bank = _bank(tmp_path / "bank")  # 10 images / batch 4: 2 steps per epoch
    cfg = _picie_config()
    plan_run = _plans_and_batches(PicieMethod([bank], 2, cfg["picie"], torch.device("cpu")), 4)
    streamed = train_picie_head(HeadInputs(n_classes=2, views=[bank]), cfg, device="cpu", progress=False)
    assert bank.load_all() and bank.in_memory
    _same_run(plan_run, _plans_and_batches(PicieMethod([bank], 2, cfg["picie"], torch.device("cpu")), 4))
    in_memory = train_picie_head(HeadInputs(n_classes=2, views=[bank]), cfg, device="cpu", progress=False)
    _equal_states(streamed.payload["head"], in_memory.payload["head"])
    assert torch.equal(streamed.payload["centroids"], in_memory.payload["centroids"])
    assert streamed.history == in_memory.history
    # the epoch's view pairs come with its first plan: new pairs at each epoch, views a != b
    (p0, _), (p1, _), (p2, _) = plan_run[:3]
    assert p0.pairs is p1.pairs and p2.pairs is not p0.pairs and (p0.a != p0.b).all()


def test_streamed_picie_resumes_bit_identical_at_an_epoch_boundary(tmp_path):
    bank = _bank(tmp_path / "bank")
    cfg = _picie_config(epochs=3)
    full = train_picie_head(HeadInputs(n_classes=2, views=[bank]), cfg, device="cpu", progress=False)
    ckpt = tmp_path / "checkpoint.pt"
    with pytest.raises(Interrupt):  # step 4 is the first of epoch 2: its pairs were drawn ahead
        train_picie_head(HeadInputs(n_classes=2, views=[bank]), cfg, checkpoint_path=ckpt, device="cpu",
                         progress=False, on_step=_stop_at(3))
    assert torch.load(ckpt, weights_only=True)["step"] == 2
    resumed = train_picie_head(HeadInputs(n_classes=2, views=[bank]), cfg, checkpoint_path=ckpt, device="cpu",
                               progress=False)
    _equal_states(full.payload["head"], resumed.payload["head"])
    assert full.history == resumed.history
