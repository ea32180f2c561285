"""mine_knn equals brute force; self stays in column 0 with duplicates; sample_knn never returns self;
approximate search reports its recall, raises its effort or falls back; knn.* settings reach the artifact."""
import dataclasses
import json

import numpy as np
import pytest
import torch

from usseg_core.errors import ConfigError
from usseg_core.knn import AUTO_EXACT_MAX, KnnSettings, mine_knn, sample_knn, search_knn, stego_chunked_knn

BACKENDS = ["torch", pytest.param("faiss", marks=pytest.mark.skipif(
    __import__("importlib").util.find_spec("faiss") is None, reason="faiss not installed"))]


def _brute_force(x, k):
    """numpy reference: cosine, self forced first via +inf on the diagonal, stable descending sort."""
    z = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = (z.astype(np.float64) @ z.T.astype(np.float64))
    np.fill_diagonal(sims, np.inf)
    return np.argsort(-sims, axis=1, kind="stable")[:, : k + 1]


def _features(rng, n=300, c=24, n_dup=20):
    x = rng.normal(size=(n, c)).astype(np.float32)
    # duplicate pairs (scaled: same direction, so cosine 1 with the original)
    src = rng.choice(n, n_dup, replace=False)
    dst = rng.choice(np.setdiff1d(np.arange(n), src), n_dup, replace=False)
    x[dst] = 2.5 * x[src]
    return x, src, dst


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block", [7, 64, 8192])
def test_mine_knn_equals_brute_force(backend, block):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 24)).astype(np.float32)  # distinct rows: no ties, indices must match
    knn = mine_knn(x, k=10, block=block, device="cpu", backend=backend)
    assert knn.shape == (300, 11) and knn.dtype == np.int64
    np.testing.assert_array_equal(knn, _brute_force(x, 10))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block", [7, 8192])
def test_mine_knn_with_duplicate_rows(backend, block):
    rng = np.random.default_rng(0)
    x, src, dst = _features(rng)
    knn = mine_knn(x, k=10, block=block, device="cpu", backend=backend)
    np.testing.assert_array_equal(knn[:, 0], np.arange(300))
    # twins tie with each other for every query, so compare similarities, not indices
    z = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = z.astype(np.float64) @ z.T.astype(np.float64)
    got = np.take_along_axis(sims, knn, axis=1)
    want = np.take_along_axis(sims, _brute_force(x, 10), axis=1)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert all(len(set(row)) == 11 for row in knn)
    # a duplicate is its twin's first neighbour, and never displaces self
    np.testing.assert_array_equal(knn[src, 1], dst)
    np.testing.assert_array_equal(knn[dst, 1], src)


@pytest.mark.parametrize("backend", BACKENDS)
def test_self_stays_first_among_many_duplicates(backend):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 8)).astype(np.float32)
    x[:12] = x[0]  # 12 identical rows, more than k+1 = 5
    knn = mine_knn(x, k=4, block=5, device="cpu", backend=backend)
    np.testing.assert_array_equal(knn[:, 0], np.arange(40))
    for i in range(12):
        row = knn[i, 1:]
        assert i not in row and set(row) <= set(range(12)) and len(set(row)) == 4


def test_mine_knn_k_too_large():
    x = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    with pytest.raises(ConfigError, match="k=5"):
        mine_knn(x, k=5)
    assert mine_knn(x, k=4, backend="torch").shape == (5, 5)


def test_stego_chunked_knn_matches_on_distinct_rows():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(200, 16)).astype(np.float32)
    ref = stego_chunked_knn(x, 8, n_chunks=16)
    np.testing.assert_array_equal(ref, mine_knn(x, k=7, backend="torch", device="cpu"))


def test_sample_knn_never_returns_self_and_covers_ranks():
    rng = np.random.default_rng(3)
    x, _, _ = _features(rng, n=100, c=8, n_dup=10)
    knn = mine_knn(x, k=30, backend="torch", device="cpu")
    idx = np.repeat(np.arange(100), 50)
    nbrs = sample_knn(knn, idx, 7, np.random.default_rng(0))
    assert nbrs.shape == idx.shape
    assert not (nbrs == idx).any()
    # drawn from ranks 1..7 only, and all 7 ranks occur
    ranks = np.argmax(knn[idx] == nbrs[:, None], axis=1)
    assert ranks.min() == 1 and ranks.max() == 7 and len(np.unique(ranks)) == 7
    with pytest.raises(ConfigError):
        sample_knn(knn, idx, 31, rng)
    with pytest.raises(ConfigError):
        sample_knn(knn, idx, 0, rng)


# --- the search method: settings, approximate search, recall, auto, the --set path ------------------------

