"""ensure_segment_memory on the synthetic dataset: the artifact, cache hits, keys; the retrieval
predictor through run_evaluation (class ids, identity scoring, the label in the results)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from prefect import flow

from tasks.backbone import BackboneRef
from tasks.manifest import DataRef, ensure_manifest
from tasks.evaluate import run_evaluation
from tasks.extract import ensure_features
from tasks.retrieval import add_retrieval, ensure_segment_memory, retrieval_predictor
from usseg_core.datasets.synthetic import ensure_synthetic
from usseg_core.views import ViewSpec

BACKBONE = "tf_efficientnet_lite0"  # random init (fast to build): 472 x 4 x 4 maps at 32 px
VIEW = ViewSpec("center_crop", 32)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return ensure_synthetic(tmp_path_factory.mktemp("data") / "synthetic", n_train=4, n_val=2,
                            height=48, width=64)


def _random_stego_head(folder: Path, in_dim: int, n_classes: int) -> dict:
    from usseg_core.heads import get_head, save_head
    from usseg_core.heads.probes import ClusterProbe
    from usseg_core.heads.stego import StegoHead

    torch.manual_seed(0)
    cfg = get_head("stego").config("synthetic", {"dim": 8})
    folder.mkdir(parents=True)
    save_head(folder / "head.pt", "stego", n_classes, cfg,
              {"in_dim": in_dim, "code_dim": 8, "head": StegoHead(in_dim, 8).state_dict(),
               "cluster": ClusterProbe(8, n_classes).state_dict()})
    return {"key": "stego-random-test", "path": str(folder / "head.pt"), "method": "stego"}


@flow(name="test-segment-memory")
def _memories(storage: str, root: str, head_dir: str) -> dict:
    data = DataRef("synthetic", root, "train")
    feats = ensure_features(storage, data, BackboneRef(BACKBONE, random_weights=True), VIEW)
    n_classes = len(data.dataset().class_names)
    head = _random_stego_head(Path(head_dir), 472, n_classes)
    args = (storage, None, feats, data, VIEW.params(), n_classes)
    return {"feats": feats, "n_classes": n_classes, "head": head,
            "first": ensure_segment_memory(*args, (2, 2), 5),
            "again": ensure_segment_memory(*args, (2, 2), 5),
            "grid": ensure_segment_memory(*args, (1, 2), 5),
            "iters": ensure_segment_memory(*args, (2, 2), 2),
            "head_mem": ensure_segment_memory(storage, head, feats, data, VIEW.params(), n_classes, (2, 2), 5)}


def test_segment_memory_artifact_cache_hit_and_keys(tmp_path, root, prefect_harness):
    out = _memories(str(tmp_path / "storage"), str(root), str(tmp_path / "head"))
    first, again = out["first"], out["again"]
    assert not first["cache_hit"] and again["cache_hit"]
    assert again["key"] == first["key"] and again["path"] == first["path"] and first["pool_to"] == [4, 4]
    folder = Path(first["path"])
    protos, labels = np.load(folder / "prototypes.npy"), np.load(folder / "labels.npy")
    image = np.load(folder / "image_index.npy")
    assert protos.dtype == np.float32 and protos.shape[1] == 472 and len(protos) == len(labels) == len(image)
    assert np.allclose(np.linalg.norm(protos, axis=1), 1.0, atol=1e-5)
    assert labels.min() >= 0 and labels.max() < out["n_classes"] and set(image.tolist()) <= set(range(4))
    assert len(labels) <= 4 * 4  # at most grid-many segments per image
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["class_counts"] == np.bincount(labels, minlength=out["n_classes"]).tolist()
    assert meta["params"]["grid"] == [2, 2] and meta["params"]["iters"] == 5
    assert meta["upstream"] == {"features": out["feats"]["key"], "head": "raw"}
    keys = {first["key"], out["grid"]["key"], out["iters"]["key"], out["head_mem"]["key"]}
    assert len(keys) == 4  # grid, iters and the head each change the key
    # ... and reach the code: other segments, other codes
    assert len(np.load(Path(out["grid"]["path"]) / "labels.npy")) <= 4 * 2
    assert np.load(Path(out["head_mem"]["path"]) / "prototypes.npy").shape[1] == 8


@flow(name="test-retrieval-evaluation")
def _evaluate(storage: str, root: str) -> dict:
    ref = BackboneRef(BACKBONE, random_weights=True)
    data, pdata = DataRef("synthetic", root, "val"), DataRef("synthetic", root, "train")
    manifest = ensure_manifest(data, storage)
    feats = ensure_features(storage, data, ref, VIEW, manifest=manifest)
    pfeats = ensure_features(storage, pdata, ref, VIEW)
    names = list(data.dataset().class_names)
    groups = add_retrieval([{"method": "raw-features", "head": None, "predictors": []}], storage, pdata,
                           pfeats, VIEW.params(), len(names), "synthetic")
    return {"groups": groups, "result": run_evaluation(storage, data, manifest, VIEW, feats, None, groups, names,
                                                       run_crf=False)}


def test_retrieval_predictor_through_the_evaluation(tmp_path, root, prefect_harness):
    out = _evaluate(str(tmp_path / "storage"), str(root))
    (pred,) = out["groups"][0]["predictors"]
    assert pred["name"] == "raw-retrieval" and pred["kind"] == "retrieval" and pred["label"] == "retrieval-k20"
    assert pred["grid"] == [6, 6] and pred["k"] == 20 and pred["vote"] == "majority"
    (row,) = out["result"]["rows"]
    assert row["clusterer"] == "retrieval-k20" and 0 <= row["accuracy"] <= 100
    assert retrieval_predictor({"key": "m", "path": "p", "pool_to": [4, 4]}, 3, (2, 2), vote="weighted",
                               k=5)["label"] == "retrieval-k5-weighted"
    with pytest.raises(ValueError, match="vote"):
        retrieval_predictor({"key": "m", "path": "p", "pool_to": [4, 4]}, 3, (2, 2), vote="mode")
