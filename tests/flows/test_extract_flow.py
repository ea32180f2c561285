"""The extract-features flow: cache hits, manifest reuse, crash resume (bit-identical), bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image

from tests.conftest import REPO, kill_when

BACKBONE = "vit_small_patch16_224.dino"


def _images(root: Path, n: int, size=(48, 64)) -> Path:
    rng = np.random.default_rng(0)
    folder = root / "imgs" / "images"
    folder.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / f"im{i:03d}.png")
    return root / "imgs"


class _Result:
    def __init__(self, returncode: int, stdout: str, stderr: str = "") -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def _run_extract(data: Path, storage: Path, *extra: str, check: bool = True) -> _Result:
    """`usseg extract` in this process (inside the session's Prefect test harness)."""
    from typer.testing import CliRunner

    from commands.cli import app

    args = ["extract", "--dataset", "directory", "--data-root", str(data), "--split", "all",
            "--backbone", BACKBONE, "--random-weights", "--resolution", "32", "--storage", str(storage),
            "--batch-size", "2", *extra]
    res = CliRunner().invoke(app, args)
    text = res.output + (repr(res.exception) if res.exception else "")
    if check and res.exit_code != 0:
        raise AssertionError(text)
    return _Result(res.exit_code, text)


def _feature_dirs(storage: Path) -> list[Path]:
    return sorted(p for p in (storage / "features").iterdir() if p.is_dir())


def test_second_call_is_a_cache_hit(tmp_path, prefect_harness):
    data = _images(tmp_path, 6)
    storage = tmp_path / "storage"
    first = _run_extract(data, storage)
    assert "extracted" in first.stdout, first.stdout + first.stderr
    second = _run_extract(data, storage)
    assert "cache hit" in second.stdout and "no backbone work" in second.stdout
    (feat,) = _feature_dirs(storage)
    meta = json.loads((feat / "meta.json").read_text())
    assert meta["backbone"] == BACKBONE and meta["backbone_fingerprint"].startswith("random-init")
    group = zarr.open_group(str(feat / "features.zarr"), mode="r")
    assert group["dense"].shape == (6, 384, 2, 2) and group["dense"].dtype == np.float16
    assert group["pooled"].shape == (6, 384) and np.asarray(group["done"][:]).all()
    # pooled = spatial mean of the dense map (in fp32, before the fp16 cast)
    np.testing.assert_allclose(np.asarray(group["pooled"][:]),
                               np.asarray(group["dense"][:]).astype(np.float32).mean((2, 3)), atol=2e-3)


@pytest.mark.slow  # the default suite kills and resumes shards in tests/core/test_sharding.py and a training
# on a bucket in tests/flows/test_object_storage.py; this whole-CLI kill costs ~45 s
def test_killed_extraction_resumes_to_identical_result(tmp_path):
    """A real SIGKILL of `usseg extract` after its first shard (3 shards of 8 items): the resumed store equals
    a clean run's (tests/core/test_sharding.py kills at set points, inside a shard and between shards)."""
    data = _images(tmp_path, 24, size=(96, 128))
    storage = tmp_path / "storage"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "commands.cli", "extract", "--dataset", "directory", "--data-root", str(data),
           "--split", "all", "--backbone", BACKBONE, "--random-weights", "--resolution", "96", "--shard-size", "8",
           "--storage", str(storage), "--batch-size", "2"]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    seen: dict = {"done": None}

    def first_shard_written() -> bool:
        feats = storage / "features"
        if seen["done"] is None and feats.exists():
            dirs = [p for p in feats.iterdir() if (p / "features.zarr" / "done").exists()]
            seen["done"] = dirs[0] / "features.zarr" if dirs else None
        if seen["done"] is None:
            return False
        n_done = int(np.asarray(zarr.open_group(str(seen["done"]), mode="r")["done"][:]).sum())
        return 8 <= n_done < 24  # a shard written (8 items, one write), the next being embedded

    if not kill_when(proc, first_shard_written, timeout=300, interval=0.2):
        pytest.skip("extraction finished before it could be killed (machine too fast for this check)")
    (feat,) = _feature_dirs(storage)
    assert not (feat / "_COMPLETE").exists()  # an interrupted artifact is never complete
    resumed = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "already done" in resumed.stdout + resumed.stderr or "extracted" in resumed.stdout
    clean_storage = tmp_path / "clean"
    subprocess.run([*cmd[:-4], "--storage", str(clean_storage), "--batch-size", "2"], env=env, cwd=REPO,
                   check=True, capture_output=True, timeout=600)
    (clean,) = _feature_dirs(clean_storage)
    assert clean.name == feat.name  # same inputs, same key
    a = zarr.open_group(str(feat / "features.zarr"), mode="r")
    b = zarr.open_group(str(clean / "features.zarr"), mode="r")
    for name in ("dense", "pooled", "done"):
        np.testing.assert_array_equal(np.asarray(a[name][:]), np.asarray(b[name][:]))


def test_corrupt_image_names_the_file_and_skip_policy(tmp_path, prefect_harness):
    data = _images(tmp_path, 4)
    bad = data / "images" / "im002.png"
    bad.write_bytes(bad.read_bytes()[:100])  # truncated
    storage = tmp_path / "storage"
    failed = _run_extract(data, storage, check=False)
    assert failed.returncode != 0
    assert "im002.png" in failed.stdout + failed.stderr
    ok = _run_extract(data, storage, "--on-error", "skip")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    manifests = list((storage / "manifest").glob("*/meta.json"))
    skipped = [json.loads(m.read_text()).get("skipped") for m in manifests]
    assert any(s and "im002.png" in s[0]["path"] for s in skipped)
    (feat,) = _feature_dirs(storage)
    meta = json.loads((feat / "meta.json").read_text())
    assert meta["n_items"] == 3 and "im002.png" in meta["skipped"][0]["path"]
