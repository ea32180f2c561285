"""Test-wide settings: an isolated Prefect home and database, telemetry off, shared data paths."""
from __future__ import annotations

import os
import tempfile
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


@pytest.fixture()
def storage(tmp_path) -> Path:
    root = tmp_path / "storage"
    root.mkdir()
    return root
