"""Real Prefect server + worker + deployments (``usseg up`` in a temporary state folder).

One server and worker are shared by the module: deploy the synthetic deployments, run them through
``prefect deployment run``, re-run (all cache hits), change the backbone weights (watcher -> event ->
triggered runs recompute exactly the stages below the backbone) and kill the worker mid-extraction.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from orchestration import service
from usseg_core.store import MARKER

VIT = "vit_small_patch16_224.dino"
SYNTHETIC_FLOWS = ("train-stego", "train-picie", "evaluate-stego", "compare", "extract-features", "watch-backbones")
BELOW_BACKBONE = {"features", "knn", "views", "head", "kmeans", "linear-probe", "evaluation"}
# Test-sized head configurations (the `overrides` field of the deployments' spec).
TOY_OVERRIDES = {"stego": {"steps": 30}, "picie": {"epochs": 1, "batch_size": 4, "views.n_views": 2}}
# The same sizes for `compare`, namespaced (its --set keys are routed to the heads that have them).
COMPARE_PARAMS = {"heads": ["stego", "picie"], "seeds": [0], "run_crf": False,
                  "overrides": {"stego.steps": 30, "picie.epochs": 1, "picie.batch_size": 4, "views.n_views": 2}}


def flow_of(entrypoint: str) -> str:
    """Flow name of a deployment entrypoint: flows.train.train_stego -> train-stego."""
    module, fn = entrypoint.rsplit(".", 1)
    return {"flows.extract": "extract-features", "flows.watch": "watch-backbones"}.get(module, fn.replace("_", "-"))


def save_random_vit(path: Path, seed: int) -> None:
    from usseg_core.backbones import get_backbone

    torch.save(get_backbone(VIT, random_weights=True, device="cpu", seed=seed).model.state_dict(), path)


def test_yaml(source: Path, target: Path, weights: Path) -> Path:
    """The shipped prefect.yaml reduced to the synthetic deployments, with test-sized parameters and the
    triggers matching the test backbone (everything else as shipped: pool, schedules, triggers)."""
    spec = yaml.safe_load(source.read_text())
    keep = []
    for dep in spec["deployments"]:
        flow = flow_of(dep["entrypoint"])
        if flow not in SYNTHETIC_FLOWS or dep["name"] not in ("synthetic", "default"):
            continue
        dep = json.loads(json.dumps(dep))  # drop YAML aliases: each deployment is edited on its own
        params = dep["parameters"].get("spec", dep["parameters"])  # every flow but the watcher: one spec
        if flow == "watch-backbones":
            params["backbones"] = [{"name": VIT, "weights": str(weights)}]
        elif flow == "compare":  # run by hand below; not triggered (the backbone test counts 3 triggered runs)
            params.update(backbone=VIT, weights=str(weights), resolution=64, **COMPARE_PARAMS)
            dep["triggers"] = []
        else:
            params.update(backbone=VIT, weights=str(weights), resolution=64)
            if flow != "extract-features":
                params["overrides"] = TOY_OVERRIDES[flow.split("-", 1)[1]]
                for trig in dep.get("triggers", []):
                    trig["match"]["prefect.resource.id"] = f"usseg.backbone.{VIT}"
        keep.append(dep)
    spec["deployments"] = keep
    target.write_text(yaml.safe_dump(spec, sort_keys=False))
    return target


test_yaml.__test__ = False  # a helper, not a test


@pytest.fixture(scope="module")
def svc(tmp_path_factory):
    """``usseg up`` on a free port in a temporary state folder; ``usseg down`` in teardown (always)."""
    from usseg_core.datasets.synthetic import ensure_synthetic

    tmp = tmp_path_factory.mktemp("svc")
    ensure_synthetic(tmp / "data" / "synthetic", n_train=12, n_val=4)
    weights = tmp / "vit_s16.pth"
    save_random_vit(weights, seed=0)
    old = os.environ.get(service.STATE_ENV)
    os.environ[service.STATE_ENV] = str(tmp / "state")
    storage = tmp / "storage"
    try:
        state = service.up(storage, tmp / "data", port=0, schedules=False, poll_s=2,
                           prefect_file=test_yaml(service.PREFECT_FILE, tmp / "prefect.yaml", weights))
        yield {"state": state, "storage": storage, "weights": weights, "tmp": tmp,
               "yaml": yaml.safe_load((tmp / "prefect.yaml").read_text())}
    finally:
        service.down(storage, timeout=15)
        if old is None:
            os.environ.pop(service.STATE_ENV, None)
        else:
            os.environ[service.STATE_ENV] = old


def run_deployment(svc, name: str, *params: str, timeout: float = 400) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "prefect", "deployment", "run", name, "--watch"]
    for p in params:
        cmd += ["--param", p]
    out = subprocess.run(cmd, env=service.service_env(svc["state"]), capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "Completed" in out.stdout
    return out


def spec_param(svc, deployment: str, **changes) -> str:
    """``spec=<json>``: the deployment's spec with ``changes`` (a run replaces the whole ``spec`` parameter)."""
    flow, name = deployment.split("/")
    (dep,) = [d for d in svc["yaml"]["deployments"] if flow_of(d["entrypoint"]) == flow and d["name"] == name]
    return "spec=" + json.dumps({**dep["parameters"]["spec"], **changes})


