"""STEGO head and loss against brute-force per-pair loops (values and gradients, float64)."""
from __future__ import annotations

import math

import pytest
import torch

from usseg_core.errors import ConfigError
from usseg_core.heads.stego import (
    STEGO_PRESETS,
    StegoConfig,
    StegoHead,
    StegoLoss,
    correlation,
    correspondence_loss,
    derangement,
    feature_correlation,
    sample_points,
    stego_config_for,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------- brute-force references (python loops)

def bf_bilinear(t: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """t (C, h, w) at normalised (x, y) in [-1, 1], align_corners=True -> (C,)."""
    h, w = t.shape[1:]
    px, py = (x + 1) / 2 * (w - 1), (y + 1) / 2 * (h - 1)
    x0, y0 = min(int(math.floor(px)), w - 1), min(int(math.floor(py)), h - 1)
    x1, y1 = min(x0 + 1, w - 1), min(y0 + 1, h - 1)
    ax, ay = px - x0, py - y0
    return ((1 - ax) * (1 - ay) * t[:, y0, x0] + ax * (1 - ay) * t[:, y0, x1]
            + (1 - ax) * ay * t[:, y1, x0] + ax * ay * t[:, y1, x1])


def bf_points(t: torch.Tensor, coords: torch.Tensor) -> list[list[torch.Tensor]]:
    """Per image, the list of sampled vectors in row-major grid order."""
    s = coords.shape[1]
    return [[bf_bilinear(t[b], float(coords[b, p, q, 0]), float(coords[b, p, q, 1]))
             for p in range(s) for q in range(s)] for b in range(t.shape[0])]


def bf_cos(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.dot(u, v) / (u.norm() * v.norm())


def bf_term(f1, f2, c1, c2, shift, pointwise=True, zero_clamp=True):
    """Mean loss, mean F^SC, mean S over all (b, m, n) for lists of vectors per image."""
    nb, m, n = len(f1), len(f1[0]), len(f2[0])
    fd = [[[float(bf_cos(f1[b][i], f2[b][j])) for j in range(n)] for i in range(m)] for b in range(nb)]
    if pointwise:
        glob = sum(v for b in fd for row in b for v in row) / (nb * m * n)
        fd = [[[v - sum(row) / n + glob for v in row] for row in b] for b in fd]
    losses, fds, cds = [], [], []
    for b in range(nb):
        for i in range(m):
            for j in range(n):
                cd = bf_cos(c1[b][i], c2[b][j])
                s = torch.clamp(cd, min=0.0) if zero_clamp else cd
                losses.append(-s * (fd[b][i][j] - shift))
                fds.append(fd[b][i][j])
                cds.append(cd)
    return torch.stack(losses).mean(), sum(fds) / len(fds), torch.stack(cds).mean()


# ---------------------------------------------------------------- primitives

def test_correlation_is_cosine_of_every_position_pair():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 3, 2, 3, generator=g, dtype=torch.float64), torch.randn(2, 3, 4, 2, generator=g,
                                                                                dtype=torch.float64)
    c = correlation(a, b)
    assert c.shape == (2, 2, 3, 4, 2)
    for n in range(2):
        for h in range(2):
            for w in range(3):
                for i in range(4):
                    for j in range(2):
                        assert c[n, h, w, i, j] == pytest.approx(float(bf_cos(a[n, :, h, w], b[n, :, i, j])))


def test_sample_points_matches_hand_bilinear():
    g = torch.Generator().manual_seed(1)
    t = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)
    coords = torch.rand(2, 3, 3, 2, generator=g, dtype=torch.float64) * 2 - 1
    coords[0, 0, 0] = torch.tensor([-1.0, -1.0])  # corners hit grid points exactly
    coords[0, 0, 1] = torch.tensor([1.0, 1.0])
    out = sample_points(t, coords)  # (B, C, S, S)
    ref = bf_points(t, coords)
    for b in range(2):
        for p in range(3):
            for q in range(3):
                torch.testing.assert_close(out[b, :, p, q], ref[b][p * 3 + q])
    torch.testing.assert_close(out[0, :, 0, 0], t[0, :, 0, 0])
    torch.testing.assert_close(out[0, :, 0, 1], t[0, :, -1, -1])


def test_spatial_centering_matches_hand_formula():
    g = torch.Generator().manual_seed(2)
    f1, f2 = torch.randn(3, 5, 3, 3, generator=g), torch.randn(3, 5, 4, 2, generator=g)
    raw = correlation(f1, f2)
    expected = raw - raw.mean(dim=(3, 4), keepdim=True) + raw.mean()  # Eq. 3 + global mean added back
    torch.testing.assert_close(feature_correlation(f1, f2, pointwise=True), expected)
    torch.testing.assert_close(feature_correlation(f1, f2, pointwise=False), raw)
    centred = feature_correlation(f1, f2, pointwise=True)
    # every query's mean over the second image is the same number: the uncentred global mean
    torch.testing.assert_close(centred.mean(dim=(3, 4)), torch.full((3, 3, 3), float(raw.mean())))


def test_correspondence_loss_matches_brute_force_values_and_gradients():
    g = torch.Generator().manual_seed(3)
    kw = dict(generator=g, dtype=torch.float64)
    f1, f2 = torch.randn(2, 4, 2, 3, **kw), torch.randn(2, 4, 3, 2, **kw)
    c1 = torch.randn(2, 3, 2, 3, **kw).requires_grad_()
    c2 = torch.randn(2, 3, 3, 2, **kw).requires_grad_()
    for pointwise in (True, False):
        for zero_clamp in (True, False):
            loss, fd = correspondence_loss(f1, f2, c1, c2, 0.2, pointwise=pointwise, zero_clamp=zero_clamp)
            assert loss.shape == fd.shape == (2, 2, 3, 3, 2)
            vec = lambda t: [[t[b, :, h, w] for h in range(t.shape[2]) for w in range(t.shape[3])]  # noqa: E731
                             for b in range(t.shape[0])]
            ref, ref_fd, _ = bf_term(vec(f1), vec(f2), vec(c1), vec(c2), 0.2, pointwise, zero_clamp)
            torch.testing.assert_close(loss.mean(), ref)
            assert float(fd.mean()) == pytest.approx(ref_fd)
            got = torch.autograd.grad(loss.mean(), (c1, c2))
            want = torch.autograd.grad(ref, (c1, c2))
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b)


