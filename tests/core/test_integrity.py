"""Caches that detect their own damage (docs/architecture.md, "Integrity"), on real Zarr stores.

A flipped byte or a deleted chunk of a feature store, a non-finite value, a truncated ``head.pt``: each is
one error naming the artifact, the item or file, and the folder to delete; ``usseg storage verify`` finds
each of them and exits 4, and exits 0 on a healthy store. Dense features are sharded (8 items per shard
here): the tests find an item's bytes in its shard with their own reading of the shard index.
"""
from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from usseg_core.errors import DamagedArtifact, InputError
from usseg_core.features import FeatureStore, NonFiniteFeatures
from usseg_core.store import FILES, ArtifactStore

N, C, H = 20, 8, 6
KEY = "0123456789abcdef"
HINT = "the cache is damaged: delete {folder} to recompute it (usseg storage verify lists every damaged artifact)"


def _crc32c(data: bytes) -> int:
    """crc32c (Castagnoli, reflected polynomial 0x82F63B78), bit by bit: independent of google_crc32c."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


EMPTY = 2**64 - 1


def _index(shard: Path, n_inner: int = 8) -> np.ndarray:
    """(n_inner, 2) (offset, nbytes) of a shard's inner chunks: the last 16 n + 4 bytes, crc32c checked."""
    data = shard.read_bytes()
    tail = data[-(16 * n_inner + 4):]
    assert int.from_bytes(tail[-4:], "little") == _crc32c(tail[:-4])
    return np.frombuffer(tail[:-4], "<u8").reshape(n_inner, 2)


def _item_bytes(shard: Path, j: int) -> tuple[int, int]:
    """(offset, nbytes) of inner chunk j of a shard."""
    off, size = _index(shard)[j]
    return int(off), int(size)


def _flip(shard: Path, j: int, at: slice = slice(40, 56)) -> None:
    """Flip bytes ``at`` (relative) of inner chunk j of a shard (or of a chunk file: j None)."""
    data = bytearray(shard.read_bytes())
    off = 0 if j is None else _item_bytes(shard, j)[0]
    lo, hi = off + at.start, off + at.stop
    data[lo:hi] = bytes(b ^ 0xFF for b in data[lo:hi])
    shard.write_bytes(bytes(data))


def _forget(shard: Path, j: int, n_inner: int = 8) -> None:
    """Mark inner chunk j of a shard never written (an index entry of all ones, the index's crc32c valid)."""
    data = bytearray(shard.read_bytes())
    index = np.frombuffer(bytes(data[-(16 * n_inner + 4):-4]), "<u8").reshape(n_inner, 2).copy()
    index[j] = EMPTY
    body = index.astype("<u8").tobytes()
    data[-(16 * n_inner + 4):] = body + _crc32c(body).to_bytes(4, "little")
    shard.write_bytes(bytes(data))


def _values(n: int = N, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, C, H, H)).astype(np.float16)


def _fill(path: Path, dense: np.ndarray, shard: int = 8, sharded: bool = True) -> FeatureStore:
    store = FeatureStore.create(path, len(dense), C, H, H, shard_size=shard, sharded=sharded)
    for a, b in store.shards():
        store.write(list(range(a, b)), dense[a:b], dense[a:b].astype(np.float32).mean((2, 3)))
    return store


def _features(storage: Path, dense: np.ndarray | None = None, sharded: bool = True):
    """A complete features artifact holding a real store, as the features stage leaves it."""
    store = ArtifactStore(storage)
    art = store.begin("features", KEY, version=3, params={})
    _fill(art.file("features.zarr"), _values() if dense is None else dense, sharded=sharded)
    store.finish(art, n_items=N)
    return art


def _message(folder: Path, problem: str) -> str:
    return f"{folder.parent.name}/{folder.name}: {problem}; " + HINT.format(folder=folder)


def _readers(path: Path):
    """Every way training reads dense features: direct chunk files, byte ranges through the Zarr store
    (object stores), through Zarr, into memory, one item."""
    def fast(items):
        return FeatureStore(path).read_batch(items)

    def ranges(items):
        from usseg_core.chunk_reads import StoreChunkReads, direct_reader

        store = FeatureStore(path)
        store._files = direct_reader(store.dense, path / "dense", lambda a, b: store._missing("dense", a, b),
                                     local=False)
        assert isinstance(store._files, StoreChunkReads)
        return store.read_batch(items)

    def via_zarr(items):
        store = FeatureStore(path)
        store._files = None
        return store.read_batch(items)

    def memory(items):
        store = FeatureStore(path)
        store.load_all()
        return store.read_batch(items)

    def item(items):
        return np.stack([FeatureStore(path)[i] for i in items])

    return {"fast": fast, "ranges": ranges, "zarr": via_zarr, "memory": memory, "item": item}


