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
    import builtins
    import io
    import os

    target = tmp_path / "m.json"
    atomic_write_json(target, {"a": 1})

    class Boom(Exception):
        pass

    class HalfWriter:
        """A file whose write() puts half the bytes on disk, then fails (a full disk, a kill)."""

        def __init__(self, fh):
            self._fh = fh

        def write(self, data):
            self._fh.write(data[: len(data) // 2])
            self._fh.flush()
            raise Boom()

        def __getattr__(self, name):
            return getattr(self._fh, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._fh.close()

    def failing(opener):
        def wrapped(*args, **kwargs):
            fh = opener(*args, **kwargs)
            mode = args[1] if len(args) > 1 else kwargs.get("mode", "r")
            return HalfWriter(fh) if ("w" in mode or "a" in mode) else fh
        return wrapped

    # every way of opening a file for writing fails half-way (os.fdopen, open, io.open / Path.write_*)
    monkeypatch.setattr(os, "fdopen", failing(os.fdopen))
    monkeypatch.setattr(builtins, "open", failing(builtins.open))
    monkeypatch.setattr(io, "open", failing(io.open))
    with pytest.raises(Boom):
        atomic_write_json(target, {"a": 2, "b": "x" * 1000})
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]
    with pytest.raises(TypeError):  # unserialisable: fails before writing, also leaves nothing
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
