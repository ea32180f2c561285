"""`usseg run hsg` end to end on the synthetic scenes: edges -> UCM -> segments -> views -> HSG -> k-means ->
evaluation under both protocols (Hungarian and segment retrieval) with the hierarchy picture, then
`usseg segment` writes the hierarchy of a new image; a second run is all cache hits."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
from PIL import Image
from typer.testing import CliRunner

from commands.cli import app
from tests.conftest import artifact_mtimes


def test_run_hsg_end_to_end_both_protocols_hierarchy_and_cache_hits(synthetic_small, tmp_path, prefect_harness):
    storage, results = tmp_path / "storage", tmp_path / "hsg.csv"
    args = ["run", "hsg", "--dataset", "synthetic", "--data-root", str(synthetic_small), "--resolution", "64",
            "--storage", str(storage), "--results", str(results), "--set", "epochs=3", "--set", "batch_size=4",
            "--set", "views.n_views=2", "--set", "anchors_per_view=32"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    df = pd.read_csv(results)
    expected = {("raw-features", "kmeans"), ("raw-features", "retrieval-k20"), ("hsg", "kmeans"),
                ("hsg", "linear"), ("hsg", "retrieval-k20")}
    assert set(zip(df.method, df.clusterer)) == expected
    assert len(df) == 2 * len(expected)  # with and without CRF
    assert (df.accuracy > 20).all()  # 5 classes: far above chance under every protocol
    stages = {p.parent.parent.name for p in storage.glob("*/*/meta.json")}
    assert {"oversegment", "views", "head", "kmeans", "segment-memory", "evaluation"} <= stages
    assert "knn" not in stages
    (head,) = list((storage / "head").iterdir())
    meta = json.loads((head / "meta.json").read_text())
    assert sorted(meta["upstream"]) == ["oversegment0", "views0"] and meta["method"] == "hsg"
    assert meta["steps"] == 3 * 2 and meta["n_views"] == 2  # 8 images / batch 4, 3 epochs
    (evaluation,) = list((storage / "evaluation").iterdir())
    assert (evaluation / "hierarchy.png").stat().st_size > 0 and (evaluation / "overlays.png").exists()

    out = tmp_path / "seg"
    image = next((synthetic_small / "val" / "images").iterdir())
    res = CliRunner().invoke(app, ["segment", str(image), "--model", head.name, "--out", str(out), "--no-crf",
                                   "--storage", str(storage)])
    assert res.exit_code == 0, res.output + repr(res.exception)
    levels = sorted(out.glob(f"{image.stem}_level*.png"))
    assert [p.name.split("_")[-2] for p in levels] == ["level0", "level1", "level2"]  # coarse to fine
    maps = [np.asarray(Image.open(p)) for p in levels]
    assert all(m.shape == maps[0].shape for m in maps)
    for coarse, fine in zip(maps[:-1], maps[1:]):  # every fine segment lies inside one coarse segment
        for g in np.unique(fine):
            assert len(np.unique(coarse[fine == g])) == 1
    assert len(np.unique(maps[0])) <= 4 and (out / f"{image.stem}_hierarchy.png").exists()

    before = artifact_mtimes(storage)
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert artifact_mtimes(storage) == before  # all cache hits

    # --retrieval-labels reaches the memory: a second memory per predictor keyed with twke18/HSG's rule
    memories = {p.name for p in (storage / "segment-memory").iterdir()}
    res = CliRunner().invoke(app, args + ["--no-crf", "--retrieval-labels", "reference"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    new = [p for p in (storage / "segment-memory").iterdir() if p.name not in memories]
    assert len(new) == 2  # the raw features' and the head's
    assert all(json.loads((p / "meta.json").read_text())["params"]["labels"] == "reference" for p in new)
