"""spherical_kmeans recovers separated clusters, is deterministic, re-seeds empty clusters;
assign_clusters / cluster_logits against direct cosine computations; [code:PiCIE]'s Euclidean k-means
(faiss and the torch fallback) and running-mean update on a hand-computed case."""
import sys

import numpy as np
import pytest
import torch

from usseg_core.cluster import (assign_clusters, cluster_logits, euclidean_kmeans, reference_kmeans,
                                running_mean_update, spherical_kmeans)


def _blobs(rng, k=4, d=16, per=300, spread=0.05):
    centres = np.linalg.qr(rng.normal(size=(d, d)))[0][:k]  # orthonormal: well separated on the sphere
    labels = np.repeat(np.arange(k), per)
    x = centres[labels] + spread * rng.normal(size=(k * per, d))
    x *= rng.uniform(0.5, 3.0, size=(len(x), 1))  # norms must not matter
    order = rng.permutation(len(x))
    return x[order].astype(np.float32), labels[order], centres


def _batches(x, size=128):
    return lambda: (x[i:i + size] for i in range(0, len(x), size))


def _purity(pred, labels, k):
    cm = np.zeros((k, labels.max() + 1), np.int64)
    np.add.at(cm, (pred, labels), 1)
    return cm.max(axis=1).sum() / len(labels), cm


def test_recovers_separated_clusters():
    rng = np.random.default_rng(0)
    x, labels, centres = _blobs(rng)
    c = spherical_kmeans(_batches(x), 4, init_samples=500, seed=0, device="cpu")
    assert c.shape == (4, 16) and c.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(c, axis=1), 1.0, atol=1e-5)
    purity, cm = _purity(assign_clusters(x, c), labels, 4)
    assert purity == 1.0 and (cm > 0).sum() == 4  # one cluster per blob
    assert (c @ centres.T).max(axis=1).min() > 0.99  # centroids sit on the true centres


def test_deterministic_for_a_seed():
    x, _, _ = _blobs(np.random.default_rng(1), k=6, per=200, spread=0.3)
    a = spherical_kmeans(_batches(x, 100), 6, init_samples=700, seed=3, device="cpu")
    b = spherical_kmeans(_batches(x, 100), 6, init_samples=700, seed=3, device="cpu")
    np.testing.assert_array_equal(a, b)


def test_reseeds_empty_cluster():
    rng = np.random.default_rng(2)
    x, labels, centres = _blobs(rng, k=3)
    # third centroid points away from all data: it wins no point in the first pass
    init = np.stack([centres[0], centres[1], -(centres[0] + centres[1] + centres[2])])
    c = spherical_kmeans(_batches(x), 3, init_centroids=init, n_epochs=3, device="cpu")
    purity, cm = _purity(assign_clusters(x, c), labels, 3)
    assert purity == 1.0 and (cm > 0).sum() == 3
    # without re-seeding the blob of centres[2] would stay merged into another cluster
    stuck = spherical_kmeans(_batches(x), 3, init_centroids=init, n_epochs=0, device="cpu")
    assert _purity(assign_clusters(x, stuck), labels, 3)[0] < 1.0


def test_reservoir_sample_smaller_than_data_still_works():
    x, labels, _ = _blobs(np.random.default_rng(4), k=3, per=400)
    c = spherical_kmeans(_batches(x, 50), 3, init_samples=90, seed=1, device="cpu")
    assert _purity(assign_clusters(x, c), labels, 3)[0] == 1.0


def test_assign_clusters_shapes_and_types():
    rng = np.random.default_rng(5)
    centroids = rng.normal(size=(5, 8)).astype(np.float32)
    centroids[0] *= 10  # centroid norms must not bias the assignment
    codes = torch.from_numpy(rng.normal(size=(2, 8, 3, 4)).astype(np.float32))
    flat = codes.permute(0, 2, 3, 1).reshape(-1, 8).numpy()
    unit_c = centroids / np.linalg.norm(centroids, axis=1, keepdims=True)
    want = (flat @ unit_c.T).argmax(1)
    got_np = assign_clusters(flat, centroids)
    assert isinstance(got_np, np.ndarray) and got_np.dtype == np.int64
    np.testing.assert_array_equal(got_np, want)
    got_t = assign_clusters(codes, torch.from_numpy(centroids))
    assert isinstance(got_t, torch.Tensor) and got_t.shape == (2, 3, 4)
    np.testing.assert_array_equal(got_t.reshape(-1).numpy(), want)


