"""A head registered in a test runs through the pipeline without any edit to tasks/ or flows/, and
`usseg run picie` runs end to end on the synthetic scenes (view bank -> PiCIE -> k-means -> evaluation)."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

import pandas as pd
import pytest
import torch
from prefect import flow
from typer.testing import CliRunner

from commands.cli import app
from flows.train import run
from usseg_core.spec import RunSpec
from tests.conftest import artifact_mtimes
from usseg_core.heads import HeadSpec, TrainedHead, TrainedState, get_head, register_head, unregister_head


@dataclass
class ToyConfig:
    dim: int = 3  # a random projection to 3 channels
    seed: int = 0


class ToyTrained(TrainedHead):
    method = "toy"

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__(in_dim, dim, 0)
        self.proj = torch.nn.Conv2d(in_dim, dim, 1)

    def codes(self, feats):
        return self.proj(feats)


def _train_toy(inputs, config, **_):
    torch.manual_seed(config["toy"].seed)
    head = ToyTrained(int(inputs.features[0].shape[0]), config["toy"].dim)
    return TrainedState(payload={"in_dim": head.in_dim, "code_dim": head.code_dim, "proj": head.proj.state_dict()},
                        meta={"n_train_items": len(inputs.features)}, steps_done=0)


def _load_toy(ckpt):
    head = ToyTrained(ckpt["in_dim"], ckpt["code_dim"])
    head.proj.load_state_dict(ckpt["proj"])
    return head


@pytest.fixture()
def toy_head():
    register_head(HeadSpec(name="toy", summary="a random projection", sections=(("toy", ToyConfig),),
                           presets=lambda ds: {}, needs=frozenset({"five_crop"}), train=_train_toy,
                           load=_load_toy))
    yield get_head("toy")
    unregister_head("toy")


@flow
def _run_flow(spec: RunSpec) -> dict:
    return run(spec)


def test_a_registered_toy_head_runs_through_the_pipeline(toy_head, synthetic_small, tmp_path, prefect_harness):
    storage = tmp_path / "storage"
    out = _run_flow(RunSpec(head="toy", dataset="synthetic", data_root=str(synthetic_small), train_split="train",
                            eval_split="val", backbone="vit_small_patch16_224.dino", random_weights=True, storage=str(storage), overrides={"toy.dim": 4}, resolution=32,
                            run_crf=False))
    assert "knn" not in out["trained"]  # declared inputs only: five-crop features, no KNN table
    assert not (storage / "knn").exists() and not (storage / "views").exists()
    meta = json.loads((storage / "head" / out["trained"]["head"]["key"] / "meta.json").read_text())
    assert meta["method"] == "toy" and meta["params"]["config"] == {"toy": {"dim": 4, "seed": 0}}
    assert meta["n_train_items"] == 8 * 5  # five-crops of the 8 training images
    rows = pd.DataFrame(out["evaluation"]["rows"])
    assert set(zip(rows.method, rows.clusterer)) == {("raw-features", "kmeans"), ("toy", "kmeans"), ("toy", "linear")}


def test_run_picie_end_to_end_then_cache_hits(synthetic_small, tmp_path, prefect_harness):
    storage, results = tmp_path / "storage", tmp_path / "picie.csv"
    args = ["run", "picie", "--dataset", "synthetic", "--data-root", str(synthetic_small), "--resolution", "64",
            "--storage", str(storage), "--results", str(results), "--set", "epochs=2", "--set", "batch_size=4",
            "--set", "views.n_views=2", "--set", "picie.kmeans_samples=5000"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    df = pd.read_csv(results)
    for clusterer in ("centroids", "kmeans", "linear"):
        for crf in (False, True):
            assert len(df[(df.method == "picie") & (df.clusterer == clusterer) & (df.crf == crf)]) == 1
    assert (df.accuracy > 20).all()  # 5 classes: far above chance
    stages = {p.parent.parent.name for p in storage.glob("*/*/meta.json")}
    assert {"views", "head", "kmeans", "evaluation"} <= stages and "knn" not in stages
    (head,) = list((storage / "head").iterdir())
    meta = json.loads((head / "meta.json").read_text())
    assert meta["steps_per_epoch"] == 2 and meta["n_views"] == 2 and meta["seconds_per_epoch"] > 0
    assert [k for k in meta["upstream"]] == ["views0"]
    before = artifact_mtimes(storage)
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert artifact_mtimes(storage) == before  # all cache hits


@pytest.mark.parametrize("bad, says", [("picie.k_ovr=3", "valid: .*k_over"), ("views.nviews=2", "views.n_views"),
                                       ("omh.w_match=0.1", "no config section 'omh'"),
                                       ("epochs=many", "section 'picie'")])
def test_bad_overrides_fail_before_any_work(bad, says, tmp_path):
    from usseg_core.errors import ConfigError

    res = CliRunner().invoke(app, ["run", "picie", "--dataset", "synthetic", "--storage", str(tmp_path), "--set", bad])
    assert isinstance(res.exception, ConfigError) and not list(tmp_path.iterdir())  # nothing was computed
    assert re.search(says, str(res.exception)), str(res.exception)
