"""HSG's reference-code options (docs/methods/hsg.md, Deviations): each against a hand-computed value or an
independent re-typing of what twke18/HSG does, and the presets that select them."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from usseg_core.heads import get_head
from usseg_core.heads.hsg import (REFERENCE, HsgConfig, contrast_denominator, knn_graph, modularity_terms,
                                  pixel_segment_loss, separation_term)
from usseg_core.segsort import grid_init_labels, grid_kmeans, location_features

E = math.exp


# --- H1: L_f for an anchor without positives ---------------------------------------------------------

def test_own_segment_fallback_on_three_anchors_by_hand():
    # 3 anchors x 4 segments; anchor 2 (own segment 3) has no positive.
    logits = torch.tensor([[4.0, 1.0, 2.0, 0.0], [0.0, 3.0, 1.0, 2.0], [1.0, 0.5, -1.0, 2.0]])
    own = torch.tensor([0, 1, 3])
    positive = torch.tensor([[False, True, False, False], [False, False, True, True], [False] * 4])
    l0 = -math.log(E(1.0) / (E(1.0) + E(2.0) + E(0.0)))
    l1 = -math.log((E(1.0) + E(2.0)) / (E(0.0) + E(1.0) + E(2.0)))
    l2 = -math.log(E(2.0) / (E(2.0) + E(1.0) + E(0.5) + E(-1.0)))  # own over own + every other segment
    denom = contrast_denominator(logits, own)
    loss, n = pixel_segment_loss(denom, logits, positive)  # "drop"
    assert n == 2 and loss.item() == pytest.approx((l0 + l1) / 2, rel=1e-6)
    own_logit = logits.gather(1, own[:, None])[:, 0]
    lg = logits.clone().requires_grad_(True)
    loss, n = pixel_segment_loss(contrast_denominator(lg, own), lg, positive, lg.gather(1, own[:, None])[:, 0])
    assert n == 3 and loss.item() == pytest.approx((l0 + l1 + l2) / 3, rel=1e-6)
    loss.backward()
    assert torch.isfinite(lg.grad).all()  # the −inf rows of the positives never reach the gradient
    # d/d logit of anchor 2's own segment: (softmax over its 4 segments of the own column − 1) / 3
    p_own = E(2.0) / (E(2.0) + E(1.0) + E(0.5) + E(-1.0))
    assert lg.grad[2, 3].item() == pytest.approx((p_own - 1) / 3, rel=1e-5)
    # every anchor without positives: the mean of the fallback alone
    loss, n = pixel_segment_loss(denom, logits, torch.zeros_like(positive), own_logit)
    l0f = -math.log(E(4.0) / (E(4.0) + E(1.0) + E(2.0) + E(0.0)))
    l1f = -math.log(E(3.0) / (E(3.0) + E(0.0) + E(1.0) + E(2.0)))
    assert n == 3 and loss.item() == pytest.approx((l0f + l1f + l2) / 3, rel=1e-6)


def test_own_segment_in_hsg_loss_against_a_brute_force_loop():
    """hsg_loss's edge term with no_positive="own-segment", pixel by pixel from the definition."""
    from usseg_core.heads.hsg import Hierarchy
    from usseg_core.heads.hsg_train import hsg_loss

    cfg = HsgConfig(dim=8, hidden=16, heads=2, ffn=16, levels=(4, 2), train_grid=(2, 2), anchors_per_view=1000,
                    no_positive="own-segment")
    torch.manual_seed(1)
    B, V, h, w = 2, 2, 4, 4
    emb = F.normalize(torch.randn(B * V, 8, h, w), dim=1)
    regions = torch.randint(0, 4, (B * V, h, w))
    regions[1, 0, 0], regions[3, 2, 1] = 7, 8  # one-pixel regions of one view: one segment, no positive
    g0, _, _ = grid_kmeans(emb, cfg.train_grid, cfg.kmeans_iters)
    with torch.no_grad():
        _, stats = hsg_loss(emb, regions, Hierarchy(cfg).eval(), cfg, V)
    pix = [(v, y, x) for v in range(B * V) for y in range(h) for x in range(w)]
    key = {p: (p[0], int(g0[p]), int(regions[p])) for p in pix}
    segs = sorted(set(key.values()))
    u = {s: F.normalize(torch.stack([emb[p[0], :, p[1], p[2]] for p in pix if key[p] == s]).mean(0), dim=0)
         for s in segs}
    losses, fallbacks = [], 0
    for p in pix:
        v_i, own = emb[p[0], :, p[1], p[2]], key[p]
        pos = [s for s in segs if s != own and s[0] // V == p[0] // V and s[2] == own[2]] or [own]
        fallbacks += pos == [own]
        num = sum(E(16 * float(v_i @ u[s])) for s in pos)
        den = sum(E(16 * float(v_i @ u[s])) for s in segs if s != own) + (num if pos == [own] else 0.0)
        losses.append(-math.log(num / den))
    assert fallbacks > 0 and stats["anchors_edge"] == len(pix)
    assert stats["loss_edge"] == pytest.approx(float(np.mean(losses)), rel=1e-4)


# --- H3: goodness of grouping -----------------------------------------------------------------------

def test_reference_modularity_and_collapse_on_a_directed_three_node_graph_by_hand():
    # edges 0→1, 0→2, 1→0, 2→1: ΣA = 4, row sums d = (2, 1, 1); groups {0, 1}, {2}
    a = torch.tensor([[0.0, 1, 1], [1, 0, 0], [0, 1, 0]])
    m = torch.tensor([[1.0, 0], [1, 0], [0, 1]])
    # tr(Mᵀ A M) = A01 + A10 = 2; dᵀM = (3, 1), |dᵀM|² = 10
    mod, col = modularity_terms(a, m, "reference", "padded", n_pad=5)
    assert mod.item() == pytest.approx(1 - (2 - 10 / 8) / 8)  # N = 2 Σd = 8: 0.90625
    assert col.item() == pytest.approx(math.sqrt(2) * math.sqrt(5) / 5)  # sizes (2, 1), no −1
    mod, col = modularity_terms(a, m)  # DMoN: 2e = ΣA = 4
    assert mod.item() == pytest.approx(-(2 - 10 / 4) / 4)  # 0.125
    assert col.item() == pytest.approx(math.sqrt(2) * math.sqrt(5) / 3 - 1)


def test_directed_and_per_view_knn_graphs_by_hand():
    angles = torch.tensor([0.0, 0.5, 1.5])  # nearest: 0 → 1, 1 → 0, 2 → 1
    x = torch.stack([angles.cos(), angles.sin()], 1)
    view = torch.zeros(3, dtype=torch.long)
    directed = knn_graph(x, view, 1, "pooled", directed=True)
    assert directed.tolist() == [[0, 1, 0], [1, 0, 0], [0, 1, 0]]
    assert knn_graph(x, view, 1, "pooled").tolist() == [[0, 1, 0], [1, 0, 1], [0, 1, 0]]
    # three views of two centroids: per_view takes the nearest in *each* view, within_across the nearest in
    # the own view and the nearest among all others
    x6 = F.normalize(torch.randn(6, 4, generator=torch.Generator().manual_seed(2)), dim=1)
    v6 = torch.tensor([0, 0, 1, 1, 2, 2])
    per_view = knn_graph(x6, v6, 1, "per_view", directed=True)
    within = knn_graph(x6, v6, 1, "within_across", directed=True)
    sim = (x6 @ x6.t()).tolist()
    for i in range(6):
        want = set()
        for v in range(3):
            cols = [j for j in range(6) if j != i and int(v6[j]) == v]
            want.add(max(cols, key=lambda j: sim[i][j]))
        assert set(per_view[i].nonzero()[:, 0].tolist()) == want
        assert int(within[i].sum()) == 2 and int(per_view[i].sum()) == 3
    two = v6.clamp(max=1)  # two views: the two rules agree
    assert torch.equal(knn_graph(x6, two, 2, "per_view"), knn_graph(x6, two, 2, "within_across"))


def test_reference_separation_is_infonce_at_concentration_16_over_the_batch():
    z = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [-1.0, 0.2]])  # two images' two centroids
    u = F.normalize(z, dim=1)
    sim = (u @ u.t()).tolist()
    expect = np.mean([-math.log(E(16 * sim[k][k]) / sum(E(16 * sim[k][j]) for j in range(4))) for k in range(4)])
    assert separation_term(z, 16.0).item() == pytest.approx(expect, rel=1e-5)


