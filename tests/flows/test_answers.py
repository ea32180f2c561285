"""Answers (usseg_core/answers.py, commands/launch.py step 0): a command whose every artifact is cached is
answered from its record without importing torch, Prefect, timm or the heads; any changed input is a miss,
a damaged artifact is exit 4, and the run record is still written."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from commands import launch
from tests.flows.test_cli_errors import REPO, _env
from tests.flows.test_extract_flow import BACKBONE, _images, _run_extract
from usseg_core import answers

HEAVY = ("torch", "prefect", "timm", "usseg_core.heads", "zarr", "flows", "tasks")
# Runs the CLI like the `usseg` script does, then lists the heavy modules that were imported.
PROBE = """
import json, sys
from commands import cli
out, sys.argv = sys.argv[1], ["usseg", *sys.argv[2:]]
try:
    cli.main()
except SystemExit as stop:
    code = stop.code
else:
    code = 0
heavy = [m for m in sys.modules if m in %r or m.split(".")[0] in %r]
open(out, "w").write(json.dumps({"code": code, "heavy": sorted(heavy)}))
""" % (HEAVY, HEAVY)


def _probe(tmp_path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "probe.json"
    done = subprocess.run([sys.executable, "-c", PROBE, str(out), *args], cwd=REPO, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    return done, (json.loads(out.read_text()) if out.exists() else {})


def _extract_args(data, storage) -> list[str]:
    return ["extract", "--dataset", "directory", "--data-root", str(data), "--split", "all", "--backbone",
            BACKBONE, "--random-weights", "--resolution", "32", "--storage", str(storage), "--batch-size", "2"]


@pytest.fixture
def answered_extract(tmp_path, prefect_harness, monkeypatch):
    """An extraction run by the CLI as a user's shell runs it (no Prefect API configured): its answer is
    recorded after the flow run."""
    monkeypatch.setattr(launch, "api_configured", lambda: False)
    data, storage = _images(tmp_path, 4), tmp_path / "storage"
    first = _run_extract(data, storage)
    assert "extracted" in first.stdout
    (record,) = (storage / answers.ANSWERS_FOLDER).glob("*.json")
    return data, storage, json.loads(record.read_text())


def test_a_cached_command_is_answered_without_torch_or_prefect(tmp_path, answered_extract):
    data, storage, record = answered_extract
    (feat,) = (storage / "features").iterdir()
    assert {a["stage"] for a in record["artifacts"]} == {"features", "manifest"}
    runs_before = set((storage / "_runs").glob("*.json"))

    done, probe = _probe(tmp_path, *_extract_args(data, storage))
    assert probe.get("code") == 0, done.stdout + done.stderr
    assert "answered from" in done.stdout and "torch and Prefect not imported" in done.stdout
    assert f"cache hit: features/{feat.name} (4 items)" in done.stdout
    assert probe["heavy"] == [], probe["heavy"]  # none of torch, prefect, timm, the heads, zarr, flows, tasks
    (new,) = set((storage / "_runs").glob("*.json")) - runs_before  # the run record users inspect
    assert feat.name in json.loads(new.read_text())["keys"]

    # a damaged file of an artifact the answer stands on: exit 4 naming it, as a cache hit would
    manifest = next(a for a in record["artifacts"] if a["stage"] == "manifest")
    path = os.path.join(manifest["path"], "manifest.json")
    with open(path, "r+b") as fh:
        fh.truncate(10)
    done, probe = _probe(tmp_path, *_extract_args(data, storage))
    assert probe.get("code") == 4, done.stdout + done.stderr
    assert done.stderr.splitlines()[-1].startswith(f"error: manifest/{manifest['key']}: manifest.json: 10 bytes")
    assert probe["heavy"] == []


def test_any_changed_input_is_a_miss_and_the_command_runs_as_before(tmp_path, answered_extract):
    data, storage, record = answered_extract
    args = _extract_args(data, storage)[1:]

    def said(*extra: str) -> str:
        return _run_extract(data, storage, *extra).stdout

    assert "answered from" in said()
    image = next(data.glob("images/*.png"))
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))  # a split's file changed
    out = said()
    assert "answered from" not in out and "answered by look-ups" not in out  # a new manifest was built
    assert "answered from" in said()  # ... and recorded again
    for name in ("USSEG_CRF_MAX_PIXELS", "USSEG_VERIFY_CONTENT"):  # a keyed setting of the environment
        os.environ[name] = "1"
        try:
            assert "answered from" not in said()
        finally:
            del os.environ[name]
    (feat,) = (storage / "features").iterdir()
    (feat / "_COMPLETE").unlink()  # an artifact the answer names is no longer complete: recomputed
    out = said()
    assert "answered from" not in out and (feat / "_COMPLETE").exists()
    assert args  # (the command line itself is the same throughout)


def test_an_answer_id_covers_the_fields_the_files_they_name_and_the_environment(tmp_path, monkeypatch):
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"12345")
    fields = {"dataset": "directory", "weights": str(weights), "storage": str(tmp_path)}
    first = answers.answer_id("flows.extract:extract_features", fields)
    assert answers.answer_id("flows.extract:extract_features", dict(fields)) == first
    assert answers.answer_id("flows.train:pipeline", fields) != first
    assert answers.answer_id("flows.extract:extract_features", {**fields, "dataset": "camvid11"}) != first
    os.utime(weights, ns=(0, 10**9))  # the weights file named by the command changed
    second = answers.answer_id("flows.extract:extract_features", fields)
    assert second != first
    monkeypatch.setenv("USSEG_FULL_MAX_SIDE", "640")
    assert answers.answer_id("flows.extract:extract_features", fields) != second
    before = answers.answer_id("flows.extract:extract_features", fields)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU visible: `--device auto` may resolve otherwise
    assert answers.answer_id("flows.extract:extract_features", fields) != before
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setenv("USSEG_FLOW_RUN", "never")  # how a command runs, not what it computes
    monkeypatch.delenv("USSEG_FULL_MAX_SIDE")
    assert answers.answer_id("flows.extract:extract_features", fields) == second
    # a relative path that exists means the working folder matters
    monkeypatch.chdir(tmp_path)
    rel = {**fields, "weights": "w.pth"}
    here = answers.answer_id("flows.extract:extract_features", rel)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "w.pth").write_bytes(b"12345")
    os.utime(tmp_path / "sub" / "w.pth", ns=(0, 10**9))
    monkeypatch.chdir(tmp_path / "sub")
    assert answers.answer_id("flows.extract:extract_features", rel) != here


def test_a_tampered_or_unreadable_record_is_a_miss(tmp_path):
    fields = {"storage": str(tmp_path), "x": 1}
    path = answers.save_answer(tmp_path, "flows.x:f", fields, {"n": 1}, flow="f")
    assert answers.load_answer(tmp_path, "flows.x:f", fields)["result"] == {"n": 1}
    record = json.loads(path.read_text())
    record["result"]["n"] = 2
    path.write_text(json.dumps(record))
    assert answers.load_answer(tmp_path, "flows.x:f", fields) is None
    path.write_text("{not json")
    assert answers.load_answer(tmp_path, "flows.x:f", fields) is None


def test_answers_stay_off_when_a_prefect_api_is_configured(tmp_path, monkeypatch):
    for name in ("PREFECT_API_URL", "PREFECT_PROFILE", "USSEG_FLOW_RUN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delitem(sys.modules, "prefect", raising=False)  # as a fresh CLI process: no Prefect yet
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert launch.answers_enabled()
    monkeypatch.setenv("USSEG_FLOW_RUN", "always")
    assert not launch.answers_enabled()
    monkeypatch.delenv("USSEG_FLOW_RUN")
    (tmp_path / "profiles.toml").write_text('active = "srv"\n[profiles.srv]\n'
                                            'PREFECT_API_URL = "http://127.0.0.1:4200/api"\n')
    assert not launch.answers_enabled()
    (tmp_path / "profiles.toml").write_text('active = "local"\n[profiles.local]\n')
    assert launch.answers_enabled()
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    assert not launch.answers_enabled()


def test_a_copy_made_outside_the_storage_must_still_exist(tmp_path, monkeypatch):
    """``usseg segment --out DIR`` copies its pictures out of the storage: gone, the answer is a miss (the
    command copies them again), whether DIR was given absolute or relative."""
    storage, fields = tmp_path / "storage", {"storage": str(tmp_path / "storage"), "out": "out"}
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "index.html").write_text("<html></html>")
    answers.save_answer(storage, "flows.segment:segment", fields, {"exported": "out/index.html"}, flow="segment")
    assert answers.load_answer(storage, "flows.segment:segment", fields)["result"]["exported"] == "out/index.html"
    (tmp_path / "out" / "index.html").unlink()
    assert answers.load_answer(storage, "flows.segment:segment", fields) is None