def _verify(storage: Path, *key: str):
    from commands.cli import app

    return CliRunner().invoke(app, ["storage", "verify", *key, "--storage", str(storage)])


# --- what is written --------------------------------------------------------------------------------

def test_every_chunk_is_written_with_a_crc32c_of_its_bytes(tmp_path):
    from zarr.codecs import Crc32cCodec, ShardingCodec

    store = _fill(tmp_path / "f.zarr", np.zeros((N, C, H, H), np.float16))  # all equal to the fill value
    for name in ("pooled", "done"):
        assert isinstance(store.group[name].metadata.codecs[-1], Crc32cCodec)
    (sharding,) = store.group["dense"].metadata.codecs
    assert isinstance(sharding, ShardingCodec) and isinstance(sharding.codecs[-1], Crc32cCodec)
    assert sorted(int(p.name) for p in (tmp_path / "f.zarr/dense/c").iterdir()) == [0, 1, 2]  # 20 items / 8
    assert sorted(int(p.name) for p in (tmp_path / "f.zarr/pooled/c").iterdir()) == [0, 1, 2]
    data = (tmp_path / "f.zarr/done/c/1").read_bytes()
    assert int.from_bytes(data[-4:], "little") == _crc32c(data[:-4])
    shard = tmp_path / "f.zarr/dense/c/2/0/0/0"  # items 16-19: four inner chunks, four never written
    index = _index(shard)
    assert (index[:4, 0] != EMPTY).all() and (index[4:] == EMPTY).all()
    raw = shard.read_bytes()
    for off, size in index[:4]:
        chunk = raw[int(off):int(off) + int(size)]
        assert int.from_bytes(chunk[-4:], "little") == _crc32c(chunk[:-4])
    # reopened for writing (a shard task): still every chunk, still checked
    again = FeatureStore(tmp_path / "f.zarr", mode="r+")
    assert again.dense.config.write_empty_chunks and again._files is not None


# --- damaged chunks ---------------------------------------------------------------------------------

@pytest.mark.parametrize("sharded", [True, False], ids=["shards", "chunk-files"])
def test_flipped_bytes_in_a_feature_chunk_are_refused_by_every_reader_and_found_by_verify(tmp_path, sharded):
    storage, dense = tmp_path / "storage", _values()
    art = _features(storage, dense, sharded=sharded)
    where = "features.zarr/dense/c/0/0/0/0" if sharded else "features.zarr/dense/c/5/0/0/0"
    _flip(art.path / where, 5 if sharded else None)  # 16 flipped bytes, as the user measured
    want = _message(art.path, f"item 5 ({where}): checksum mismatch")
    for name, read in _readers(art.path / "features.zarr").items():
        with pytest.raises(DamagedArtifact) as err:
            read([3, 5])
        assert str(err.value) == want, name
        if name != "memory":
            assert np.array_equal(read([3, 6]), dense[[3, 6]]), name  # the rest still reads
    res = _verify(storage)
    assert res.exit_code == 4, res.output
    assert f"features/{KEY}: damaged (item 5 ({where}): checksum mismatch)" in res.output


def test_a_damaged_shard_index_is_refused_naming_the_shard_s_items(tmp_path):
    storage = tmp_path / "storage"
    art = _features(storage)
    shard = art.path / "features.zarr/dense/c/1/0/0/0"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF  # inside the index
    shard.write_bytes(bytes(data))
    want = _message(art.path, "items 8-15 (features.zarr/dense/c/1/0/0/0): shard index checksum mismatch")
    for name, read in _readers(art.path / "features.zarr").items():
        with pytest.raises(DamagedArtifact) as err:
            read([2, 9])
        assert str(err.value) == want, name
    res = _verify(storage)
    assert res.exit_code == 4 and "items 8-15 (features.zarr/dense/c/1/0/0/0): shard index checksum" in res.output


def test_a_deleted_chunk_of_a_done_item_is_damage_not_zeros(tmp_path):
    storage = tmp_path / "storage"
    art = _features(storage)
    _forget(art.path / "features.zarr/dense/c/0/0/0/0", 7)  # item 7's inner chunk gone from its shard
    want = _message(art.path, "item 7 (features.zarr/dense/c/0/0/0/0): missing")
    for name, read in _readers(art.path / "features.zarr").items():
        with pytest.raises(DamagedArtifact) as err:
            read([7])
        assert str(err.value) == want, name
    res = _verify(storage, KEY[:6])
    assert res.exit_code == 4
    assert "item 7 (features.zarr/dense/c/0/0/0/0): missing" in res.output
    (art.path / "features.zarr/dense/c/1/0/0/0").unlink()  # a whole shard (in memory: item 7 comes first)
    for name, read in _readers(art.path / "features.zarr").items():
        if name == "memory":
            continue
        with pytest.raises(DamagedArtifact) as err:
            read([9])
        assert str(err.value) == _message(art.path, "items 8-15 (features.zarr/dense/c/1/0/0/0): missing"), name
    res = _verify(storage)
    assert "items 8-15 (features.zarr/dense/c/1/0/0/0): missing" in res.output


