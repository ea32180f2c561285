"""mine_knn equals brute force; self stays in column 0 with duplicates; sample_knn never returns self."""
import numpy as np
import pytest

from usseg_core.errors import ConfigError
from usseg_core.knn import mine_knn, sample_knn, stego_chunked_knn

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
