"""`usseg evaluate --model KEY`: an imported STEGO head evaluated with its own backbone, cluster probe and
linear probe (CRF on/off); numbers equal a direct computation; bad keys and class-count mismatches are one
error line."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from commands.cli import app
from tests.conftest import artifact_mtimes
from tests.core.test_import_stego import (ARCH, DIM, N_CLASSES, REFERENCE_CFG, LitUnsupervisedSegmenter,
                                          save_reference_checkpoint)
from usseg_core.datasets.synthetic import ensure_synthetic


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(storage, synthetic root, import result, reference module): a random ViT-S/16 STEGO with 5 classes
    (the synthetic dataset's), imported."""
    import timm

    from commands.importing import import_stego

    torch.manual_seed(0)
    vit = timm.create_model(ARCH, pretrained=False, num_classes=0, dynamic_img_size=True)
    lit = LitUnsupervisedSegmenter(vit).eval()
    tmp = tmp_path_factory.mktemp("evaluate-model")
    ckpt = tmp / "synthetic_vit_small.ckpt"
    save_reference_checkpoint(ckpt, lit, {**REFERENCE_CFG, "dataset_name": "synthetic"})
    storage = tmp / "storage"
    root = ensure_synthetic(tmp / "synthetic", n_train=2, n_val=2, height=64, width=64)
    return storage, root, import_stego(ckpt, storage), lit


def _evaluate(storage, root, key, *extra):
    return CliRunner().invoke(app, ["evaluate", "--model", key, "--dataset", "synthetic", "--data-root", str(root),
                                    "--eval-split", "val", "--device", "cpu", "--storage", str(storage), *extra])


def _one_error_line(res) -> str:
    assert res.exit_code == 3, res.output + repr(res.exception)  # a key or class count that does not fit: EXIT_CONFIG
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.output
    return lines[0]


def test_evaluate_imported_head(setup, tmp_path, prefect_harness):
    from tasks.manifest import DataRef, load_manifest
    from tasks.heads import load_head
    from usseg_core.backbones import get_backbone
    from usseg_core.features import FeatureStore, embed
    from usseg_core.metrics import ConfusionMatrix, hungarian_scores, identity_scores
    from usseg_core.store import ArtifactStore
    from usseg_core.views import ViewSpec, prepare_item, prepare_label

    storage, root, out, lit = setup
    results = tmp_path / "results.csv"
    res = _evaluate(storage, root, out.head_key, "--results", str(results))
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert f"no k-means artifact for head {out.head_key}: k-means rows skipped" in res.output
    df = pd.read_csv(results)
    combos = set(zip(df["clusterer"], df["crf"]))
    assert combos == {("cluster-probe", False), ("cluster-probe", True), ("linear", False), ("linear", True)}
    assert set(df["method"]) == {"stego"}

    # the evaluation artifact: features of the imported backbone under synthetic's protocol (full frame)
    store = ArtifactStore(storage)
    ev = next(a for a in store.iter_artifacts("evaluation") if a.complete)
    feats_art = store.find(ev.meta["upstream"]["features"])
    assert feats_art.meta["backbone"] == ARCH and feats_art.meta["weights"] == str(out.weights)
    assert feats_art.meta["params"]["view"]["policy"] == "full"
    view = ViewSpec.from_params(feats_art.meta["params"]["view"])
    feats, flips = FeatureStore(feats_art.file("features.zarr")), FeatureStore(
        store.find(ev.meta["upstream"]["flips"]).file("features.zarr"))
    data = DataRef("synthetic", str(root), "val")
    ds = data.dataset()
    ids = load_manifest({"path": str(store.find(feats_art.meta["upstream"]["manifest"]).file("manifest.json"))}).ids
    bb = get_backbone(ARCH, weights=out.weights, device="cpu")
    head = load_head(str(out.head_path))
    own, linear = ConfusionMatrix(N_CLASSES, N_CLASSES), ConfusionMatrix(N_CLASSES, N_CLASSES)
    for i, id_ in enumerate(ids):
        direct = embed(bb, prepare_item(ds.load_image(id_), view)[None], precision="fp32")[0][0]
        # the cached features are the imported ViT's (float16 in the store)
        np.testing.assert_allclose(feats[i].astype(np.float32), direct, rtol=1e-2, atol=1e-2)
        label = prepare_label(ds.load_label(id_), view)
        with torch.no_grad():  # flip-TTA codes by the reference's own head, upsampled to the label
            f, fl = (torch.from_numpy(s[i].astype(np.float32))[None] for s in (feats, flips))
            codes = (lit.net.head(f) + lit.net.head(fl).flip(-1)) / 2
            codes = F.interpolate(codes, size=label.shape, mode="bilinear", align_corners=False)
            own.update(head.assign(codes)[0].numpy(), label)
            linear.update(lit.linear_probe(codes).argmax(1)[0].numpy(), label)
    rows = {(r.clusterer, r.crf): r for r in df.itertuples()}
    for name, score in (("cluster-probe", hungarian_scores(own.matrix)), ("linear", identity_scores(linear.matrix))):
        row = rows[(name, False)]
        assert row.miou == pytest.approx(round(100 * score.miou, 2), abs=1e-9), name
        assert row.accuracy == pytest.approx(round(100 * score.accuracy, 2), abs=1e-9), name

    # again: every artifact a cache hit, same rows
    before = artifact_mtimes(storage)
    res = _evaluate(storage, root, out.head_key[:12], "--no-crf", "--results", str(tmp_path / "nocrf.csv"))
    assert res.exit_code == 0, res.output + repr(res.exception)
    nocrf = pd.read_csv(tmp_path / "nocrf.csv")
    assert set(nocrf["crf"]) == {False}
    pd.testing.assert_frame_equal(nocrf.reset_index(drop=True), df[~df["crf"]].reset_index(drop=True))
    assert all(artifact_mtimes(storage)[p] == t for p, t in before.items())


