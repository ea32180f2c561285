"""Test-wide settings: an isolated Prefect home and database, telemetry off, shared data paths."""
from __future__ import annotations

import os
import signal
import tempfile
import time
from pathlib import Path

import pytest

_HOME = tempfile.mkdtemp(prefix="usseg-prefect-")
os.environ.setdefault("PREFECT_HOME", _HOME)
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or skip the test with the reason when it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: real-data tests need ../shared beside the repository")
    return path


def artifact_mtimes(storage: Path) -> dict[Path, int]:
    """Modification time of every artifact's meta.json: unchanged across a re-run = every stage a cache hit."""
    return {p: p.stat().st_mtime_ns for p in Path(storage).glob("*/*/meta.json")}


@pytest.fixture(scope="session")
def synthetic_small(tmp_path_factory) -> Path:
    """8 training and 3 validation synthetic scenes at 96 x 128, generated once per session."""
    from usseg_core.datasets.synthetic import ensure_synthetic

    return ensure_synthetic(tmp_path_factory.mktemp("data") / "synthetic", n_train=8, n_val=3, height=96,
                            width=128)


@pytest.fixture(scope="session")
def prefect_harness():
    """A temporary Prefect database and ephemeral API for flow tests (started once per session)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def prefect_api(prefect_harness) -> str:
    """The URL of the session's Prefect API: a command run as a subprocess with ``PREFECT_API_URL`` set to it
    uses it as a user's configured API, and starts no temporary server of its own (~10 s each)."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


@pytest.fixture()
def storage(tmp_path) -> Path:
    root = tmp_path / "storage"
    root.mkdir()
    return root


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 server (SeaweedFS on 127.0.0.1, tests/s3server.py), started once per session."""
    from tests.s3server import S3Server

    server = S3Server(tmp_path_factory.mktemp("s3")).start()
    yield server
    server.stop()


@pytest.fixture()
def s3(s3_server, tmp_path, monkeypatch, request):
    """The S3 server's variables set, a fresh ``$USSEG_CACHE_DIR`` and a storage URL of this test's own
    (``s3.url``), as a user points usseg at a bucket."""
    import re
    import types

    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("USSEG_CACHE_DIR", str(tmp_path / "cache"))
    prefix = re.sub(r"[^A-Za-z0-9]+", "-", request.node.name)[:60].strip("-")
    return types.SimpleNamespace(server=s3_server, url=s3_server.url(prefix), env=dict(s3_server.env),
                                 cache=tmp_path / "cache")


def kill_when(proc, ready, *, timeout: float, interval: float) -> bool:
    """A crash at a chosen moment: poll ``ready()`` every ``interval`` s while ``proc`` (started with
    ``start_new_session=True``) runs, and SIGKILL its whole process group the first time it is true.
    Returns whether that happened within ``timeout``; the group is killed and reaped in any case."""
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and proc.poll() is None:
            time.sleep(interval)
            if ready():
                os.killpg(proc.pid, signal.SIGKILL)
                return True
        return False
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
