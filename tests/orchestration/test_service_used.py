"""The command line uses a running ``usseg up`` service (commands/launch.py), checked as a user meets it:
``usseg up`` and ``usseg extract`` as processes, the service's REST API asked what it recorded.

A command with work is a flow run on the service (Completed, with its logs) and starts no temporary server;
the same command again is answered by look-ups and adds no flow run. The in-process version of this check
(no server start): tests/flows/test_fastpath.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
TEMPORARY_SERVER = "Starting temporary server"  # Prefect's INFO line when a flow run starts its own server


def _env(tmp: Path) -> dict[str, str]:
    """A user's shell: no Prefect API configured, Prefect's INFO lines on (so a temporary server would show)."""
    drop = ("PREFECT_API_URL", "USSEG_STORAGE", "USSEG_STATE", "USSEG_FLOW_RUN", "USSEG_DATA_ROOT")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(PYTHONPATH=str(REPO), PREFECT_HOME=str(tmp / "cli-prefect-home"), PREFECT_LOGGING_LEVEL="INFO",
               COLUMNS="200")
    return env


def usseg(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "commands.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def one_deployment(target: Path) -> Path:
    """The shipped prefect.yaml with only extract-features/synthetic (`prefect deploy` needs one)."""
    spec = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())
    spec["deployments"] = [d for d in spec["deployments"]
                           if d["entrypoint"] == "flows.extract.extract_features" and d["name"] == "synthetic"]
    target.write_text(yaml.safe_dump(spec, sort_keys=False))
    return target


def api_post(api: str, path: str, body: dict) -> list[dict]:
    req = urllib.request.Request(f"{api}/{path}", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def cli_flow_runs(api: str) -> list[dict]:
    """The service's flow runs that no deployment made (the command line's)."""
    return [r for r in api_post(api, "flow_runs/filter", {"limit": 200}) if r["deployment_id"] is None]


@pytest.fixture()
def service(tmp_path):
    """`usseg up` on a free port for a temporary storage; `usseg down` afterwards (always)."""
    env, storage = _env(tmp_path), tmp_path / "storage"
    try:
        up = usseg(env, "up", "--port", "0", "--no-schedules", "--prefect-file",
                   str(one_deployment(tmp_path / "prefect.yaml")), "--storage", str(storage))
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        yield {"env": env, "storage": storage,
               "api": json.loads((storage / "_service" / "service.json").read_text())["api_url"]}
    finally:
        down = usseg(env, "down", "--storage", str(storage), timeout=120)
        assert down.returncode == 0 and "server" in down.stdout, down.stdout + down.stderr


@pytest.mark.slow  # ~60 s on 2 cores, most of it `usseg up`; the default run has the in-process check
def test_a_command_with_work_is_a_flow_run_on_the_service_and_a_cached_one_is_not(tmp_path, service):
    from PIL import Image

    images = tmp_path / "imgs" / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(images / f"im{i}.png")
    api = service["api"]
    extract = ("extract", "--dataset", "directory", "--data-root", str(images.parent), "--split", "all",
               "--backbone", "vit_small_patch16_224.dino", "--random-weights", "--resolution", "32",
               "--storage", str(service["storage"]))

    first = usseg(service["env"], *extract)
    said = first.stdout + first.stderr
    assert first.returncode == 0, said[-3000:]
    assert f"flow run on the running usseg service at {api} (usseg up)" in first.stdout
    assert "extracted: features/" in first.stdout
    assert TEMPORARY_SERVER not in said
    (run,) = cli_flow_runs(api)
    assert run["state"]["type"] == "COMPLETED"
    logs = api_post(api, "logs/filter", {"logs": {"flow_run_id": {"any_": [run["id"]]}}, "limit": 200})
    assert any(line["message"].startswith("extracting features/") for line in logs)  # its logs are there too

    second = usseg(service["env"], *extract)
    assert second.returncode == 0, (second.stdout + second.stderr)[-3000:]
    assert "answered by look-ups, no flow run started" in second.stdout and "cache hit" in second.stdout
    assert "running usseg service" not in second.stdout and TEMPORARY_SERVER not in second.stdout + second.stderr
    assert [r["id"] for r in cli_flow_runs(api)] == [run["id"]]