# --- H5: G0 as the reference computes it --------------------------------------------------------------

def test_reference_grid_cells_by_hand():
    # rows: round(linspace(0, gh − 1, h)), half-to-even: h=7, gh=3 -> 0 0 1 1 1 2 2; h=5, gh=2 -> 0 0 0 1 1
    g = grid_init_labels(7, 5, (3, 2), init="reference")
    assert g[:, 0].tolist() == [0, 0, 2, 2, 2, 4, 4] and g[0].tolist() == [0, 0, 0, 1, 1]
    assert grid_init_labels(7, 5, (3, 2))[:, 0].tolist() == [0, 0, 0, 2, 2, 4, 4]  # floor: 3, 2, 2 rows
    loc = location_features(3, 2)
    assert loc.tolist() == [[-0.5, -0.5], [-0.5, 0.5], [0.0, -0.5], [0.0, 0.5], [0.5, -0.5], [0.5, 0.5]]


def _reference_g0(emb: torch.Tensor, grid: tuple[int, int], iters: int) -> torch.Tensor:
    """twke18/HSG's segment_by_kmeans for one (D, h, w) map, re-typed: per-axis rounded linspace labels
    numbered row + gh * col, relabelled 0..K-1 by sorting; features [emb, y − .5, x − .5] renormalised;
    `iters` rounds of (prototype = normalised sum, label = arg-max dot product)."""
    d, h, w = emb.shape
    rows = [round(float(v)) for v in np.linspace(0, grid[0] - 1, h)]
    cols = [round(float(v)) for v in np.linspace(0, grid[1] - 1, w)]
    raw = [rows[y] + (max(rows) + 1) * cols[x] for y in range(h) for x in range(w)]
    ids = sorted(set(raw))
    labels = np.array([ids.index(r) for r in raw])
    ys, xs = np.linspace(0, 1, h), np.linspace(0, 1, w)
    feats = []
    for y in range(h):
        for x in range(w):
            f = np.concatenate([emb[:, y, x].double().numpy(), [ys[y] - 0.5, xs[x] - 0.5]])
            feats.append(f / np.linalg.norm(f))
    feats = np.stack(feats)
    for _ in range(iters):
        protos = np.zeros((len(ids), feats.shape[1]))
        np.add.at(protos, labels, feats)
        norms = np.linalg.norm(protos, axis=1, keepdims=True)
        protos = protos / np.maximum(norms, 1e-12)
        labels = (feats @ protos.T).argmax(1)
    return torch.from_numpy(labels).reshape(h, w)


