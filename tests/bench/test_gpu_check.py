"""bench/gpu_check.py at toy sizes on CPU: every section runs (the GPU machine runs the full sizes)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.slow  # about 75 s on 2 cores: a compare of all four heads plus ViT-S/8 extraction
def test_gpu_check_smoke_runs_every_section_on_cpu(tmp_path):
    out = tmp_path / "check.json"
    done = subprocess.run([sys.executable, "bench/gpu_check.py", "--smoke", "--device", "cpu", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["pipeline"]["heads"]) == {"stego", "omh", "picie", "hsg"}
    assert all(row["train steps/s"] and row["eval img/s"] for row in result["pipeline"]["heads"].values())
    assert result["equal"] and all(row["ok"] for row in result["equal"].values())
    assert "| knn |" in done.stdout and result["extraction"]["fp32 img/s"] > 0


def _gpu_check_sh(out, *args: str, gpus: str) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "PYTHON": sys.executable, "USSEG_GPUS": gpus}
    return subprocess.run(["bash", "bench/gpu_check.sh", str(out), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)


def test_gpu_check_sh_two_worker_section_skips_with_one_line_below_two_gpus(tmp_path):
    """The script's CPU path: no GPU (``$USSEG_GPUS=none``, as on this machine), the section says why it
    skipped and the check still passes; only the asked section ran."""
    out = tmp_path / "check.json"
    done = _gpu_check_sh(out, "--sections", "two-workers", gpus="none")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "two workers: skipped: needs 2 GPUs, this machine has 0" in done.stdout.splitlines()
    result = json.loads(out.read_text())
    assert result["two_workers"] == {"skipped": "needs 2 GPUs, this machine has 0"}
    assert not {"extraction", "knn", "pipeline", "equal"} & set(result)


@pytest.mark.slow  # 2 to 4 minutes on 2 cores (two local Dask clusters, two extractions each)
def test_gpu_check_two_worker_section_runs_on_two_named_gpus_on_cpu(tmp_path):
    """With two GPUs named (``$USSEG_GPUS=0,1``) the section runs its real code at toy size: two workers
    pinned one per GPU both wrote features, which equal one worker's."""
    out = tmp_path / "check.json"
    done = _gpu_check_sh(out, "--smoke", "--device", "cpu", "--sections", "two-workers", gpus="0,1")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    row = json.loads(out.read_text())["two_workers"]
    assert row["ok"] and row["features rel L2"] == 0.0 and row["items"] == 40
    assert sorted(w.split(" ", 1)[1] for w in row["dask:2 workers"]) == [
        "cpu (CUDA_VISIBLE_DEVICES=0)", "cpu (CUDA_VISIBLE_DEVICES=1)"]
    assert row["dask:1 img/s"] > 0 and row["dask:2 img/s"] > 0