def snapshot(storage: Path) -> dict[tuple[str, str], str]:
    """(stage, key) -> completion time of every complete artifact."""
    return {(p.parent.parent.name, p.parent.name): p.read_text()
            for p in storage.glob(f"*/*/{MARKER}") if not p.parent.parent.name.startswith("_")}


def test_service_is_up(svc):
    st = service.status(svc["storage"])
    assert st["server"] and st["worker"] and st["healthy"]
    assert st["deployments"] == len(SYNTHETIC_FLOWS)
    assert svc["state"]["api_url"].startswith("http://127.0.0.1:")


def test_deployment_run_completes_and_rerun_is_all_cache_hits(svc):
    run_deployment(svc, "train-stego/synthetic")
    first = snapshot(svc["storage"])
    assert {s for s, _ in first} >= {"manifest", "features", "knn", "head", "kmeans"}
    records = sorted((svc["storage"] / "_runs").glob("*.json"))
    assert records and set(json.loads(records[-1].read_text())["keys"]) <= {k for _, k in first}

    run_deployment(svc, "train-stego/synthetic")
    assert snapshot(svc["storage"]) == first  # no new artifact, none recomputed


def _wait_for_triggered_runs(svc, since: float, n: int, timeout: float = 400) -> list:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterExpectedStartTime
    import datetime as dt

    after = dt.datetime.fromtimestamp(since, dt.timezone.utc)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with service._client(svc["state"]) as client:
            runs = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(expected_start_time=FlowRunFilterExpectedStartTime(after_=after)),
                **service._run_list_args())
        triggered = [r for r in runs if r.created_by and str(r.created_by.type).upper().endswith("AUTOMATION")]
        if len(triggered) >= n and all(r.state and r.state.is_final() for r in triggered):
            return triggered
        time.sleep(2)
    raise AssertionError(f"triggered runs did not finish: {[(r.name, r.state_name) for r in runs]}")


def test_picie_deployment_trains_on_the_view_bank(svc):
    run_deployment(svc, "train-picie/synthetic")
    stages = {s for s, _ in snapshot(svc["storage"])}
    assert {"views", "head"} <= stages
    heads = [json.loads(p.read_text()) for p in (svc["storage"] / "head").glob("*/meta.json")]
    (picie,) = [m for m in heads if m["method"] == "picie"]
    assert any(k.startswith("views") for k in picie["upstream"]) and "knn" not in picie["upstream"]


def test_compare_deployment_reports_over_the_heads_the_train_deployments_made(svc):
    heads_before = {k for s, k in snapshot(svc["storage"]) if s == "head"}
    run_deployment(svc, "compare/synthetic")
    after = snapshot(svc["storage"])
    assert {k for s, k in after if s == "head"} == heads_before  # train-stego's and train-picie's heads, reused
    (key,) = [k for s, k in after if s == "compare"]
    folder = svc["storage"] / "compare" / key
    assert {"report.html", "summary.csv", "per_class_iou.png", "overlays.png"} <= {p.name for p in folder.iterdir()}
    runs = json.loads((folder / "runs.json").read_text())
    assert [(r["head"], r["seed"], r["trained_now"]) for r in runs] == [("stego", 0, False), ("picie", 0, False)]


def test_evaluate_deployment_takes_every_run_option_of_the_command_line(svc):
    """The options the evaluate-<head> flows once lacked (on_error, overcluster) are fields of its spec: a run
    of the deployment sets them, and they reach the manifest and the evaluation."""
    run_deployment(svc, "evaluate-stego/synthetic", spec_param(
        svc, "evaluate-stego/synthetic", on_error="skip", overcluster="majority", n_clusters=7, run_crf=False))
    evaluations = [json.loads(p.read_text()) for p in (svc["storage"] / "evaluation").glob("*/meta.json")]
    (ev,) = [m for m in evaluations if m["params"].get("overcluster") == "majority"]
    rows = (svc["storage"] / "evaluation" / ev["key"] / "results.csv").read_text().splitlines()
    assert any(",majority," in r for r in rows[1:])
    manifests = [json.loads(p.read_text()) for p in (svc["storage"] / "manifest").glob("*/meta.json")]
    assert any(m["params"].get("on_error") == "skip" for m in manifests)


