"""One worker per GPU: how ``dask[:N]`` maps N workers onto G GPUs, each worker's CUDA_VISIBLE_DEVICES,
GPU-tagged tasks placed only on the workers offering the Dask ``GPU`` resource (a local cluster and an
existing one started with ``dask worker --resources GPU=1``), and the device recorded in an artifact's
metadata. This machine has no GPU: ``$USSEG_GPUS`` names the GPUs a local cluster pins its workers to,
so the placement is real while each worker's torch computes on the CPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from prefect import flow

from orchestration.runner import SettingTaskRunner, plan_workers
from tests.conftest import REPO
from tests.orchestration.gpu_probes import cpu_probe, env_probe, gpu_probe
from usseg_core.device import GPU_TAG, device_label, gpu_ids
from usseg_core.errors import ConfigError


@pytest.mark.parametrize("n, gpus, expected", [
    (None, [], [("cpu-0", None), ("cpu-1", None)]),  # a CPU machine: as before GPUs were counted
    (3, [], [("cpu-0", None), ("cpu-1", None), ("cpu-2", None)]),
    (None, ["0", "1", "2"], [("gpu-0", "0"), ("gpu-1", "1"), ("gpu-2", "2")]),  # dask alone: one per GPU
    (2, ["0", "1"], [("gpu-0", "0"), ("gpu-1", "1")]),  # N = G
    (1, ["2", "3"], [("gpu-2", "2")]),  # N < G: GPU 3 idle
    (4, ["0", "1"], [("gpu-0", "0"), ("gpu-1", "1"), ("cpu-0", None), ("cpu-1", None)]),  # N > G: CPU workers
])
def test_n_workers_map_onto_g_gpus(n, gpus, expected):
    plan = plan_workers(n, gpus)
    assert [(w.name, w.gpu) for w in plan] == expected
    for w in plan:
        assert w.resources == ({"GPU": 1} if w.gpu is not None else {})
        assert w.env == {"CUDA_VISIBLE_DEVICES": w.gpu or ""}  # a CPU worker sees no GPU at all


def test_probes_carry_the_gpu_tag():
    from tests.orchestration import gpu_probes

    assert gpu_probes.GPU_TAG == GPU_TAG and GPU_TAG in gpu_probe.tags and GPU_TAG not in cpu_probe.tags


def test_a_runner_of_no_workers_is_refused():
    with pytest.raises(ConfigError, match="at least one worker"):
        plan_workers(0, ["0"])


def test_gpu_ids_from_usseg_gpus_and_cuda_visible_devices(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("USSEG_GPUS", "0, 1")
    assert gpu_ids() == ["0", "1"]
    monkeypatch.setenv("USSEG_GPUS", "GPU-8a1f2c3d-0000-1111-2222-333344445555")
    assert gpu_ids() == ["GPU-8a1f2c3d-0000-1111-2222-333344445555"]
    monkeypatch.setenv("USSEG_GPUS", "none")
    assert gpu_ids() == []
    for bad, problem in (("0,0", "named twice"), ("0,one gpu", "not a GPU id"), ("0,", "not a GPU id")):
        monkeypatch.setenv("USSEG_GPUS", bad)
        with pytest.raises(ConfigError, match=f"USSEG_GPUS.*{problem}"):
            gpu_ids()
    monkeypatch.delenv("USSEG_GPUS")
    assert gpu_ids() == ([] if not torch.cuda.is_available() else gpu_ids())
    # a machine with 4 GPUs of which this process may use 2 and 3: the workers get those, by their ids
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert gpu_ids() == ["0", "1", "2", "3"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert gpu_ids() == ["2", "3"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setenv("USSEG_GPUS", "1,5")
    with pytest.raises(ConfigError, match="GPU 5 does not exist; this machine has 2"):
        gpu_ids()


def test_device_label_names_the_pinning(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert device_label(cpu) == "cpu"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    assert device_label(cpu) == "cpu (CUDA_VISIBLE_DEVICES=3)"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert device_label(cpu) == "cpu"


# --- placement on real Dask clusters ---------------------------------------------------------------

@flow(name="test-gpu-placement", task_runner=SettingTaskRunner(parameter="task_runner"))
def _placement(task_runner: str, n_gpu: int = 4, storage: str | None = None, data_root: str | None = None) -> dict:
    """GPU probes while CPU probes wait behind two long GPU tasks; with ``storage``, an extraction too."""
    busy = [gpu_probe.submit(-1 - i, hold=2.0) for i in range(2)]  # the GPU workers are busy for a while
    cpu = [cpu_probe.submit(i, hold=0.2) for i in range(3)]  # ... so CPU work goes where it may: elsewhere
    gpu = [gpu_probe.submit(i) for i in range(n_gpu)]
    out = {"gpu": [f.result() for f in busy + gpu], "cpu": [f.result() for f in cpu],
           "env": env_probe.submit().result()}
    if storage is not None:
        from tasks.backbone import BackboneRef
        from tasks.extract import ensure_features
        from tasks.manifest import DataRef
        from usseg_core.views import ViewSpec

        out["features"] = ensure_features(storage, DataRef("synthetic", data_root, "train"),
                                          BackboneRef("tf_efficientnet_lite0", random_weights=True),
                                          ViewSpec("center_crop", 32), shard_size=1, batch_size=1)
    return out


def test_local_cluster_pins_one_worker_per_gpu_and_places_gpu_work_there(prefect_harness, tmp_path, monkeypatch):
    """dask:3 on two (named) GPUs: workers gpu-0, gpu-1 pinned, cpu-0 sees none; GPU-tagged probes and
    extraction shards run on gpu-0 / gpu-1 only, CPU probes run on cpu-0 while those are busy, and the
    feature artifact's metadata names the device each worker computed on."""
    from pathlib import Path

    from usseg_core.datasets.synthetic import ensure_synthetic

    monkeypatch.setenv("USSEG_GPUS", "0,1")
    root = ensure_synthetic(tmp_path / "synthetic", n_train=2, n_val=1, height=48, width=64)
    out = _placement("dask:3", storage=str(tmp_path / "storage"), data_root=str(root))

    assert out["env"] == {"gpu-0": "0", "gpu-1": "1", "cpu-0": ""}  # each worker's CUDA_VISIBLE_DEVICES
    pinned = {"gpu-0": "0", "gpu-1": "1"}
    assert {r["name"] for r in out["gpu"]} <= set(pinned)
    for r in out["gpu"]:
        assert r["cvd"] == pinned[r["name"]] and r["resources"] == {"GPU": 1}
    assert "cpu-0" in {r["name"] for r in out["cpu"]}
    cpu0 = next(r for r in out["cpu"] if r["name"] == "cpu-0")
    assert cpu0["cvd"] == "" and cpu0["resources"] == {}

    feats = out["features"]
    meta = json.loads((Path(feats["path"]).parent / "meta.json").read_text())
    # two shards, written only by the pinned workers; each names the device it computed on
    assert meta["workers"] and len(meta["workers"]) <= 2
    assert all(w.endswith(("cpu (CUDA_VISIBLE_DEVICES=0)", "cpu (CUDA_VISIBLE_DEVICES=1)")) for w in meta["workers"])


