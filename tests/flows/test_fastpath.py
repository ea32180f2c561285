"""The CLI's no-work path (commands/launch.py): a fully cached command is answered by look-ups, without a
flow run or a server; one missing artifact means a normal flow run, and the look-up pass did no work."""
from __future__ import annotations

import json
import os

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


def test_a_running_usseg_service_gets_the_flow_run_and_no_temporary_server_starts(tmp_path, prefect_harness,
                                                                                  monkeypatch):
    """As a user's shell: no API configured, a healthy service (here the harness's API) for the storage.
    A cached command is still answered by look-ups; one with work runs on the service. The whole check with
    a real `usseg up` and CLI processes: tests/orchestration/test_service_used.py."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, temporary_settings

    api = PREFECT_API_URL.value()
    data, storage = _images(tmp_path, 4), tmp_path / "storage"
    (storage / "_service").mkdir(parents=True)
    (storage / "_service" / "service.json").write_text(json.dumps({"api_url": api}))
    monkeypatch.delenv("USSEG_STATE", raising=False)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    # Without an API url, Prefect would start its temporary server (inside the harness: the harness's own,
    # which would hide the mistake); count the starts instead.
    starts, start = [], SubprocessASGIServer.start
    monkeypatch.setattr(SubprocessASGIServer, "start",
                        lambda self, *a, **k: starts.append(self) or start(self, *a, **k))
    runs_before, said = _flow_runs(), []
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert not fastpath.api_configured()
        out = fastpath.run_flow(extract_features, _params(data, storage), say=said.append)
    assert not starts and _flow_runs() == runs_before + 1
    assert "PREFECT_API_URL" not in os.environ  # the service's url was set only for the run
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        again = fastpath.run_flow(extract_features, _params(data, storage), say=said.append)
    assert said == [f"flow run on the running usseg service at {api} (usseg up)",
                    "every artifact was already in the store: answered by look-ups, no flow run started"]
    assert not out["cache_hit"] and again["cache_hit"] and again["key"] == out["key"]
    assert _flow_runs() == runs_before + 1 and not starts  # the cached command: no flow run

    monkeypatch.setenv(fastpath.FLOW_RUN_ENV, "always")  # every command a flow run: on the service
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        third = fastpath.run_flow(extract_features, _params(data, storage), say=said.append)
    assert third["cache_hit"] and said[-1] == said[0]
    assert _flow_runs() == runs_before + 2 and not starts
