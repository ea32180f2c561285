"""The store on object storage: every command on ``--storage s3://…`` against a real S3 server (SeaweedFS on
127.0.0.1, tests/s3server.py), two machines sharing one bucket (two ``$USSEG_CACHE_DIR``), a killed
training resumed on the other machine from the bucket, two concurrent writers, the bounded mirror."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import zarr
from typer.testing import CliRunner

from tests.conftest import REPO, kill_when

BACKBONE = "vit_small_patch16_224.dino"


def _cli(*args: str, ok: bool = True):
    from commands.cli import app

    res = CliRunner().invoke(app, list(args))
    text = res.output + (repr(res.exception) if res.exception and not isinstance(res.exception, SystemExit) else "")
    if ok and res.exit_code != 0:
        raise AssertionError(text)
    return res.exit_code, text


def _remote(url: str):
    from usseg_core.remote import RemoteStore

    return RemoteStore(url)


def _committed(url: str) -> dict[str, str]:
    """``{"stage/key": attempt}`` of every artifact committed on the bucket."""
    remote, out = _remote(url), {}
    for stage in remote.list_dirs(""):
        for key in remote.list_dirs(stage):
            record = remote.commit_record(stage, key)
            if record:
                out[f"{stage}/{key}"] = record["attempt"]
    return out


def _run_args(url: str, data: Path, results: Path, *extra: str) -> list[str]:
    return ["run", "stego", "--dataset", "synthetic", "--data-root", str(data), "--train-split", "train",
            "--eval-split", "val", "--resolution", "64", "--storage", url, "--results", str(results),
            "--set", "steps=20", "--set", "batch_size=4", "--no-crf", *extra]


def test_a_run_on_a_bucket_and_a_second_machine_that_finds_every_artifact(s3, synthetic_small, tmp_path,
                                                                          monkeypatch, prefect_harness):
    first = tmp_path / "first.csv"
    _cli(*_run_args(s3.url, synthetic_small, first))
    committed = _committed(s3.url)
    stages = {k.split("/")[0] for k in committed}
    assert {"manifest", "features", "knn", "head", "kmeans", "linear-probe", "evaluation"} <= stages
    # the bucket holds ordinary files and Zarr stores: zarr's own ObjectStore opens the features there
    from obstore.store import from_url
    from zarr.storage import ObjectStore

    feat_key = sorted(k for k in committed if k.startswith("features/"))[0]
    feat_url = f"{s3.url}/{feat_key}/{committed[feat_key]}/features.zarr"
    on_bucket = zarr.open_group(ObjectStore(from_url(feat_url), read_only=True), mode="r")
    mirror = zarr.open_group(str(s3.cache / "s3" / "usseg" / s3.url.split("/", 3)[3] / feat_key / "features.zarr"),
                             mode="r")
    np.testing.assert_array_equal(np.asarray(on_bucket["dense"][:]), np.asarray(mirror["dense"][:]))

    # another machine: an empty mirror, the same bucket. Every artifact is found; no backbone work.
    monkeypatch.setenv("USSEG_CACHE_DIR", str(tmp_path / "machine2"))
    second = tmp_path / "second.csv"
    _cli(*_run_args(s3.url, synthetic_small, second))
    pd.testing.assert_frame_equal(pd.read_csv(first), pd.read_csv(second))
    assert _committed(s3.url) == committed  # nothing new was written
    fetched = {p.parent.parent.name + "/" + p.parent.name for p in (tmp_path / "machine2").rglob("_COMPLETE")}
    assert any(k.startswith("evaluation/") for k in fetched) and fetched <= set(committed)

    # a stage task on a third machine (a Dask worker without the run's mirror) fetches what it is given
    from tasks.stage import ArtifactRef, _with_inputs_fetched

    monkeypatch.setenv("USSEG_CACHE_DIR", str(tmp_path / "worker"))
    head_key = next(k for k in committed if k.startswith("head/")).split("/")[1]
    mirror_head = tmp_path / "worker" / "s3" / "usseg" / s3.url.split("/", 3)[3] / "head" / head_key
    ref = ArtifactRef(stage="head", key=head_key, path=str(mirror_head / "head.pt"))
    seen = _with_inputs_fetched(lambda storage, inputs: Path(inputs["head"].path).is_file())
    assert not mirror_head.exists() and seen(s3.url, {"head": ref}) is True

    # the storage commands read the bucket
    _, ls = _cli("storage", "ls", "--storage", s3.url)
    for key in committed:
        assert key.split("/")[1] in ls
    _, du = _cli("storage", "du", "--storage", s3.url)
    assert "features" in du and "total" in du
    _, show = _cli("storage", "show", head_key[:8], "--storage", s3.url)
    shown = json.loads(show[show.index("{"):])
    assert shown["complete"] is True and shown["key"] == head_key and "meta.json" in shown["files"]
    _, lineage = _cli("storage", "lineage", head_key[:8], "--storage", s3.url)
    assert "features/" in lineage and "manifest/" in lineage
    _, verify = _cli("storage", "verify", "--storage", s3.url)
    assert "damaged" not in verify.split("checked")[-1]


def test_an_unreachable_or_refused_bucket_is_one_line(s3, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    code, text = _cli("storage", "ls", "--storage", s3.url, ok=False)
    assert code != 0 and s3.url in text and "Traceback" not in text
    code, text = _cli("storage", "ls", "--storage", "s3://bucket/a/../b", ok=False)
    assert code != 0 and "'..'" in text


def _extract_cmd(url: str, data: Path) -> list[str]:
    return [sys.executable, "-m", "commands.cli", "extract", "--dataset", "directory", "--data-root", str(data),
            "--split", "all", "--backbone", BACKBONE, "--random-weights", "--resolution", "64",
            "--storage", url, "--batch-size", "2"]


def _images(root: Path, n: int) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    folder = root / "imgs" / "images"
    folder.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f"im{i:03d}.png")
    return root / "imgs"


def test_two_concurrent_writers_commit_one_artifact(s3, tmp_path, prefect_api):
    data = _images(tmp_path, 12)
    procs = []
    for machine in ("a", "b"):
        env = {**os.environ, "PREFECT_API_URL": prefect_api, "USSEG_CACHE_DIR": str(tmp_path / machine),
               "PYTHONPATH": str(REPO)}
        procs.append(subprocess.Popen(_extract_cmd(s3.url, data), env=env, cwd=REPO, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    remote = _remote(s3.url)
    (key,) = remote.list_dirs("features")
    record = remote.commit_record("features", key)
    assert remote.attempts("features", key) == [record["attempt"]]  # the loser dropped its attempt
    arrays = [zarr.open_group(str(tmp_path / m / "s3" / "usseg" / s3.url.split("/", 3)[3] / "features" / key
                                  / "features.zarr"), mode="r") for m in ("a", "b")]
    for name in ("dense", "pooled", "done"):
        np.testing.assert_array_equal(np.asarray(arrays[0][name][:]), np.asarray(arrays[1][name][:]))
    # both mirrors now hold the winner's attempt
    assert {(tmp_path / m / "s3" / "usseg" / s3.url.split("/", 3)[3] / "features" / key / ".attempt").read_text()
            for m in ("a", "b")} == {record["attempt"]}


def test_a_killed_training_resumes_on_another_machine_from_its_checkpoint_on_the_bucket(s3, synthetic_small,
                                                                                        tmp_path, prefect_api):
    args = ["run", "stego", "--dataset", "synthetic", "--data-root", str(synthetic_small), "--train-split", "train",
            "--resolution", "64", "--set", "steps=30", "--set", "batch_size=4", "--set", "checkpoint_every=3"]
    base = [sys.executable, "-m", "commands.cli", *args]
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PYTHONPATH": str(REPO),
           "USSEG_CACHE_DIR": str(tmp_path / "a")}
    proc = subprocess.Popen([*base, "--storage", s3.url], env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    remote = _remote(s3.url)

    def checkpoint_on_the_bucket() -> bool:
        heads = remote.list_dirs("head") if "head" in remote.list_dirs("") else []
        return bool(heads) and any(o.path.endswith("/checkpoint.pt") for o in remote.list(f"head/{heads[0]}"))

    killed = kill_when(proc, checkpoint_on_the_bucket, timeout=400, interval=0.3)
    assert killed, "the training finished before a checkpoint reached the bucket"
    (key,) = remote.list_dirs("head")
    assert remote.commit_record("head", key) is None  # a killed run commits nothing
    _, gc = _cli("storage", "gc", "--min-age-hours", "0", "--storage", s3.url)  # a dry run lists it
    assert f"would remove head/{key} (incomplete" in gc
    env_b = {**env, "USSEG_CACHE_DIR": str(tmp_path / "b"), "PREFECT_LOGGING_LEVEL": "INFO"}
    resumed = subprocess.run([*base, "--storage", s3.url], env=env_b, cwd=REPO, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming from checkpoint" in resumed.stdout + resumed.stderr
    record = remote.commit_record("head", key)
    assert remote.attempts("head", key) == [record["attempt"]]  # the crashed attempt is cleaned up
    # the resumed head equals an uninterrupted run's, bit for bit
    local = tmp_path / "local"  # in a process of its own too: torch's thread count is the same on both sides
    subprocess.run([*base, "--storage", str(local)], env=env, cwd=REPO, check=True, capture_output=True,
                   timeout=600)
    import torch

    ours = torch.load(next((tmp_path / "b").glob(f"**/head/{key}/head.pt")), weights_only=True)
    clean = torch.load(local / "head" / key / "head.pt", weights_only=True)
    assert ours.keys() == clean.keys()
    flat = [(ours[k], clean[k]) for k in ours]
    while flat:
        a, b = flat.pop()
        if isinstance(a, dict):
            assert a.keys() == b.keys()
            flat.extend((a[k], b[k]) for k in a)
        elif torch.is_tensor(a):
            assert torch.equal(a, b)
        else:
            assert a == b


def test_the_mirror_is_bounded_least_recently_used_first(tmp_path):
    from usseg_core.remote import evict, touch_used

    root = tmp_path / "mirror"
    for i, name in enumerate(("old", "mid", "new")):
        folder = root / "features" / name
        folder.mkdir(parents=True)
        (folder / "data.bin").write_bytes(b"x" * 1000)
        (folder / "_COMPLETE").write_text("t")
        touch_used(folder)
        os.utime(folder / ".used", (1000 + i, 1000 + i))
    staging = root / "head" / "busy"
    staging.mkdir(parents=True)
    (staging / "checkpoint.pt").write_bytes(b"y" * 5000)  # being computed: never evicted
    removed = evict(root, keep=root / "features" / "old", limit=2100)
    assert [p.name for p in removed] == ["mid"]  # "old" is the one being fetched now
    assert staging.exists() and (root / "features" / "old").exists() and (root / "features" / "new").exists()