def test_an_item_never_written_still_reads_as_the_fill_value_outside_a_complete_artifact(tmp_path):
    store = FeatureStore.create(tmp_path / "partial.zarr", 24, C, H, H, shard_size=8)
    store.write(list(range(8)), np.ones((8, C, H, H), np.float16), np.ones((8, C), np.float32))
    store.write([8, 9, 10], np.ones((3, C, H, H), np.float16), np.ones((3, C), np.float32))  # a part of a shard
    for name, read in _readers(tmp_path / "partial.zarr").items():
        got = read([3, 9, 12, 20])  # 12: its shard is there, its chunk never written; 20: no shard
        assert (got[0] == 1).all() and (got[1] == 1).all() and (got[2:] == 0).all(), name
    _forget(tmp_path / "partial.zarr/dense/c/1/0/0/0", 1)  # but item 9 is done: its chunk must be there
    with pytest.raises(DamagedArtifact, match=r"item 9 \(partial.zarr/dense/c/1/0/0/0\): missing"):
        FeatureStore(tmp_path / "partial.zarr").read_batch([9])
    (tmp_path / "partial.zarr/dense/c/0/0/0/0").unlink()  # item 3 is done: its shard must be there
    with pytest.raises(DamagedArtifact, match=r"items 0-7 \(partial.zarr/dense/c/0/0/0/0\): missing"):
        FeatureStore(tmp_path / "partial.zarr").read_batch([3])


def test_a_damaged_pooled_chunk_is_refused_naming_its_items(tmp_path):
    art = _features(tmp_path / "storage")
    chunk = art.path / "features.zarr/pooled/c/1/0"
    chunk.write_bytes(chunk.read_bytes()[:-1] + b"\x00")
    with pytest.raises(DamagedArtifact) as err:
        FeatureStore(art.path / "features.zarr").pooled_all()
    assert str(err.value) == _message(art.path, "items 8-15 (features.zarr/pooled/c/1/0): checksum mismatch")
    chunk.unlink()
    with pytest.raises(DamagedArtifact, match=r"items 8-15 \(features.zarr/pooled/c/1/0\): missing"):
        FeatureStore(art.path / "features.zarr").pooled_all()


def test_a_view_bank_names_its_store_and_item(tmp_path):
    from tests.core.test_streaming import _bank

    store = ArtifactStore(tmp_path / "storage")
    bank = _bank(store.path("views", KEY))  # plain.zarr, warped.zarr, draws.json, meta.json
    art = store.finish(store.open("views", KEY))
    shard = art.path / "warped.zarr/dense/c/0/0/0/0"
    off, size = _item_bytes(shard, 4)
    data = bytearray(shard.read_bytes())
    data[off + size - 4:off + size] = b"\x00\x00\x00\x00"  # item 4's crc32c
    shard.write_bytes(bytes(data))
    with pytest.raises(DamagedArtifact) as err:
        bank.read_batch("warped", [1], 1)  # image 1, view 1 of 3: item 4
    assert str(err.value) == _message(art.path, "item 4 (warped.zarr/dense/c/0/0/0/0): checksum mismatch")


# --- non-finite values ------------------------------------------------------------------------------

def test_non_finite_values_are_refused_on_write_and_nothing_is_written(tmp_path):
    store = FeatureStore.create(tmp_path / "f.zarr", 16, C, H, H, shard_size=8)
    dense = _values(8)
    dense[2, 0, 1, 1] = np.nan
    with pytest.raises(NonFiniteFeatures, match=r"item 10: 1 non-finite dense values"):
        store.write(list(range(8, 16)), dense, np.zeros((8, C), np.float32))
    big = _values(8).astype(np.float32)
    big[5, 3, 0, 0] = 1e5  # finite in float32, inf once stored as float16
    with pytest.raises(NonFiniteFeatures, match=r"item 5: 1 non-finite dense values") as err:
        store.write(list(range(8)), big, np.zeros((8, C), np.float32))
    assert pickle.loads(pickle.dumps(err.value)).item == 5
    assert store.missing() == list(range(16)) and not (tmp_path / "f.zarr/dense/c").exists()


def test_non_finite_values_on_disk_are_refused_on_read_and_found_by_verify(tmp_path):
    storage = tmp_path / "storage"
    art = _features(storage)
    raw = FeatureStore(art.path / "features.zarr", mode="r+")
    bad = raw.dense[9]
    bad[0, 0, 0] = np.inf
    raw.dense[9] = bad  # a valid crc over an inf: written before the check, or by another tool
    want = _message(art.path, "item 9 (features.zarr/dense/c/1/0/0/0): 1 non-finite values (nan/inf)")
    for name, read in _readers(art.path / "features.zarr").items():
        with pytest.raises(DamagedArtifact) as err:
            read([2, 9])
        assert str(err.value) == want, name
    res = _verify(storage)
    assert res.exit_code == 4 and "item 9 (features.zarr/dense/c/1/0/0/0): 1 non-finite values" in res.output


