"""The extension cost of a head: one module with one registration, and nothing else edited, is enough for
`usseg run`, `usseg compare`, `usseg demo` and the generated deployments (docs/contributing.md)."""
from __future__ import annotations

import importlib
import json
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from commands.cli import app
from usseg_core.heads import list_heads, unregister_head
from usseg_core.spec import RunSpec

# The whole head: its config, its trained module, its training and loading, and one registration.
TOY_MODULE = '''
from dataclasses import dataclass

import torch

from usseg_core.heads import HeadSpec, TrainedHead, TrainedState, register_head


@dataclass
class ProjConfig:
    dim: int = 3  # a random 1x1 projection of the features
    seed: int = 0


class ProjHead(TrainedHead):
    method = "proj"

    def __init__(self, in_dim, dim):
        super().__init__(in_dim, dim, 0)
        self.proj = torch.nn.Conv2d(in_dim, dim, 1)

    def codes(self, feats):
        return self.proj(feats)


def train(inputs, config, **_):
    torch.manual_seed(config["proj"].seed)
    head = ProjHead(int(inputs.features[0].shape[0]), config["proj"].dim)
    return TrainedState(payload={"in_dim": head.in_dim, "dim": head.code_dim, "proj": head.proj.state_dict()})


def load(ckpt):
    head = ProjHead(ckpt["in_dim"], ckpt["dim"])
    head.proj.load_state_dict(ckpt["proj"])
    return head


register_head(HeadSpec(name="proj", summary="a random projection of the features", sections=(("proj", ProjConfig),),
                       presets=lambda dataset: {}, needs=frozenset({"five_crop"}), train=train, load=load,
                       demo={"proj.dim": 4}))
'''
VIT = "vit_small_patch16_224.dino"
SMALL = ["--backbone", VIT, "--random-weights", "--resolution", "32", "--no-crf"]


@pytest.fixture()
def proj_head(tmp_path, monkeypatch):
    (tmp_path / "proj_head.py").write_text(textwrap.dedent(TOY_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.import_module("proj_head")
    yield "proj"
    unregister_head("proj")
    sys.modules.pop("proj_head", None)


def _ok(args: list[str]):
    res = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output + repr(res.exception)
    return res


def test_a_head_module_runs_through_run_compare_demo_and_deployments(proj_head, synthetic_small, tmp_path,
                                                                     prefect_harness):
    storage = tmp_path / "storage"
    common = ["--dataset", "synthetic", "--data-root", str(synthetic_small), "--storage", str(storage)]
    run = _ok(["run", "proj", *common, *SMALL])
    assert "proj" in run.output and "head artifact:" in run.output

    compare = _ok(["compare", "--heads", "proj,stego", "--seeds", "0", "--set", "stego.steps=4",
                   "--set", "proj.dim=3", *common, *SMALL])  # proj.dim routed to proj only: the run's head
    runs = json.loads(next((storage / "compare").glob("*/runs.json")).read_text())
    assert [(r["head"], r["trained_now"]) for r in runs] == [("proj", False), ("stego", True)]

    demo = _ok(["demo", "--heads", "proj", "--seeds", "0", "--n-train", "6", "--n-val", "2",
                "--storage", str(tmp_path / "demo")])
    assert "proj" in demo.output
    (head,) = [json.loads(p.read_text()) for p in (tmp_path / "demo" / "head").glob("*/meta.json")]
    assert head["params"]["config"]["proj"]["dim"] == 4  # the head's declared demo length

    from deployments.generate import FILE, header_of, render

    deployments = yaml.safe_load(render(header_of(FILE.read_text())))["deployments"]
    mine = {d["entrypoint"]: d for d in deployments if d["name"] == "synthetic" and "proj" in d["entrypoint"]}
    assert set(mine) == {"flows.train.train_proj", "flows.train.evaluate_proj"}
    (compared,) = [d for d in deployments if d["name"] == "synthetic" and d["entrypoint"] == "flows.compare.compare"]
    assert compared["parameters"]["spec"]["overrides"]["proj.dim"] == 4
    module, attr = "flows.train.evaluate_proj".rsplit(".", 1)
    deployed = getattr(importlib.import_module(module), attr)  # how Prefect resolves the entrypoint
    assert deployed.name == "evaluate-proj"
    spec = {**mine["flows.train.evaluate_proj"]["parameters"]["spec"], "data_root": str(synthetic_small),
            "storage": str(storage), "backbone": VIT, "weights": None, "random_weights": True, "resolution": 32,
            "run_crf": False}
    out = deployed(RunSpec(**spec))
    assert out["evaluation"]["rows"] and out["trained"]["head"]["key"]
    assert "proj" in list_heads()
