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
