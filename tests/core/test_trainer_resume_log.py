"""A training resumed from a checkpoint says so in the log."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tests.core.test_train import ToyAux, _config, data  # noqa: F401 - `data` is a fixture
from usseg_core.heads.stego_train import train_stego


def test_resume_from_checkpoint_logs_one_line(data, tmp_path: Path, caplog):  # noqa: F811
    feats, _, knn = data
    ckpt = tmp_path / "checkpoint.pt"

    class Interrupt(Exception):
        pass

    def stop_at_5(step, stats):
        if step == 5:
            raise Interrupt

    with caplog.at_level(logging.INFO, logger="usseg.trainer"):
        with pytest.raises(Interrupt):
            train_stego(feats, knn, 2, _config(steps=8), checkpoint_path=ckpt, device="cpu", progress=False,
                        aux=ToyAux(), on_step=stop_at_5)
        assert not [r for r in caplog.records if "resuming" in r.getMessage()]  # a fresh start says nothing
        train_stego(feats, knn, 2, _config(steps=8), checkpoint_path=ckpt, device="cpu", progress=False,
                    aux=ToyAux())
    lines = [r.getMessage() for r in caplog.records if r.name == "usseg.trainer"]
    assert lines == [f"stego: resuming from checkpoint {ckpt} at step 4 of 8"]