def test_cluster_logits_are_scaled_cosines():
    rng = np.random.default_rng(6)
    codes = torch.from_numpy(rng.normal(size=(2, 8, 3, 4)).astype(np.float32))
    centroids = rng.normal(size=(5, 8)).astype(np.float32)
    z = cluster_logits(codes, centroids, alpha=2.0)
    assert z.shape == (2, 5, 3, 4)
    v = codes[1, :, 2, 3].numpy()
    c = centroids[4]
    cos = v @ c / np.linalg.norm(v) / np.linalg.norm(c)
    assert z[1, 4, 2, 3].item() == pytest.approx(2 * cos, abs=1e-5)
    assert z.abs().max() <= 2.0 + 1e-5


def test_kmeans_takes_device_tensors_and_gives_the_numpy_result():
    """Batches may be tensors where the codes were computed (GPU codes are never copied per batch)."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((600, 8)).astype(np.float32)
    as_numpy = spherical_kmeans(lambda: (x[a:a + 100] for a in range(0, 600, 100)), 4, seed=1, device="cpu")
    as_tensor = spherical_kmeans(lambda: (torch.from_numpy(x[a:a + 100]) for a in range(0, 600, 100)), 4, seed=1,
                                 device="cpu")
    np.testing.assert_array_equal(as_numpy, as_tensor)


_INIT = torch.tensor([[1.0, 0.0], [0.8, -0.6], [0.0, 1.0]])
_GROUP = torch.tensor([[0.8, 0.6], [0.6, 0.8]])


def _sorted_rows(c: torch.Tensor) -> torch.Tensor:
    return c[c[:, 0].argsort(descending=True)]


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_reference_kmeans_on_a_hand_computed_case(backend, monkeypatch):
    if backend == "torch":
        monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss fails: the torch fallback
    else:
        pytest.importorskip("faiss")
    for seed in range(4):  # any start converges here: {(1,0), (0.8,-0.6)} and {(0,1)}
        init = euclidean_kmeans(_INIT, 2, n_iter=20, seed=seed)
        assert torch.allclose(_sorted_rows(init), torch.tensor([[0.9, -0.3], [0.0, 1.0]]), atol=1e-6)
    mu, counts = reference_kmeans(_INIT, [_GROUP], 2, n_iter=20, seed=0)
    order = mu[:, 0].argsort(descending=True)
    mu, counts = mu[order], counts[order]
    # squared distances to (0,1) vs (0.9,-0.3): (0.8,0.6) 0.80 vs 0.82, (0.6,0.8) 0.40 vs 1.30: both to
    # (0,1), which becomes (0,1)/3 + (2/3)(0.7, 0.7); (0.9,-0.3) is untouched (no re-seed in this phase)
    assert torch.allclose(mu, torch.tensor([[0.9, -0.3], [0.46667, 0.8]]), atol=1e-5)
    assert counts.tolist() == [2.0, 3.0]
    assert torch.allclose(mu.norm(dim=1), torch.tensor([0.9487, 0.9262]), atol=1e-4)  # not unit


def test_running_mean_update_is_an_exact_running_mean_and_leaves_misses_alone():
    c = torch.tensor([[0.9, -0.3], [0.0, 1.0], [5.0, 5.0]])
    counts = torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64)
    x = torch.tensor([[0.8, 0.6], [0.6, 0.8], [1.0, 0.0]])
    new, n = running_mean_update(c, counts, x, torch.tensor([1, 1, 0]))
    assert torch.allclose(new[0], (2 * c[0] + x[2]) / 3)  # mean of 2 old points and 1 new
    assert torch.allclose(new[1], (c[1] + x[0] + x[1]) / 3)
    assert torch.equal(new[2], c[2]) and n.tolist() == [3.0, 3.0, 0.0]  # an empty cluster stays as it is
    assert torch.equal(c[0], torch.tensor([0.9, -0.3]))  # inputs untouched


def test_torch_fallback_splits_an_empty_cluster(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)
    # two coincident points: a start on both leaves one cluster empty (ties go to the first), whose mean
    # stays (1, 1), so without faiss's split the tie and the empty cluster would last
    x = torch.tensor([[1.0, 1.0], [1.0, 1.0], [0.0, 1.0], [2.0, 1.0], [10.0, 0.0], [10.0, 1.0]])
    duplicate_starts = 0
    for seed in range(12):
        starts = set(torch.randperm(6, generator=torch.Generator().manual_seed(seed))[:3].tolist())
        duplicate_starts += {0, 1} <= starts
        mu = euclidean_kmeans(x, 3, n_iter=10, seed=seed)
        labels = ((x[:, None] - mu[None]) ** 2).sum(-1).argmin(1)
        assert torch.bincount(labels, minlength=3).min() >= 1, seed  # no cluster left empty
    assert duplicate_starts >= 2  # the case was met
