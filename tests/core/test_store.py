import json

import pytest

from usseg_core.errors import ConfigError, InputError
from usseg_core.store import ArtifactStore, artifact_key, atomic_write_json


def test_key_depends_on_every_part():
    base = artifact_key("features", 1, {"res": 224}, {"backbone": "abc"})
    assert base == artifact_key("features", 1, {"res": 224}, {"backbone": "abc"})
    assert len(base) == 16
    assert base != artifact_key("features", 2, {"res": 224}, {"backbone": "abc"})
    assert base != artifact_key("features", 1, {"res": 320}, {"backbone": "abc"})
    assert base != artifact_key("features", 1, {"res": 224}, {"backbone": "abd"})
    assert base != artifact_key("knn", 1, {"res": 224}, {"backbone": "abc"})
    # key order in params does not matter
    assert artifact_key("s", 1, {"a": 1, "b": 2}) == artifact_key("s", 1, {"b": 2, "a": 1})


def test_incomplete_artifact_is_never_read_as_complete(tmp_path):
    store = ArtifactStore(tmp_path)
    art = store.begin("features", "abc123", version=1, params={"x": 1}, dataset="d")
    (art.path / "data.bin").write_bytes(b"123")
    assert store.get("features", "abc123") is None
    assert not store.open("features", "abc123").complete
    store.finish(art, n_items=3)
    done = store.get("features", "abc123")
    assert done is not None and done.complete
    assert done.meta["n_items"] == 3 and done.meta["size_bytes"] >= 3
    assert done.meta["params"] == {"x": 1} and "code_version" in done.meta
    # the marker is written after the metadata
    assert (art.path / "_COMPLETE").stat().st_mtime_ns >= (art.path / "meta.json").stat().st_mtime_ns


def test_begin_resumes_existing_folder(tmp_path):
    store = ArtifactStore(tmp_path)
    art = store.begin("s", "k1", version=1, params={})
    (art.path / "partial").write_text("x")
    again = store.begin("s", "k1", version=1, params={})
    assert (again.path / "partial").exists()
    assert again.meta["created"] == art.meta["created"]


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "m.json"
    atomic_write_json(target, {"a": 1})

    class Boom(Exception):
        pass

    def bad_default(obj):
        raise Boom()

    with pytest.raises(TypeError):
        atomic_write_json(target, {"a": object()})
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_find_by_prefix_and_errors(tmp_path):
    store = ArtifactStore(tmp_path)
    store.finish(store.begin("a", "abc111", version=1, params={}))
    store.finish(store.begin("b", "abd222", version=1, params={}))
    assert store.find("abc").stage == "a"
    with pytest.raises(ConfigError, match="ambiguous"):
        store.find("ab")
    with pytest.raises(ConfigError, match="no artifact"):
        store.find("zzz")


def test_paths_never_escape(tmp_path):
    store = ArtifactStore(tmp_path)
    art = store.begin("s", "k", version=1, params={})
    with pytest.raises(InputError, match="escapes"):
        art.file("../../etc/passwd")
    with pytest.raises(ConfigError):
        store.path("s", "../x")