# --- files outside Zarr: digests in meta.json, checked on every cache hit ------------------------------

def _head(storage: Path) -> tuple[ArtifactStore, object]:
    store = ArtifactStore(storage)
    art = store.begin("head", KEY, version=1, params={})
    torch.save({"w": torch.arange(1000.0)}, art.file("head.pt"))
    (art.path / "plots").mkdir()
    (art.path / "plots" / "loss.json").write_text("[1, 2]")
    store.finish(art, steps=3)
    return store, art


def test_finish_records_every_file_outside_zarr_and_a_hit_checks_them(tmp_path):
    store, art = _head(tmp_path / "storage")
    head = art.path / "head.pt"
    assert art.meta[FILES] == {
        "head.pt": {"sha256": hashlib.sha256(head.read_bytes()).hexdigest(), "size": head.stat().st_size},
        "plots/loss.json": {"sha256": hashlib.sha256(b"[1, 2]").hexdigest(), "size": 6}}
    assert json.loads((art.path / "meta.json").read_text())[FILES] == art.meta[FILES]
    assert store.get("head", KEY) is not None
    data = head.read_bytes()
    head.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(DamagedArtifact) as err:
        store.get("head", KEY)
    assert isinstance(err.value, InputError)  # exit code 4
    assert str(err.value) == _message(art.path, f"head.pt: {len(data) // 2} bytes, {len(data)} were written")
    with pytest.raises(DamagedArtifact, match="head.pt: "):  # a reader that found the artifact another way
        store.open("head", KEY).file("head.pt")
    head.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, one bit
    with pytest.raises(DamagedArtifact, match="head.pt: sha256 differs"):
        store.get("head", KEY)
    head.unlink()
    with pytest.raises(DamagedArtifact, match="head.pt: missing"):
        store.get("head", KEY)
    assert pickle.loads(pickle.dumps(err.value)).folder == art.path


def test_a_corrupt_meta_json_of_a_complete_artifact_is_damage(tmp_path):
    store, art = _head(tmp_path / "storage")
    (art.path / "meta.json").write_text('{"stage": "he')
    with pytest.raises(DamagedArtifact, match=rf"head/{KEY}: meta.json: corrupt artifact metadata"):
        store.get("head", KEY)


def test_an_artifact_finished_before_digests_is_accepted_and_verify_says_so(tmp_path):
    store, art = _head(tmp_path / "storage")
    del art.meta[FILES]
    art.update_meta()
    assert store.get("head", KEY) is not None
    res = _verify(tmp_path / "storage")
    assert res.exit_code == 0, res.output
    assert f"head/{KEY}: ok (no digests recorded (finished before they were))" in res.output
    (art.path / "head.pt").write_bytes(b"PK\x03\x04 not a zip")  # still loaded by verify: unreadable
    res = _verify(tmp_path / "storage")
    assert res.exit_code == 4 and f"head/{KEY}: damaged (head.pt: unreadable (" in res.output


# --- usseg storage verify ------------------------------------------------------------------------------

def test_verify_of_a_healthy_store_exits_0_with_a_line_per_artifact(tmp_path):
    storage = tmp_path / "storage"
    _features(storage)
    _head(storage)
    ArtifactStore(storage).begin("knn", "fedcba9876543210", version=1, params={})  # incomplete
    res = _verify(storage)
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert f"[2/3] head/{KEY}: ok" in lines and f"[1/3] features/{KEY}: ok" in lines
    assert any(line.startswith("[3/3] knn/fedcba9876543210: incomplete") for line in lines)
    assert lines[-1].startswith("3 artifacts checked in ") and lines[-1].endswith(": 1 incomplete, 2 ok")


def test_extraction_names_the_image_whose_features_were_refused(tmp_path):
    from tasks.extract import naming_images

    store = FeatureStore.create(tmp_path / "f.zarr", 8, C, H, H, shard_size=8)
    dense = _values(8)
    dense[7, 1, 2, 3] = np.inf
    with pytest.raises(InputError) as err, naming_images(lambda i: tmp_path / f"img{i // 5}.png", "features/abc"):
        store.write(list(range(8)), dense, np.zeros((8, C), np.float32))
    assert str(err.value) == (f"{tmp_path / 'img1.png'}: the backbone gave 1 non-finite dense values (nan/inf) for "
                              "it (item 7 of features/abc): refused, nothing of it was written; try fp32 precision, "
                              "or leave the image out")