def _adjusted_rand_index(a: torch.Tensor, b: torch.Tensor) -> float:
    """Hubert & Arabie's ARI from the contingency table of two labelings."""
    a, b = a.reshape(-1).tolist(), b.reshape(-1).tolist()
    n = len(a)
    table: dict = {}
    for i, j in zip(a, b):
        table[(i, j)] = table.get((i, j), 0) + 1
    comb = lambda k: k * (k - 1) / 2  # noqa: E731
    rows = [sum(v for (i, _), v in table.items() if i == r) for r in set(a)]
    cols = [sum(v for (_, j), v in table.items() if j == c) for c in set(b)]
    index = sum(comb(v) for v in table.values())
    sr, sc = sum(comb(v) for v in rows), sum(comb(v) for v in cols)
    expected = sr * sc / comb(n)
    return (index - expected) / ((sr + sc) / 2 - expected)


def test_reference_g0_partitions_as_the_retyped_reference():
    torch.manual_seed(0)
    # a smooth map (two directions drifting across the image) plus noise: k-means has real structure to find
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 9), torch.linspace(0, 1, 11), indexing="ij")
    base = torch.stack([torch.cos(3 * xx), torch.sin(3 * xx), yy, 1 - yy, xx * yy])
    emb = F.normalize(torch.stack([base + 0.3 * torch.randn(5, 9, 11) for _ in range(2)]), dim=1)  # (2, 5, 9, 11)
    labels, cents, counts = grid_kmeans(emb, (3, 4), 15, init="reference", location=True)
    for b in range(2):
        ref = _reference_g0(emb[b], (3, 4), 15)
        assert _adjusted_rand_index(labels[b], ref) == pytest.approx(1.0)
        # the centroids are the means of the embedding alone (what X0 and u_s are made of)
        x = emb[b].flatten(1).t()
        for k in range(12):
            if counts[b, k] > 0:
                assert torch.allclose(cents[b, k], F.normalize(x[labels[b].flatten() == k].mean(0), dim=0), atol=1e-5)
    plain, _, _ = grid_kmeans(emb, (3, 4), 15)
    assert any(_adjusted_rand_index(plain[b], _reference_g0(emb[b], (3, 4), 15)) < 1 for b in range(2))


