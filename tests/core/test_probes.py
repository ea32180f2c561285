"""Cluster probe (online spherical k-means) and linear probe on hand-made codes."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from usseg_core.heads.probes import ClusterProbe, LinearProbe, train_linear_probe


pytestmark = pytest.mark.usefixtures("one_thread")


def _hand_probe() -> tuple[ClusterProbe, torch.Tensor]:
    probe = ClusterProbe(dim=2, n_clusters=2)
    with torch.no_grad():
        probe.centroids.copy_(torch.tensor([[2.0, 0.0], [0.0, 3.0]]))  # unit directions e1, e2
    # four pixels in a (1, 2, 2, 2) code map: e1, 5·e2, (2, 1), (−1, 0)
    pixels = torch.tensor([[1.0, 0.0], [0.0, 5.0], [2.0, 1.0], [-1.0, 0.0]])
    codes = pixels.T.reshape(1, 2, 2, 2)
    return probe, codes


def test_cluster_probe_loss_and_cosines_by_hand():
    probe, codes = _hand_probe()
    loss, cos = probe(codes)
    r5 = math.sqrt(5)
    expected_cos = torch.tensor([[1.0, 0.0, 2 / r5, -1.0], [0.0, 1.0, 1 / r5, 0.0]]).reshape(1, 2, 2, 2)
    torch.testing.assert_close(cos, expected_cos)
    # arg-max cosines: 1, 1, 2/√5, 0 (the (−1, 0) pixel is closest to e2, at cosine 0)
    assert loss.item() == pytest.approx(-(1 + 1 + 2 / r5 + 0) / 4)
    assert probe.predict(codes).flatten().tolist() == [0, 1, 0, 1]


def test_cluster_probe_gradient_reaches_only_the_winning_centroid_direction():
    probe, codes = _hand_probe()
    codes = codes[:, :, 1:, :1]  # the single pixel (2, 1): centroid 0 wins (cosine 2/√5 > 1/√5)
    loss, _ = probe(codes)
    loss.backward()
    assert probe.centroids.grad[1].abs().sum() == 0
    # d(−cos)/dc for c = (2, 0), x = (2, 1)/√5: −(x − (x·ĉ)ĉ)/‖c‖ = (0, −1/(2√5))
    torch.testing.assert_close(probe.centroids.grad[0], torch.tensor([0.0, -1 / (2 * math.sqrt(5))]))


def test_cluster_probe_training_is_spherical_kmeans():
    torch.manual_seed(0)
    dirs = F.normalize(torch.tensor([[1.0, 0.2, 0.0], [0.0, 1.0, 0.3], [0.2, 0.0, 1.0]]), dim=1)
    labels = torch.randint(0, 3, (4, 6, 6))
    codes = (dirs[labels] * torch.rand(4, 6, 6, 1) * 3 + 0.05 * torch.randn(4, 6, 6, 3)).permute(0, 3, 1, 2)
    probe = ClusterProbe(3, 3)
    with torch.no_grad():  # start each centroid near a different direction, as k-means++ would
        probe.centroids.copy_(dirs + 0.3 * torch.randn(3, 3))
    opt = torch.optim.Adam(probe.parameters(), lr=5e-2)
    first = None
    for _ in range(100):
        loss, _ = probe(codes)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first
    pred = probe.predict(codes)
    # each cluster maps to one direction
    for k in range(3):
        assert (labels[pred == k] == labels[pred == k].mode().values).float().mean() > 0.95


def test_cluster_probe_logits_are_log_softmax_of_scaled_cosine():
    probe, codes = _hand_probe()
    logits = probe.logits(codes, alpha=2.0)
    _, cos = probe(codes)
    torch.testing.assert_close(logits, torch.log_softmax(2.0 * cos, dim=1))
    torch.testing.assert_close(logits.exp().sum(1), torch.ones(1, 2, 2))


def test_linear_probe_loss_matches_masked_cross_entropy_by_hand():
    torch.manual_seed(1)
    probe = LinearProbe(4, 3)
    codes = torch.randn(2, 4, 2, 2)
    labels = torch.tensor([[[0, 2], [-1, 1]], [[5, 0], [-1, -1]]])  # 5 is out of range -> ignored
    logits = probe(codes)  # (2, 3, 2, 2)
    terms = []
    for b in range(2):
        for i in range(2):
            for j in range(2):
                y = int(labels[b, i, j])
                if 0 <= y < 3:
                    terms.append(-torch.log_softmax(logits[b, :, i, j], 0)[y])
    torch.testing.assert_close(probe.loss(codes, labels), torch.stack(terms).mean())


def test_linear_probe_upsamples_to_label_size_and_handles_all_ignored():
    probe = LinearProbe(4, 3)
    codes = torch.randn(1, 4, 2, 2)
    labels = torch.zeros(1, 4, 4, dtype=torch.long)
    up = F.interpolate(probe(codes), size=(4, 4), mode="bilinear", align_corners=False)
    torch.testing.assert_close(probe.loss(codes, labels), F.cross_entropy(up, labels))
    empty = probe.loss(codes, torch.full((1, 4, 4), -1))
    assert empty.item() == 0.0
    empty.backward()  # a zero loss with a graph, not NaN


def test_train_linear_probe_fits_separable_codes_deterministically():
    means = torch.tensor([[2.0, 0.0], [0.0, 2.0], [-2.0, -2.0]])

    def batches():
        gg = torch.Generator().manual_seed(3)
        for _ in range(4):
            labels = torch.randint(0, 3, (2, 5, 5), generator=gg)
            codes = (means[labels] + 0.3 * torch.randn(2, 5, 5, 2, generator=gg)).permute(0, 3, 1, 2)
            labels[:, 0, 0] = -1
            yield codes, labels

    state = torch.get_rng_state()
    probe = train_linear_probe(batches, 3, epochs=30, lr=5e-2, device="cpu", seed=0)
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is left alone
    assert not probe.training
    correct = total = 0
    for codes, labels in batches():
        m = labels >= 0
        correct += int((probe.predict(codes)[m] == labels[m]).sum())
        total += int(m.sum())
    assert correct / total > 0.95
    again = train_linear_probe(batches, 3, epochs=30, lr=5e-2, device="cpu", seed=0)
    for a, b in zip(probe.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)


def test_train_linear_probe_without_batches_is_an_error():
    with pytest.raises(ValueError, match="no batch"):
        train_linear_probe(lambda: iter(()), 3, epochs=1)


@pytest.mark.parametrize("band_bytes", [1, 4 * 2 * 3 * 37 * 5, 1 << 30])  # a row a band, 5 rows, one piece
def test_linear_probe_loss_on_feature_codes_equals_upsampled_codes(band_bytes):
    """The loss and gradient of codes at feature resolution (logits upsampled, band by band) equal the
    old computation on codes upsampled to the label's size, up to float rounding."""
    torch.manual_seed(3)
    probe = LinearProbe(6, 3)
    codes = torch.randn(2, 6, 5, 7)
    labels = torch.randint(-1, 4, (2, 29, 37))  # 3 is out of range: ignored too
    labels[1, :9] = -1  # whole bands without a labelled pixel
    full = F.interpolate(codes, size=(29, 37), mode="bilinear", align_corners=False)
    want = probe.loss(full, labels)
    (g_want_w, g_want_b) = torch.autograd.grad(want, [probe.conv.weight, probe.conv.bias])
    got = probe.loss(codes, labels.to(torch.int16), band_bytes=band_bytes)
    (g_w, g_b) = torch.autograd.grad(got, [probe.conv.weight, probe.conv.bias])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_w, g_want_w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_b, g_want_b, rtol=1e-5, atol=1e-6)
    none = probe.loss(codes, torch.full((2, 29, 37), -1), band_bytes=band_bytes)
    assert none.item() == 0.0
    none.backward()