def _start(args: list[str], env: dict, log) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def test_existing_cluster_with_gpu_resource_workers_gets_the_same_placement(prefect_harness, tmp_path):
    """A scheduler and two workers started as a user would (``dask worker --resources GPU=1`` for one):
    GPU-tagged tasks run only on the GPU worker; CPU work runs on the other while it is busy."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    scheduler_file = tmp_path / "scheduler.json"
    procs: list[subprocess.Popen] = []
    with open(tmp_path / "cluster.log", "w") as log:
        try:
            procs.append(_start(["distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0",
                                 "--no-dashboard", "--scheduler-file", str(scheduler_file)], env, log))
            common = ["distributed.cli.dask_worker", "--scheduler-file", str(scheduler_file), "--nthreads", "1",
                      "--host", "127.0.0.1", "--no-dashboard", "--no-nanny"]
            deadline = time.monotonic() + 60
            while not scheduler_file.exists() and time.monotonic() < deadline:
                time.sleep(0.2)
            procs.append(_start([*common, "--name", "gpu-a", "--resources", "GPU=1"],
                                {**env, "CUDA_VISIBLE_DEVICES": "0"}, log))
            procs.append(_start([*common, "--name", "cpu-a"], env, log))
            address = json.loads(scheduler_file.read_text())["address"]
            _wait_for_workers(address, 2, deadline)
            out = _placement(address)
        finally:
            _stop_all(reversed(procs))  # the workers before their scheduler
    assert {r["name"] for r in out["gpu"]} == {"gpu-a"}, (tmp_path / "cluster.log").read_text()[-2000:]
    assert all(r["cvd"] == "0" and r["resources"] == {"GPU": 1} for r in out["gpu"])
    assert "cpu-a" in {r["name"] for r in out["cpu"]}


def _stop_all(procs) -> None:
    """SIGTERM each process; one that has not exited 5 s later (a worker without a nanny can hang in its
    shutdown) is killed, so teardown never fails the test nor holds it up."""
    procs = list(procs)
    for p in procs:
        p.terminate()
    deadline = time.monotonic() + 5
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _wait_for_workers(address: str, n: int, deadline: float) -> None:
    from distributed import Client

    with Client(address, timeout=max(1.0, deadline - time.monotonic())) as client:
        client.wait_for_workers(n, timeout=max(1.0, deadline - time.monotonic()))



def test_an_indexed_cuda_device_on_a_pinned_worker_says_why_it_is_refused(monkeypatch):
    from usseg_core.device import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # a worker pinned to GPU 3 sees one device
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    assert resolve_device("cuda") == torch.device("cuda")
    with pytest.raises(ConfigError, match=r"sees 1 CUDA device\(s\) \(CUDA_VISIBLE_DEVICES=3: .*use 'cuda' or 'auto'"):
        resolve_device("cuda:1")