# --- presets and keys --------------------------------------------------------------------------------

def test_reference_presets_and_unchanged_keys_at_the_defaults():
    hsg = get_head("hsg")
    for ds in ("cocostuff27", "cityscapes27", "potsdam3"):
        cfg = hsg.config(ds)["hsg"]
        assert all(getattr(cfg, k) == v for k, v in REFERENCE.items()), ds
        assert cfg.separation_weight == 0.2 and cfg.separation_concentration == 16.0
    assert hsg.config("cityscapes27")["hsg"].knn_mode == "pooled"
    assert hsg.config("cocostuff27")["hsg"].knn_mode == "per_view"
    for ds in ("camvid11", "synthetic"):
        d = hsg.config(ds)["hsg"].to_dict()
        assert not set(d) & {*REFERENCE, "separation_weight", "separation_concentration"}, ds
    assert HsgConfig(no_positive="own-segment").to_dict()["no_positive"] == "own-segment"
    for name, bad in (("no_positive", "skip"), ("modularity", "newman"), ("graph", "mutual"),
                      ("collapse_norm", "none"), ("separation", "global"), ("g0_grid", "ceil"),
                      ("tokens", "centroids"), ("transformer", "detr")):
        with pytest.raises(Exception, match=name):
            HsgConfig(**{name: bad})


def test_training_with_every_reference_option_runs():
    from tests.core.test_hsg import FakeBank, _config, _inputs
    from usseg_core.heads.hsg_train import train_hsg_head

    res = train_hsg_head(_inputs([FakeBank()]), _config(epochs=1, knn_mode="per_view", **REFERENCE), device="cpu",
                         progress=False)
    steps = [h for h in res.history if "loss" in h]
    assert steps and all(np.isfinite(h["loss"]) and np.isfinite(h["loss_separation"]) for h in steps)


# --- H6: optimiser set-up -----------------------------------------------------------------------------

def test_reference_sgd_bias_groups_by_hand():
    from usseg_core.heads.hsg_train import hsg_optimiser

    w, b = torch.nn.Parameter(torch.ones(1)), torch.nn.Parameter(torch.ones(1))
    cfg = HsgConfig(lr=0.1, momentum=0.9, weight_decay=0.5, sgd="reference", param_groups="reference")
    opt = hsg_optimiser([("net.0.weight", w), ("net.0.bias", b)], cfg)

    def step(lr):
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_scale"]
        w.grad, b.grad = torch.ones(1), torch.ones(1)
        opt.step()

    step(0.1)  # weight: buf = 0.1 (1 + 0.5) = 0.15; bias: lr 0.2, no decay: buf = 0.2
    assert (w.item(), b.item()) == (pytest.approx(0.85), pytest.approx(0.8))
    step(0.01)  # the lr drops tenfold; the buffer keeps the old steps: weight buf = 0.9 * 0.15 + 0.01 * 1.425
    assert w.item() == pytest.approx(0.85 - (0.135 + 0.01425))
    assert b.item() == pytest.approx(0.8 - (0.9 * 0.2 + 0.02))
    # torch's SGD on the same two steps: buf = 1.5, then 0.9 * 1.5 + 1.425; p -= lr * buf
    wt = torch.nn.Parameter(torch.ones(1))
    t = hsg_optimiser([("w", wt)], HsgConfig(lr=0.1, momentum=0.9, weight_decay=0.5))
    for lr in (0.1, 0.01):
        t.param_groups[0]["lr"], wt.grad = lr, torch.ones(1)
        t.step()
    assert wt.item() == pytest.approx(1 - 0.15 - 0.01 * (0.9 * 1.5 + 1.425))


def test_warmup_then_step_decay_by_hand():
    from types import SimpleNamespace

    from usseg_core.heads.hsg_train import HsgMethod

    m = SimpleNamespace(config=HsgConfig(lr=0.1, warmup_steps=100), total_steps=1000)
    lr = [HsgMethod.lr_at(m, t) for t in (0, 50, 99, 100, 319, 320, 750)]
    assert lr == pytest.approx([0.01, 0.055, 0.1 * (0.1 * 0.01 + 0.99), 0.1, 0.1, 0.01, 0.0001])
    m.config = HsgConfig(lr=0.1)
    assert HsgMethod.lr_at(m, 0) == 0.1
