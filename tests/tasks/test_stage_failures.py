"""What a failed stage leaves (tasks/stage.py run_stage): a full disk is a DiskFull naming the storage, the
artifact, what it holds and what is free, nothing marked complete; an artifact refused before anything
useful was written leaves no folder; partial work a rerun resumes from is kept."""
from __future__ import annotations

import errno
import pickle
import shutil

import numpy as np
import pytest

from tasks.failures import array_bytes
from tasks.stage import ArtifactRef, Stage, run_stage
from usseg_core.errors import DiskFull, InputError
from usseg_core.store import MARKER, ArtifactStore, artifact_key

TOY = Stage("toyfail", 1, "toy.fit")


def _run(storage, body):
    return run_stage(str(storage), TOY, {"a": 1}, None, body, lambda art, hit: ArtifactRef.of(art, str(art.path), hit))


def test_a_full_disk_names_the_storage_the_artifact_and_the_space(tmp_path):
    key = artifact_key("toyfail", 1, {"a": 1}, None)

    def body(work):
        work.art.file("part.bin").write_bytes(b"x" * 3000)  # what was written before the disk filled
        raise OSError(errno.ENOSPC, "No space left on device", str(work.art.file("more.bin")))

    with pytest.raises(DiskFull) as err:
        _run(tmp_path, body)
    full = err.value
    assert full.artifact == f"toyfail/{key}" and full.where == tmp_path
    assert full.written >= 3000 and full.free == pytest.approx(shutil.disk_usage(tmp_path).free, rel=0.01)
    assert str(full).startswith(f"disk full: writing toyfail/{key} in {tmp_path} failed ([Errno 28] No space "
                                "left on device); ")
    assert "free on its disk; free space and rerun the same command" in str(full)
    assert not (tmp_path / "toyfail" / key / MARKER).exists()  # nothing marked done
    assert (tmp_path / "toyfail" / key / "part.bin").exists()  # partial work kept for the rerun
    assert str(pickle.loads(pickle.dumps(full))) == str(full)  # crosses a Dask worker unchanged
    assert _run(tmp_path, lambda work: {}).key == key  # space freed: the same folder is finished


def test_a_wrapped_full_disk_from_a_shard_and_a_zarr_estimate(tmp_path):
    import zarr

    def body(work):
        zarr.create_array(str(work.art.file("f.zarr")), shape=(10, 4), dtype="float16", chunks=(1, 4))
        try:
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
        except OSError as exc:
            raise RuntimeError("shard task failed") from exc  # as a future re-raises it, wrapped

    with pytest.raises(DiskFull) as err:
        _run(tmp_path, body)
    assert err.value.total == 10 * 4 * 2 == array_bytes(tmp_path / "toyfail" / err.value.artifact.split("/")[1])
    assert "[Errno 122] Disk quota exceeded" in str(err.value) and "of about 80 B (uncompressed)" in str(err.value)


def test_bad_input_before_anything_useful_leaves_no_folder(tmp_path):
    def refused(work):
        raise InputError(tmp_path / "x.png", "is not an image")

    with pytest.raises(InputError):
        _run(tmp_path, refused)
    assert not (tmp_path / "toyfail").exists() or not any((tmp_path / "toyfail").iterdir())

    def partial(work):
        np.save(work.art.file("chunk0.npy"), np.zeros(3))
        raise InputError(tmp_path / "y.png", "is not an image")

    with pytest.raises(InputError):
        _run(tmp_path, partial)
    (folder,) = (tmp_path / "toyfail").iterdir()
    assert (folder / "chunk0.npy").exists()  # a rerun resumes from it
