"""A damaged cache stops `usseg run` with one line naming the artifact and the folder to delete, exit 4
(docs/architecture.md, "Integrity"): never a silent cache hit, never numbers computed from damaged bytes."""
from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from tests.flows.test_cli_errors import usseg

HINT = "the cache is damaged: delete {folder} to recompute it (usseg storage verify lists every damaged artifact)"


def _args(root, storage) -> list[str]:
    return ["run", "stego", "--dataset", "synthetic", "--data-root", str(root), "--resolution", "64",
            "--random-weights", "--no-crf", "--storage", str(storage), "--set", "steps=2", "--set", "batch_size=4"]


@pytest.mark.timeout(600)
def test_a_truncated_head_and_a_damaged_feature_chunk_stop_the_run(tmp_path, synthetic_small, prefect_harness):
    from commands.cli import app
    from commands.common import exit_code, handled
    from usseg_core.errors import DamagedArtifact

    storage = tmp_path / "storage"
    first = CliRunner().invoke(app, _args(synthetic_small, storage))
    assert first.exit_code == 0, first.output + repr(first.exception)
    verified = CliRunner().invoke(app, ["storage", "verify", "--storage", str(storage)])
    assert verified.exit_code == 0 and "damaged" not in verified.output, verified.output

    # a truncated head.pt in a complete artifact: the next run's cache hit refuses it (the look-up pass)
    (head,) = (storage / "head").iterdir()
    data = (head / "head.pt").read_bytes()
    (head / "head.pt").write_bytes(data[:100])
    done = usseg(tmp_path, *_args(synthetic_small, storage))
    assert done.returncode == 4, done.stdout + done.stderr
    assert done.stderr.splitlines()[-1] == (
        f"error: head/{head.name}: head.pt: 100 bytes, {len(data)} were written; " + HINT.format(folder=head))
    assert "Traceback" not in done.stderr

    # the user deletes it as told; the features the head retrains on are damaged: the run stops, naming them
    import shutil

    shutil.rmtree(head)
    (feats,) = [p for p in (storage / "features").iterdir()
                if '"five_crop"' in (p / "meta.json").read_text()]
    for chunk in (feats / "features.zarr/dense/c").iterdir():
        path = chunk / "0/0/0"
        raw = bytearray(path.read_bytes())
        raw[40:56] = bytes(b ^ 0xFF for b in raw[40:56])
        path.write_bytes(bytes(raw))
    again = CliRunner().invoke(app, _args(synthetic_small, storage))  # in process: the error, not its line
    err = handled(again.exception)
    assert isinstance(err, DamagedArtifact) and exit_code(err) == 4, again.output + repr(again.exception)
    assert re.fullmatch(rf"features/{feats.name}: item \d+ \(features.zarr/dense/c/\d+/0/0/0\): checksum "
                        rf"mismatch; {re.escape(HINT.format(folder=feats))}", str(err)), str(err)
    assert not (storage / "head").exists() or not any((storage / "head").glob("*/_COMPLETE"))
    verified = CliRunner().invoke(app, ["storage", "verify", "--storage", str(storage)])
    assert verified.exit_code == 4 and f"features/{feats.name}: damaged (item 0 (" in verified.output
