"""A longer run of a finished head continues from its checkpoint and ends where the direct run ends."""
from __future__ import annotations

import json

import pytest
import torch
from prefect import flow

from flows.train import train_stages
from orchestration.refs import resolved
from usseg_core.spec import RunSpec


@flow
def _train(run: RunSpec) -> dict:
    return train_stages(resolved(run))["head"]


def _head(storage, root, steps: int) -> dict:
    run = RunSpec(head="stego", dataset="synthetic", data_root=str(root), train_split="train", storage=str(storage),
                  resolution=64, overrides={"steps": steps, "batch_size": 4, "checkpoint_every": 2})
    return _train(run)


def _state(head: dict) -> dict:
    return torch.load(head["path"], weights_only=True)


@pytest.mark.usefixtures("prefect_harness")
def test_longer_run_continues_the_shorter_and_equals_the_direct_run(tmp_path, synthetic_small):
    a, b = tmp_path / "a", tmp_path / "b"
    short = _head(a, synthetic_small, 3)
    extended = _head(a, synthetic_small, 7)
    assert extended["key"] != short["key"]
    direct = _head(b, synthetic_small, 7)  # fresh storage: nothing to continue from
    assert direct["key"] == extended["key"]
    s_ext, s_dir, s_short = _state(extended), _state(direct), _state(short)
    tensors = [k for k, v in s_dir.items() if isinstance(v, dict)]
    assert tensors
    for part in tensors:
        for name, value in s_dir[part].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, s_ext[part][name]), (part, name)
    assert any(isinstance(v, torch.Tensor) and not torch.equal(v, s_short[p][n])
               for p in tensors for n, v in s_dir[p].items())
    meta = json.loads((a / "head" / extended["key"] / "meta.json").read_text())
    assert meta["steps"] == 7 and meta["continued_from"] == short["key"]
    assert json.loads((b / "head" / direct["key"] / "meta.json").read_text())["continued_from"] is None