def test_zero_clamp_removes_negative_code_correlations():
    f = torch.tensor([[[[1.0, 0.0]]], [[[0.0, 1.0]]]], dtype=torch.float64).permute(1, 0, 2, 3)  # (1, 2, 1, 2)
    # codes at the two positions are anti-parallel: S = [[1, -1], [-1, 1]]
    c = torch.tensor([[[[1.0, -1.0]]]], dtype=torch.float64).requires_grad_()  # (1, 1, 1, 2)
    loss, fd = correspondence_loss(f, f, c, c, 0.5, pointwise=False, zero_clamp=True)
    # F = identity; diagonal: -1 * (1 - 0.5); off-diagonal: clamp(-1) = 0
    torch.testing.assert_close(loss.reshape(2, 2), torch.tensor([[-0.5, 0.0], [0.0, -0.5]], dtype=torch.float64))
    loss_nc, _ = correspondence_loss(f, f, c, c, 0.5, pointwise=False, zero_clamp=False)
    # unclamped off-diagonal: -(-1) * (0 - 0.5) = -0.5
    torch.testing.assert_close(loss_nc.reshape(2, 2), torch.full((2, 2), -0.5, dtype=torch.float64))


def test_features_get_no_gradient():
    f = torch.randn(1, 3, 2, 2, requires_grad=True)
    c = torch.randn(1, 2, 2, 2, requires_grad=True)
    loss, fd = correspondence_loss(f, f, c, c, 0.1)
    assert not fd.requires_grad
    loss.mean().backward()
    assert f.grad is None and c.grad is not None