def test_backbone_change_reruns_exactly_the_stages_below_it(svc):
    run_deployment(svc, "evaluate-stego/synthetic")
    run_deployment(svc, "watch-backbones/default")  # records the fingerprint: nothing changed yet
    before = snapshot(svc["storage"])

    save_random_vit(svc["weights"], seed=1)  # a new backbone under the same file name
    since = time.time()
    run_deployment(svc, "watch-backbones/default")
    record = json.loads((svc["storage"] / "_backbones.json").read_text())
    assert len(record) == 1
    triggered = _wait_for_triggered_runs(svc, since, n=3)  # train-stego, train-picie, evaluate-stego
    assert sorted(r.state_name for r in triggered) == ["Completed"] * 3

    after = snapshot(svc["storage"])
    assert set(before) <= set(after)  # nothing was overwritten
    new_stages = {stage for stage, _ in set(after) - set(before)}
    assert new_stages == BELOW_BACKBONE & {stage for stage, _ in before}
    assert "manifest" not in new_stages  # reused: the images did not change


def _incomplete_features(storage: Path) -> Path | None:
    for folder in sorted((storage / "features").glob("*")):
        if not (folder / MARKER).exists() and (folder / "features.zarr" / "done").exists():
            return folder / "features.zarr"
    return None


def chunk_times(zpath: Path, items) -> dict:
    """mtime of every dense chunk file of ``items`` (one chunk per item)."""
    return {str(f): f.stat().st_mtime_ns for i in items for f in (zpath / "dense" / "c" / str(i)).rglob("*")
            if f.is_file()}


@pytest.mark.slow  # ~60 s on 2 cores: keeps the default orchestration suite under ~4 minutes
def test_killed_worker_resumes_without_recomputing_finished_shards(svc):
    import zarr

    params = (spec_param(svc, "extract-features/synthetic", policy="five_crop", resolution=224, shard_size=5,
                         batch_size=5, random_weights=True, weights=None),)
    cmd = [sys.executable, "-m", "prefect", "deployment", "run", "extract-features/synthetic"]
    for p in params:
        cmd += ["--param", p]
    subprocess.run(cmd, env=service.service_env(svc["state"]), check=True, capture_output=True, timeout=120)

    deadline, zpath = time.monotonic() + 300, None
    while time.monotonic() < deadline:  # kill once some shards (not all) are written
        zpath = _incomplete_features(svc["storage"])
        if zpath is not None:
            done = zarr.open_group(str(zpath), mode="r")["done"][:]
            if 10 <= done.sum() < len(done) - 10:
                break
        time.sleep(0.05)
    else:
        pytest.fail("extraction never reached a state to interrupt")
    # A crash: the worker and its flow-run process (which runs in a session of its own) die at once.
    runs = [pid for _, pid in service.active_runs(svc["state"]) if pid]
    for pid in [svc["state"]["worker_pid"], *runs]:
        service.kill_tree(pid, signal.SIGKILL)
    assert runs, "the extraction run should have been running"
    time.sleep(1)
    done = zarr.open_group(str(zpath), mode="r")["done"][:]
    finished = np.flatnonzero(done)
    chunks = chunk_times(zpath, finished)

    svc["state"] = service.up(svc["storage"])  # restarts the worker, marks the orphaned run Crashed
    assert svc["state"]["reaped"], "the killed run should have been marked Crashed"
    run_deployment(svc, "extract-features/synthetic", *params)
    assert (zpath.parent / MARKER).exists()
    assert chunk_times(zpath, finished) == chunks  # finished items were not written again

    other = svc["tmp"] / "uninterrupted"
    run_deployment(svc, "extract-features/synthetic", spec_param(
        svc, "extract-features/synthetic", policy="five_crop", resolution=224, shard_size=5, batch_size=5,
        random_weights=True, weights=None, storage=str(other)))
    ref = next((other / "features").glob(f"*/features.zarr"))
    got, want = zarr.open_group(str(zpath), mode="r"), zarr.open_group(str(ref), mode="r")
    assert np.array_equal(got["dense"][:], want["dense"][:])
    assert np.array_equal(got["pooled"][:], want["pooled"][:])
