"""The CLI's no-work path (commands/launch.py): a fully cached command is answered by look-ups, without a
flow run or a server; one missing artifact means a normal flow run, and the look-up pass did no work."""
from __future__ import annotations

import json

import pytest

from commands import launch as fastpath
from flows.extract import extract_features
from tests.flows.test_extract_flow import BACKBONE, _images, _run_extract
from usseg_core.store import ArtifactStore, NotCached, lookups_only


def _flow_runs() -> int:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        return len(client.read_flow_runs(limit=200, sort=FlowRunSort.EXPECTED_START_TIME_DESC))


def _params(data, storage):
    from usseg_core.spec import ExtractSpec

    return ExtractSpec(dataset="directory", data_root=str(data), split="all", backbone=BACKBONE,
                       random_weights=True, resolution=32, storage=str(storage), batch_size=2)


def test_lookups_only_refuses_to_begin_an_artifact(tmp_path):
    store = ArtifactStore(tmp_path)
    with lookups_only(), pytest.raises(NotCached) as miss:
        store.begin("features", "abc", version=1, params={})
    assert (miss.value.stage, miss.value.key) == ("features", "abc")
    assert not (tmp_path / "features").exists()  # nothing was created
    store.begin("features", "abc", version=1, params={})  # outside the block: as always


def test_a_miss_does_no_work_and_a_cached_command_is_answered_without_a_flow_run(tmp_path, prefect_harness,
                                                                                  monkeypatch):
    data, storage = _images(tmp_path, 4), tmp_path / "storage"
    assert fastpath.cached_result(extract_features, _params(data, storage)) is None
    assert not any(p.is_dir() and p.name != "_runs" for p in storage.glob("*"))  # not even a manifest

    first = _run_extract(data, storage)
    assert "extracted" in first.stdout
    runs_before, records_before = _flow_runs(), len(list((storage / "_runs").glob("*.json")))
    monkeypatch.setattr(fastpath, "api_configured", lambda: False)  # as a user's shell without a server
    second = _run_extract(data, storage)
    assert "answered by look-ups, no flow run started" in second.stdout
    assert "cache hit" in second.stdout and "no backbone work" in second.stdout
    assert _flow_runs() == runs_before  # no flow run was created
    records = sorted((storage / "_runs").glob("*.json"), key=lambda p: p.stat().st_mtime_ns)
    assert len(records) == records_before + 1  # the run record users inspect is still written
    (feat,) = (storage / "features").iterdir()
    assert feat.name in json.loads(records[-1].read_text())["keys"]


def test_a_running_usseg_service_is_used_and_named(tmp_path, prefect_harness, monkeypatch):
    from prefect.settings import PREFECT_API_URL

    data, storage = _images(tmp_path, 4), tmp_path / "storage"
    state = tmp_path / "state"
    state.mkdir()
    (state / "service.json").write_text(json.dumps({"api_url": PREFECT_API_URL.value()}))
    monkeypatch.setenv("USSEG_STATE", str(state))
    monkeypatch.setattr(fastpath, "api_configured", lambda: False)
    monkeypatch.setenv("PREFECT_API_URL", "")  # run_flow sets it for the process; restored after the test
    runs_before, said = _flow_runs(), []
    out = fastpath.run_flow(extract_features, _params(data, storage), say=said.append)
    assert said == [f"flow run on the running usseg service at {PREFECT_API_URL.value()} (usseg up)"]
    assert not out["cache_hit"] and _flow_runs() == runs_before + 1