@pytest.mark.parametrize("n", [2, 3, 5, 16])
def test_derangement_is_a_permutation_without_fixed_points(n):
    g = torch.Generator().manual_seed(n)
    seen = set()
    for _ in range(200):
        p = derangement(n, g)
        assert sorted(p.tolist()) == list(range(n))
        assert not (p == torch.arange(n)).any()
        seen.add(tuple(p.tolist()))
    # uniform over derangements: n=3 has exactly 2, both should appear
    if n == 3:
        assert len(seen) == 2


def test_derangement_of_one_is_an_error():
    with pytest.raises(ConfigError):
        derangement(1)


# ---------------------------------------------------------------- full loss

def test_stego_loss_matches_brute_force_values_and_gradients():
    g = torch.Generator().manual_seed(4)
    kw = dict(generator=g, dtype=torch.float64)
    feats, feats_pos = torch.randn(3, 4, 3, 4, **kw), torch.randn(3, 4, 3, 4, **kw)
    codes = torch.randn(3, 3, 3, 4, **kw).requires_grad_()
    codes_pos = torch.randn(3, 3, 3, 4, **kw).requires_grad_()
    weights, shifts = (0.7, 0.3, 0.6), (0.1, 0.05, 0.4)
    loss_fn = StegoLoss(weights, shifts, feature_samples=2, neg_samples=2)
    total, stats = loss_fn(feats, feats_pos, codes, codes_pos, generator=torch.Generator().manual_seed(9))

    # replay the same draws: coords1, coords2, then one derangement per negative sample
    r = torch.Generator().manual_seed(9)
    coords1 = (torch.rand(3, 2, 2, 2, generator=r) * 2 - 1).double()
    coords2 = (torch.rand(3, 2, 2, 2, generator=r) * 2 - 1).double()
    perms = [derangement(3, r) for _ in range(2)]
    f1, c1 = bf_points(feats, coords1), bf_points(codes, coords1)
    f2, c2 = bf_points(feats_pos, coords2), bf_points(codes_pos, coords2)
    l_self, fd_self, cd_self = bf_term(f1, f1, c1, c1, shifts[0])
    l_knn, fd_knn, cd_knn = bf_term(f1, f2, c1, c2, shifts[1])
    rand = [bf_term(f1, bf_points(feats[p], coords2), c1, bf_points(codes[p], coords2), shifts[2]) for p in perms]
    l_rand = (rand[0][0] + rand[1][0]) / 2
    ref = weights[0] * l_self + weights[1] * l_knn + weights[2] * l_rand

    torch.testing.assert_close(total, ref)
    torch.testing.assert_close(stats["loss_self"], l_self.detach())
    torch.testing.assert_close(stats["loss_random"], l_rand.detach())
    assert float(stats["feat_corr_knn"]) == pytest.approx(fd_knn)
    assert float(stats["feat_corr_random"]) == pytest.approx((rand[0][1] + rand[1][1]) / 2)
    assert float(stats["code_corr_self"]) == pytest.approx(float(cd_self.detach()))
    got = torch.autograd.grad(total, (codes, codes_pos))
    want = torch.autograd.grad(ref, (codes, codes_pos))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_stego_loss_reports_every_term_and_keeps_feature_scale():
    feats, codes = torch.randn(2, 4, 3, 3), torch.randn(2, 3, 3, 3)
    loss_fn = StegoLoss((1.0, 0.0, 0.0), (0.0, 0.0, 0.0), feature_samples=3, neg_samples=1, pointwise=True)
    _, stats = loss_fn(feats, feats, codes, codes, generator=torch.Generator().manual_seed(0))
    assert set(stats) == {f"{k}_{t}" for k in ("loss", "feat_corr", "code_corr") for t in ("self", "knn", "random")}
    # centering keeps the global mean, so the reported mean F equals the uncentred one
    raw = StegoLoss((1.0, 0.0, 0.0), (0.0, 0.0, 0.0), feature_samples=3, neg_samples=1, pointwise=False)
    _, stats_raw = raw(feats, feats, codes, codes, generator=torch.Generator().manual_seed(0))
    for t in ("self", "knn", "random"):
        assert float(stats[f"feat_corr_{t}"]) == pytest.approx(float(stats_raw[f"feat_corr_{t}"]), abs=1e-6)