def test_bad_key_is_one_error_line(setup):
    storage, root, out, _ = setup
    line = _one_error_line(_evaluate(storage, root, "doesnotexist"))
    assert "doesnotexist" in line
    line = _one_error_line(_evaluate(storage, root, out.probe_key))  # a linear probe, not a head
    assert "not a complete head artifact" in line


def test_class_count_mismatch_is_one_error_line(setup, tmp_path):
    """A 3-class checkpoint (no hyper-parameters: classes from the linear probe) on the 5-class dataset."""
    from commands.importing import import_stego

    storage, root, _, lit = setup
    sd = dict(lit.state_dict())
    sd["cluster_probe.clusters"] = torch.randn(3, DIM)
    sd["linear_probe.weight"], sd["linear_probe.bias"] = torch.randn(3, DIM, 1, 1), torch.randn(3)
    ckpt = tmp_path / "three.ckpt"
    torch.save({"state_dict": sd}, ckpt)
    three = import_stego(ckpt, storage)
    line = _one_error_line(_evaluate(storage, root, three.head_key))
    assert three.head_key in line and "3 classes" in line and "5" in line


def test_kmeans_of_the_head_is_evaluated_when_present(setup, tmp_path, prefect_harness):
    """A k-means artifact over the head's codes (as the train flows write it) adds k-means rows."""
    from usseg_core.store import ArtifactStore, artifact_key

    storage, root, out, _ = setup
    store = ArtifactStore(storage)
    params, upstream = {"k": N_CLASSES, "seed": 0, "n_epochs": 2, "metric": "cosine"}, {"head": out.head_key}
    art = store.begin("kmeans", artifact_key("kmeans", 1, params, upstream), version=1, params=params,
                      upstream=upstream)
    np.save(art.file("centroids.npy"), np.random.default_rng(0).normal(size=(N_CLASSES, DIM)).astype(np.float32))
    store.finish(art, k=N_CLASSES)
    results = tmp_path / "km.csv"
    res = _evaluate(storage, root, out.head_key, "--no-crf", "--results", str(results))
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "k-means rows skipped" not in res.output
    assert list(pd.read_csv(results)["clusterer"]) == ["cluster-probe", "kmeans", "linear"]
