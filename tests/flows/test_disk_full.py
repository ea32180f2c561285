"""A full disk, for real: ``usseg extract`` under a file size limit (RLIMIT_FSIZE, so writes past it fail
with EFBIG as the kernel reports a full disk) stops with one line naming the storage, the artifact and the
space, exit 5; the item that did not fit is not marked done; a rerun without the limit resumes with it."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.flows.test_cli_errors import REPO, _env, usseg

# The CLI in-process under a file-size limit. Its Prefect API is the session's (PREFECT_API_URL, another
# process): a temporary server of its own would have its database under the limit too.
LIMITED = """
import os, resource, signal, sys

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit a write fails with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
sys.argv = ["usseg", *sys.argv[2:]]
from commands.cli import main
main()
"""
# Chunk sizes of the two items (random-weight backbone at 224, fp32 on CPU, stored float16 + zstd): the flat
# image's ~547 kB fits under the limit, the noise image's ~614 kB does not.
LIMIT = 580_000


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_FSIZE and SIGXFSZ")
def test_a_full_disk_is_exit_5_naming_the_artifact_and_a_rerun_resumes(tmp_path, prefect_api):
    from PIL import Image

    from usseg_core.features import FeatureStore

    data = tmp_path / "data"
    data.mkdir()
    Image.fromarray(np.full((224, 224, 3), 128, np.uint8)).save(data / "a.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (224, 224, 3), dtype=np.uint8)).save(data / "b.png")
    storage = tmp_path / "storage"
    storage.mkdir()
    args = ["extract", "--dataset", "directory", "--data-root", str(data), "--random-weights", "--resolution",
            "224", "--batch-size", "1", "--shard-size", "1", "--storage", str(storage)]  # a shard per image
    done = subprocess.run([sys.executable, "-c", LIMITED, str(LIMIT), *args], cwd=REPO,
                          env=_env(tmp_path, prefect_api), capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 5, done.stdout + done.stderr
    (folder,) = (storage / "features").iterdir()
    line = done.stderr.splitlines()[-1]
    assert line.startswith(f"error: disk full: writing features/{folder.name} in {storage} failed ([Errno 27] "
                           "File too large); "), line
    assert " written so far of about 1.4 MiB (uncompressed), " in line and " free on its disk; free space and " \
        "rerun the same command (what is finished is kept and the run resumes)" in line
    assert not (folder / "_COMPLETE").exists()
    assert FeatureStore(folder / "features.zarr").missing(0, 2) == [1]  # a written and marked, b neither

    chunk_a = folder / "features.zarr" / "dense" / "c" / "0" / "0" / "0" / "0"
    written_a = chunk_a.stat().st_mtime_ns

    again = usseg(tmp_path, *args, api=prefect_api)
    assert again.returncode == 0, again.stdout + again.stderr
    assert chunk_a.stat().st_mtime_ns == written_a  # resumed: only the item that did not fit was computed
    assert (folder / "_COMPLETE").exists() and FeatureStore(folder / "features.zarr").missing(0, 2) == []