# ---------------------------------------------------------------- head and config

def test_head_shapes_and_shared_dropout_mask():
    torch.manual_seed(0)
    head = StegoHead(16, dim=5, dropout=0.5)
    x = torch.randn(4, 16, 6, 7)
    head.train()
    dropped, codes = head(x)
    assert dropped.shape == (4, 16, 6, 7) and codes.shape == (4, 5, 6, 7)
    # Dropout2d zeroes whole channels and scales the rest by 1/(1-p)
    zeroed = dropped.abs().sum(dim=(2, 3)) == 0
    assert zeroed.any() and not zeroed.all()
    torch.testing.assert_close(dropped[~zeroed], (x * 2)[~zeroed])
    # the codes come from the same dropped features the loss's F sees
    torch.testing.assert_close(codes, head.codes(dropped))
    # codes() ignores dropout even in train mode and equals eval-mode forward
    c1 = head.codes(x)
    head.eval()
    torch.testing.assert_close(head(x)[1], c1)
    torch.testing.assert_close(head(x)[0], x)


def test_head_is_linear_plus_mlp():
    head = StegoHead(3, dim=2, dropout=0.0)
    x = torch.randn(1, 3, 2, 2)
    lin = torch.einsum("dc,bchw->bdhw", head.linear.weight[:, :, 0, 0], x) + head.linear.bias[None, :, None, None]
    h = torch.relu(torch.einsum("ec,bchw->behw", head.nonlinear[0].weight[:, :, 0, 0], x)
                   + head.nonlinear[0].bias[None, :, None, None])
    mlp = (torch.einsum("de,behw->bdhw", head.nonlinear[2].weight[:, :, 0, 0], h)
           + head.nonlinear[2].bias[None, :, None, None])
    torch.testing.assert_close(head.codes(x), lin + mlp)


def test_config_defaults_and_presets():
    c = StegoConfig()
    assert (c.dim, c.lr, c.probe_lr, c.batch_size, c.steps) == (70, 5e-4, 5e-3, 16, 5000)
    assert (c.feature_samples, c.neg_samples, c.num_neighbors) == (11, 5, 7)
    coco = stego_config_for("cocostuff27")
    assert coco.shifts == (0.08, 0.02, 0.66) and coco.weights == (0.67, 0.25, 0.63)
    city = stego_config_for("cityscapes27", steps=10)
    assert city.shifts == (0.4583, 0.1754, 0.3136) and city.weights == (1.0, 0.5775, 0.9059) and city.steps == 10
    assert stego_config_for("potsdam3").shifts == (0.08, 0.02, 0.46)
    assert stego_config_for("reference-default").shifts == (0.18, 0.12, 0.46)
    assert stego_config_for("camvid11").shifts == "auto" and stego_config_for("camvid11").dim == 32
    assert stego_config_for("camvid11").steps == 1000 and stego_config_for("cocostuff27").steps == 5000
    assert stego_config_for("camvid11", dim=70).dim == 70
    assert stego_config_for("directory").dim == 70  # no preset: reference code dimension, automatic shifts
    assert set(STEGO_PRESETS) >= {"cocostuff27", "cityscapes27", "potsdam3", "reference-default"}
    assert stego_config_for("camvid11", auto_targets=(0.3, 0.3, 0.1)).auto_targets == (0.3, 0.3, 0.1)
    assert c.to_dict()["weights"] == [0.67, 0.25, 0.63]


@pytest.mark.parametrize("bad", [dict(shifts="manual"), dict(shifts=(0.1, 0.2)), dict(batch_size=1),
                                 dict(auto_targets=(0.3, 0.3, 1.0)), dict(dropout=1.0)])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ConfigError):
        StegoConfig(**bad)


def test_config_for_rejects_unknown_override():
    with pytest.raises(ConfigError, match="lerning_rate"):
        stego_config_for("cocostuff27", lerning_rate=1e-3)
