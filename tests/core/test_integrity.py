"""Caches that detect their own damage (docs/architecture.md, "Integrity"), on real Zarr stores.

A flipped byte or a deleted chunk of a feature store, a non-finite value, a truncated ``head.pt``: each is
one error naming the artifact, the item or file, and the folder to delete; ``usseg storage verify`` finds
each of them and exits 4, and exits 0 on a healthy store.
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


def _values(n: int = N, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, C, H, H)).astype(np.float16)


def _fill(path: Path, dense: np.ndarray, shard: int = 8) -> FeatureStore:
    store = FeatureStore.create(path, len(dense), C, H, H, shard_size=shard)
    for a, b in store.shards():
        store.write(list(range(a, b)), dense[a:b], dense[a:b].astype(np.float32).mean((2, 3)))
    return store


def _features(storage: Path, dense: np.ndarray | None = None):
    """A complete features artifact holding a real store, as the features stage leaves it."""
    store = ArtifactStore(storage)
    art = store.begin("features", KEY, version=2, params={})
    _fill(art.file("features.zarr"), _values() if dense is None else dense)
    store.finish(art, n_items=N)
    return art


def _message(folder: Path, problem: str) -> str:
    return f"{folder.parent.name}/{folder.name}: {problem}; " + HINT.format(folder=folder)


def _readers(path: Path):
    """Every way training reads dense features: direct chunk files, through Zarr, into memory, one item."""
    def fast(items):
        return FeatureStore(path).read_batch(items)

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

    return {"fast": fast, "zarr": via_zarr, "memory": memory, "item": item}


def _verify(storage: Path, *key: str):
    from commands.cli import app

    return CliRunner().invoke(app, ["storage", "verify", *key, "--storage", str(storage)])


# --- what is written --------------------------------------------------------------------------------

def test_every_chunk_is_written_with_a_crc32c_of_its_bytes(tmp_path):
    from zarr.codecs import Crc32cCodec

    store = _fill(tmp_path / "f.zarr", np.zeros((N, C, H, H), np.float16))  # all equal to the fill value
    for name in ("dense", "pooled", "done"):
        assert isinstance(store.group[name].metadata.codecs[-1], Crc32cCodec)
    assert sorted(int(p.name) for p in (tmp_path / "f.zarr/dense/c").iterdir()) == list(range(N))
    assert sorted(int(p.name) for p in (tmp_path / "f.zarr/pooled/c").iterdir()) == [0, 1, 2]
    data = (tmp_path / "f.zarr/done/c/1").read_bytes()
    assert int.from_bytes(data[-4:], "little") == _crc32c(data[:-4])
    # reopened for writing (a shard task): still every chunk, still checked
    again = FeatureStore(tmp_path / "f.zarr", mode="r+")
    assert again.dense.config.write_empty_chunks and again._files is not None


# --- damaged chunks ---------------------------------------------------------------------------------

def test_flipped_bytes_in_a_feature_chunk_are_refused_by_every_reader_and_found_by_verify(tmp_path):
    storage, dense = tmp_path / "storage", _values()
    art = _features(storage, dense)
    chunk = art.path / "features.zarr/dense/c/5/0/0/0"
    data = bytearray(chunk.read_bytes())
    data[40:56] = bytes(b ^ 0xFF for b in data[40:56])  # 16 flipped bytes, as the user measured
    chunk.write_bytes(bytes(data))
    want = _message(art.path, "item 5 (features.zarr/dense/c/5/0/0/0): checksum mismatch")
    for name, read in _readers(art.path / "features.zarr").items():
        with pytest.raises(DamagedArtifact) as err:
            read([3, 5])
        assert str(err.value) == want, name
        if name != "memory":
            assert np.array_equal(read([3, 6]), dense[[3, 6]]), name  # the rest still reads
    res = _verify(storage)
    assert res.exit_code == 4, res.output
    assert f"features/{KEY}: damaged (item 5 (features.zarr/dense/c/5/0/0/0): checksum mismatch)" in res.output


def test_a_deleted_chunk_of_a_done_item_is_damage_not_zeros(tmp_path):
    storage = tmp_path / "storage"
    art = _features(storage)
    (art.path / "features.zarr/dense/c/7/0/0/0").unlink()
    want = _message(art.path, "item 7 (features.zarr/dense/c/7/0/0/0): missing")
    for name, read in _readers(art.path / "features.zarr").items():
        with pytest.raises(DamagedArtifact) as err:
            read([7])
        assert str(err.value) == want, name
    res = _verify(storage, KEY[:6])
    assert res.exit_code == 4
    assert "item 7 (features.zarr/dense/c/7/0/0/0): missing" in res.output


def test_an_item_never_written_still_reads_as_the_fill_value_outside_a_complete_artifact(tmp_path):
    store = FeatureStore.create(tmp_path / "partial.zarr", 16, C, H, H, shard_size=8)
    store.write(list(range(8)), np.ones((8, C, H, H), np.float16), np.ones((8, C), np.float32))
    for name, read in _readers(tmp_path / "partial.zarr").items():
        got = read([3, 12])
        assert (got[0] == 1).all() and (got[1] == 0).all(), name
    (tmp_path / "partial.zarr/dense/c/3/0/0/0").unlink()  # but item 3 is done: its chunk must be there
    with pytest.raises(DamagedArtifact, match=r"item 3 \(partial.zarr/dense/c/3/0/0/0\): missing"):
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
    chunk = art.path / "warped.zarr/dense/c/4/0/0/0"
    chunk.write_bytes(chunk.read_bytes()[:-4] + b"\x00\x00\x00\x00")
    with pytest.raises(DamagedArtifact) as err:
        bank.read_batch("warped", [1], 1)  # image 1, view 1 of 3: item 4
    assert str(err.value) == _message(art.path, "item 4 (warped.zarr/dense/c/4/0/0/0): checksum mismatch")


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
    want = _message(art.path, "item 9 (features.zarr/dense/c/9/0/0/0): 1 non-finite values (nan/inf)")
    for name, read in _readers(art.path / "features.zarr").items():
        with pytest.raises(DamagedArtifact) as err:
            read([2, 9])
        assert str(err.value) == want, name
    res = _verify(storage)
    assert res.exit_code == 4 and "item 9 (features.zarr/dense/c/9/0/0/0): 1 non-finite values" in res.output


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