def _clustered(n=3000, c=32, n_clusters=60, seed=0):
    """Unit rows around random cluster centres (pooled image features are clustered like this)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, c))
    x = centres[rng.integers(0, n_clusters, n)] + 0.3 * rng.normal(size=(n, c))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _independent_recall(table, truth, rows, ranks=7):
    return np.mean([len(set(table[r, 1 : ranks + 1]) & set(truth[r, 1 : ranks + 1])) / ranks for r in rows])


def _assert_valid(table, n, width):
    assert table.shape == (n, width) and table.dtype == np.int64
    np.testing.assert_array_equal(table[:, 0], np.arange(n))
    assert (table >= 0).all() and all(len(set(row)) == width for row in table)


def test_exact_method_equals_brute_force():
    x = np.random.default_rng(0).normal(size=(300, 24)).astype(np.float32)
    res = search_knn(x, 10, KnnSettings(method="exact"), device="cpu")
    np.testing.assert_array_equal(res.table, _brute_force(x, 10))
    assert res.meta["method"] == "exact" and res.meta["recall_at_7"] == 1.0 and res.sample.size == 0


@pytest.mark.parametrize("method", ["ivf", pytest.param("hnsw", marks=pytest.mark.skipif(
    __import__("importlib").util.find_spec("faiss") is None, reason="faiss not installed"))])
def test_approximate_search_reports_the_recall_of_its_sample(method):
    x = _clustered()
    res = search_knn(x, 30, KnnSettings(method=method, recall_sample=300, seed=3), device="cpu")
    _assert_valid(res.table, 3000, 31)
    truth = _brute_force(x, 30)
    assert res.meta["method"] == method and "fallback" not in res.meta
    assert len(res.sample) == 300 and len(set(res.sample)) == 300
    recall = res.meta["recall_at_7"]
    assert recall >= 0.99  # the floor
    # the recorded recall is the recall of the returned table on the sample, computed independently
    assert recall == pytest.approx(_independent_recall(res.table, truth, res.sample), abs=1e-9)
    # and the sample is representative: the recall over every row is about the same
    assert _independent_recall(res.table, truth, range(3000)) == pytest.approx(recall, abs=0.01)
    effort = res.meta[method]["effort"]
    assert effort[-1]["recall"] == recall


def test_ivf_raises_nprobe_until_the_floor_and_its_prediction_holds():
    x = _clustered()
    res = search_knn(x, 30, KnnSettings(method="ivf", nprobe=1, recall_sample=300), device="cpu")
    ivf = res.meta["ivf"]
    steps = [e["nprobe"] for e in ivf["effort"]]
    assert steps[0] == 1 and steps == sorted(steps) and ivf["nprobe"] == steps[-1] > 1
    assert all(e["predicted_recall"] < 0.99 for e in ivf["effort"][:-1])
    # within the scanned lists similarities are exact: predicted recall = measured recall
    assert ivf["effort"][-1]["predicted_recall"] == pytest.approx(res.meta["recall_at_7"], abs=1e-9)
    assert 0 < ivf["scanned_fraction"] < 0.25


def test_unreachable_floor_falls_back_to_exact():
    x = np.random.default_rng(0).normal(size=(2000, 64)).astype(np.float32)  # no structure for IVF
    res = search_knn(x, 10, KnnSettings(method="ivf"), device="cpu")
    assert res.meta["fallback"] == "exact" and res.meta["recall_at_7"] == 1.0
    assert res.meta["ivf"]["effort"][-1]["scanned_fraction"] > 0.25  # why it stopped raising nprobe
    np.testing.assert_array_equal(res.table, _brute_force(x, 10))


def test_auto_is_exact_up_to_the_threshold_and_ivf_above():
    cpu = torch.device("cpu")
    settings = KnnSettings(auto_threshold=1000)
    assert settings.resolve(1000, cpu) == "exact" and settings.resolve(1001, cpu) == "ivf"
    assert KnnSettings().resolve(AUTO_EXACT_MAX["cpu"] + 1, cpu) == "ivf"
    assert KnnSettings().resolve(AUTO_EXACT_MAX["cpu"], cpu) == "exact"
    assert KnnSettings().resolve(AUTO_EXACT_MAX["cpu"] + 1, torch.device("cuda")) == "exact"
    x = _clustered(n=1500)
    assert search_knn(x, 30, KnnSettings(auto_threshold=2000), device="cpu").meta["method"] == "exact"
    res = search_knn(x, 30, KnnSettings(auto_threshold=1000), device="cpu")
    assert res.meta["method"] == "ivf" and res.meta["method_requested"] == "auto"
    _assert_valid(res.table, 1500, 31)


def test_key_is_the_requested_method_and_the_parameters_it_reads():
    keys = {m: KnnSettings(method=m).key_params() for m in ("exact", "ivf", "hnsw", "auto")}
    assert keys["exact"] == {"method": "exact"}
    assert keys["ivf"]["nprobe"] == 4 and "ef_search" not in keys["ivf"]
    assert keys["hnsw"]["ef_search"] == 128 and "nprobe" not in keys["hnsw"]
    assert "auto_threshold" in keys["auto"] and len({json.dumps(k, sort_keys=True) for k in keys.values()}) == 4
    assert KnnSettings(method="ivf", nprobe=8).key_params() != keys["ivf"]


@pytest.mark.parametrize("kwargs, match", [
    ({"method": "annoy"}, "knn.method='annoy'.*valid: auto, exact, ivf, hnsw"),
    ({"method": "ivf", "nprobe": 0}, "knn.nprobe must be an integer >= 1"),
    ({"method": "ivf", "nlist": 2.5}, "knn.nlist must be an integer"),
    ({"method": "hnsw", "m": 1}, "knn.m must be >= 2"),
    ({"method": "ivf", "recall_floor": 1.5}, r"knn.recall_floor must be a number in \(0, 1\]"),
    ({"method": "ivf", "ef_search": 64}, "knn.ef_search does not apply to knn.method=ivf; its fields: knn.method, "
                                          "knn.nlist, knn.nprobe"),
    ({"method": "exact", "nprobe": 8}, "knn.nprobe does not apply to knn.method=exact; its fields: knn.method$"),
])
def test_invalid_settings_name_the_field_and_the_valid_values(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        KnnSettings(**kwargs)


def test_invalid_knn_override_fails_at_validation_with_the_valid_fields():
    from usseg_core.spec import RunSpec

    with pytest.raises(ConfigError, match="--set knn.nprob: unknown KNN search field; valid: knn.auto_threshold, "
                                          "knn.ef_construction, knn.ef_search, knn.k, knn.m, knn.method, "
                                          "knn.nlist, knn.nprobe, knn.recall_floor, knn.recall_sample, knn.seed"):
        RunSpec(head="stego", dataset="synthetic", overrides={"knn.nprob": 8})
    with pytest.raises(ConfigError, match="knn.method='flat'"):
        RunSpec(head="stego", dataset="synthetic", overrides={"knn.method": "flat"})


def _feature_artifact(storage, rows):
    """A completed features artifact holding ``rows`` as its pooled features; its ensure_features ref."""
    from usseg_core.features import FeatureStore
    from usseg_core.store import ArtifactStore

    store = ArtifactStore(storage)
    art = store.begin("features", "f" * 16, version=1, params={}, view={"policy": "five_crop"})
    feats = FeatureStore.create(art.file("features.zarr"), len(rows), rows.shape[1], 1, 1, shard_size=len(rows))
    feats.write(list(range(len(rows))), rows[:, :, None, None], rows)
    store.finish(art, n_items=len(rows))
    return {"key": art.key, "path": str(art.file("features.zarr"))}


def test_set_knn_reaches_ensure_knn_and_its_artifact(tmp_path, monkeypatch):
    """--set knn.method=hnsw --set knn.ef_search=48: parsed, routed (run and compare), validated, passed to
    ensure_knn, searched with, keyed and recorded."""
    import flows.train as train
    import tasks.inputs as input_stages
    from usseg_core.spec import RunSpec, route_overrides
    from tasks.heads import KNN_VERSION, ensure_knn
    from usseg_core.config import parse_set_options
    from usseg_core.datasets.synthetic import ensure_synthetic
    from usseg_core.store import ArtifactStore

    overrides = parse_set_options(["knn.method=hnsw", "knn.ef_search=48", "steps=5"])
    expected = KnnSettings(method="hnsw", ef_search=48)
    for head, routed in route_overrides(["stego", "omh", "picie"], overrides).items():
        assert RunSpec(head=head, dataset="synthetic", overrides=routed).knn_config() == expected
    spec = RunSpec(head="stego", dataset="synthetic", overrides=overrides, storage=str(tmp_path / "s"),
                   data_root=str(ensure_synthetic(tmp_path / "data", n_train=7, n_val=1, height=32, width=32)))  # 35 five-crops > k=30
    assert "knn.method" not in spec.head_overrides()
    calls = {}
    monkeypatch.setattr(input_stages, "ensure_features", lambda *a, **kw: {"key": "features", "path": "-"})
    monkeypatch.setattr(input_stages, "ensure_knn", lambda storage, feats, settings: calls.setdefault("knn", settings))
    train.train_inputs(spec)
    assert calls["knn"] == expected

    storage = str(tmp_path / "store")
    ref = _feature_artifact(storage, _clustered(n=400))
    top10 = dataclasses.replace(expected, k=10)
    done = ensure_knn.fn(storage, [ref], settings=top10)
    art = ArtifactStore(storage).find(done["key"])
    assert art.meta["params"] == {"k": 10, **expected.key_params()} and str(art.meta["version"]) == str(KNN_VERSION)
    search = art.meta["search"]
    assert search["method"] == "hnsw" and search["hnsw"]["effort"][0]["ef_search"] == 48
    assert search["settings"] == {**json.loads(json.dumps(dataclasses.asdict(top10)))}
    assert search["recall_at_7"] >= 0.99 and np.load(done["path"]).shape == (400, 11)
    exact = ensure_knn.fn(storage, [ref], settings=KnnSettings(k=10, method="exact"))
    assert exact["key"] != done["key"]
    assert ensure_knn.fn(storage, [ref], settings=top10)["key"] == done["key"]  # a cache hit
