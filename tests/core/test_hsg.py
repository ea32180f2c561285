"""HSG: losses against direct formulas, the hierarchy's consistency, segment warping, resume."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from usseg_core.errors import ConfigError, InputError
from usseg_core.heads import HeadInputs, get_head
from usseg_core.heads.hsg import (REFERENCE, ClusteringTransformer, HsgConfig, HsgTrained, contrast_denominator,
                                  hierarchy_labels, knn_graph, modularity_terms, pixel_segment_loss,
                                  separation_term)
from usseg_core.heads.hsg_train import hsg_loss, train_hsg_head, view_regions
from usseg_core.segsort import grid_kmeans
from usseg_core.viewbank import Geometry, warp_maps


def test_pixel_segment_loss_matches_eq3_by_hand():
    # 2 anchors, 4 segments. Anchor 0: own segment 0, positives {1}, negatives {2, 3}.
    logits = torch.tensor([[5.0, 1.0, 2.0, 0.5], [0.0, 3.0, 1.0, 2.0]])
    own = torch.tensor([0, 1])
    denom = contrast_denominator(logits, own)
    e = math.exp
    assert denom.tolist() == pytest.approx([math.log(e(1.0) + e(2.0) + e(0.5)), math.log(e(0.0) + e(1.0) + e(2.0))])
    positive = torch.tensor([[False, True, False, False], [False, False, True, True]])
    loss, n = pixel_segment_loss(denom, logits, positive)
    l0 = -math.log(e(1.0) / (e(1.0) + e(2.0) + e(0.5)))
    l1 = -math.log((e(1.0) + e(2.0)) / (e(0.0) + e(1.0) + e(2.0)))
    assert n == 2 and loss.item() == pytest.approx((l0 + l1) / 2, rel=1e-6)
    # an anchor without positives is skipped; the candidate layout may be any gather of the columns
    block, pos = logits[:, [2, 3]], torch.tensor([[False, False], [True, False]])
    loss, n = pixel_segment_loss(denom, block, pos)
    assert n == 1 and loss.item() == pytest.approx(-math.log(e(1.0) / (e(0.0) + e(1.0) + e(2.0))), rel=1e-6)


def test_hsg_loss_positive_sets_against_a_brute_force_loop():
    """Eq. 3 of hsg_loss's edge term, recomputed pixel by pixel from the definition of G_i^+ / G_i^-."""
    from usseg_core.heads.hsg import Hierarchy

    cfg = _config(anchors_per_view=1000)["hsg"]  # every pixel is an anchor
    torch.manual_seed(0)
    B, V, h, w = 2, 2, 4, 4
    emb = F.normalize(torch.randn(B * V, 8, h, w), dim=1)
    regions = torch.randint(0, 3, (B * V, h, w))
    g0, _, _ = grid_kmeans(emb, cfg.train_grid, cfg.kmeans_iters)
    with torch.no_grad():
        loss_all, stats = hsg_loss(emb, regions, Hierarchy(cfg).eval(), cfg, V)
    # brute force: segment = (view, G0 cluster, region); groups of Ge = (image, region)
    pix = [(vv, y, x) for vv in range(B * V) for y in range(h) for x in range(w)]
    segs = sorted({(vv, int(g0[vv, y, x]), int(regions[vv, y, x])) for vv, y, x in pix})
    members = {s: [p for p in pix if (p[0], int(g0[p]), int(regions[p])) == s] for s in segs}
    u = {s: F.normalize(torch.stack([emb[p[0], :, p[1], p[2]] for p in m]).mean(0), dim=0) for s, m in members.items()}
    losses = []
    for p in pix:
        v_i, own = emb[p[0], :, p[1], p[2]], (p[0], int(g0[p]), int(regions[p]))
        pos = [s for s in segs if s != own and s[0] // V == p[0] // V and s[2] == own[2]]
        if not pos:
            continue
        others = [s for s in segs if s != own]
        num = sum(math.exp(16 * float(v_i @ u[s])) for s in pos)
        den = sum(math.exp(16 * float(v_i @ u[s])) for s in others)
        losses.append(-math.log(num / den))
    assert stats["segments"] == len(segs) and stats["anchors_edge"] == len(losses)
    assert stats["loss_edge"] == pytest.approx(float(np.mean(losses)), rel=1e-4)


def _six_node_graph() -> torch.Tensor:
    edges = [(0, 1), (1, 2), (0, 2), (3, 4), (4, 5), (3, 5), (2, 3)]  # two triangles joined by one edge
    a = torch.zeros(6, 6)
    for i, j in edges:
        a[i, j] = a[j, i] = 1
    return a


def test_modularity_and_collapse_against_the_direct_formula():
    a = _six_node_graph()
    m = torch.softmax(torch.tensor(np.random.default_rng(0).normal(size=(6, 2)), dtype=torch.float32), dim=1)
    mod, col = modularity_terms(a, m)
    two_e = float(a.sum())  # 14 = 2 x 7 edges
    d = a.sum(1)
    q = sum((float(a[i, j]) - float(d[i] * d[j]) / two_e) * float(m[i] @ m[j]) for i in range(6) for j in range(6))
    assert mod.item() == pytest.approx(-q / two_e, rel=1e-5)
    sizes = m.sum(0)
    assert col.item() == pytest.approx(math.sqrt(2) / 6 * math.sqrt(float(sizes @ sizes)) - 1, abs=1e-6)
    # hard assignment to the two triangles: Newman's modularity of that partition
    hard = torch.tensor([[1.0, 0]] * 3 + [[0, 1.0]] * 3)
    mod, col = modularity_terms(a, hard)
    assert mod.item() == pytest.approx(-(6 / 7 - 2 * (7 / 14) ** 2), rel=1e-6)
    assert col.item() == pytest.approx(0.0, abs=1e-6)  # equal sizes: no collapse penalty


def test_separation_term_is_the_mean_infonce_of_unit_rows():
    z = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    u = F.normalize(z, dim=1)
    sim = u @ u.t()
    expect = np.mean([-math.log(math.exp(sim[k, k]) / sum(math.exp(sim[k, j]) for j in range(3))) for k in range(3)])
    assert separation_term(z).item() == pytest.approx(expect, rel=1e-6)


def test_knn_graph_rules():
    x = F.normalize(torch.randn(8, 5, generator=torch.Generator().manual_seed(0)), dim=1)
    view = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    a = knn_graph(x, view, 2, "pooled")
    assert torch.equal(a, a.t()) and a.diagonal().sum() == 0 and (a.sum(1) >= 2).all()
    b = knn_graph(x, view, 1, "within_across")
    same = view[:, None] == view[None]
    assert ((b * same).sum(1) >= 1).all() and ((b * ~same).sum(1) >= 1).all()  # one edge inside, one across


def test_transformer_shapes_and_invariance_to_token_order():
    torch.manual_seed(0)
    tr = ClusteringTransformer(16, 3, heads=4, enc_layers=2, dec_layers=2, ffn=32, dropout=0.1)
    x = torch.randn(2, 7, 16)
    valid = torch.ones(2, 7, dtype=torch.bool)
    valid[1, 5:] = False
    tr.train()
    tr(x, valid)  # one training pass: BatchNorm running statistics become non-trivial
    tr.eval()
    xo, z, c = tr(x, valid)
    assert xo.shape == (2, 3, 16) and z.shape == (2, 3, 16) and c.shape == (2, 7, 3)
    assert torch.allclose(c[valid].sum(-1), torch.ones(int(valid.sum())), atol=1e-5)
    assert (c[1, 5:] == 0).all()  # padded tokens take no part
    perm = torch.tensor([3, 0, 6, 1, 4, 2, 5])
    xo2, z2, c2 = tr(x[:, perm], valid[:, perm])
    assert torch.allclose(xo, xo2, atol=1e-5) and torch.allclose(z, z2, atol=1e-5)
    assert torch.allclose(c[:, perm], c2, atol=1e-5)


def test_coarse_groups_are_unions_of_fine_groups():
    cfg = HsgConfig(dim=8, heads=2, ffn=16, levels=(5, 3, 2), test_grid=(3, 3))
    head = HsgTrained(4, cfg, n_classes=3).eval()
    emb = F.normalize(torch.randn(2, 8, 9, 12, generator=torch.Generator().manual_seed(1)), dim=1)
    levels = hierarchy_labels(head.hierarchy, emb, (3, 3), 15)
    assert [lv.shape for lv in levels] == [(2, 9, 12)] * 4
    for fine, coarse in zip(levels[:-1], levels[1:]):
        for b in range(2):
            for g in fine[b].unique():  # every fine group lies inside exactly one coarse group
                assert coarse[b][fine[b] == g].unique().numel() == 1
    assert int(levels[1].max()) < 5 and int(levels[3].max()) < 2


class _Meta:
    pass


def test_view_regions_replay_each_view_on_the_same_pixels():
    H, W = 12, 16
    seg = (np.arange(H)[:, None] * W + np.arange(W)[None]).astype(np.int32)  # id = pixel index
    geoms = [Geometry((0.25, 0.5, 0.5, 0.5), False), Geometry((0.0, 0.0, 1.0, 1.0), True)]

    class Bank:
        n_images, n_views, meta = 1, 2, {"view": {"policy": "full", "resolution": 16, "size": [12, 16],
                                                   "crop_ratio": 0.5, "flip": False}}

        def geometry(self, i, v):
            return geoms[v]

    regions = view_regions([Bank()], [[seg]], (3, 4))  # (1, 2, 3, 4)
    for v, g in enumerate(geoms):
        t, l, h, w = g.box
        for y in range(3):
            for x in range(4):
                fx = (x + 0.5) / 4
                fx = 1 - fx if g.flip else fx
                py, px = int((t + (y + 0.5) / 3 * h) * H), int((l + fx * w) * W)
                assert regions[0, v, y, x] == py * W + px


class FakeBank:
    """An in-memory view bank (two-region scenes) with segments that follow the regions."""

    def __init__(self, n: int = 6, v: int = 2, c: int = 6, h: int = 8, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        protos = rng.normal(size=(2, c)).astype(np.float32)
        self.geoms = [[Geometry((rng.uniform(0, 0.2), rng.uniform(0, 0.2), 0.8, 0.8), bool(rng.random() < 0.5))
                       for _ in range(v)] for _ in range(n)]
        self.warped_arr = np.empty((n, v, c, h, h), np.float16)
        self.segs = []
        for i in range(n):
            lab = np.zeros((h, h), int)
            lab[:, rng.integers(2, h - 2):] = 1
            seg = lab * 4 + (np.arange(h)[:, None] >= h // 2) * 2 + (np.arange(h)[None] >= h // 2)  # 8 regions
            self.segs.append(np.kron(seg, np.ones((4, 4), int)).astype(np.int32))  # at 4x the feature size
            base = protos[lab].transpose(2, 0, 1)
            for j in range(v):
                plain = base + 0.3 * rng.normal(size=base.shape)
                self.warped_arr[i, j] = warp_maps(torch.from_numpy(plain[None].astype(np.float32)),
                                                  [self.geoms[i][j]])[0].numpy()
        self.n_images, self.n_views, self.shape = n, v, (c, h, h)
        self.meta = {"view": {"policy": "full", "resolution": 4 * h, "size": [4 * h, 4 * h], "crop_ratio": 0.5,
                              "flip": False}}

    def warped_batch(self, idx, vs):
        return torch.from_numpy(self.warped_arr[np.asarray(idx), np.asarray(vs)].astype(np.float32))

    def geometry(self, i, v):
        return self.geoms[i][v]


def _config(**kw):
    base = dict(dim=8, hidden=16, heads=2, ffn=16, levels=[4, 2], train_grid=[2, 2], test_grid=[2, 2], epochs=3,
                batch_size=2, anchors_per_view=16, checkpoint_every=2, log_every=1, lr=0.05)
    return get_head("hsg").config("synthetic", {**base, **kw})


def _inputs(banks):
    return HeadInputs(n_classes=2, views=banks, segments=[b.segs for b in banks])


def test_training_runs_and_loads_as_a_trained_head():
    banks = [FakeBank()]
    res = train_hsg_head(_inputs(banks), _config(), device="cpu", progress=False)
    assert res.steps_done == 3 * 3  # 6 images / batch 2
    steps = [h for h in res.history if "loss" in h]
    assert all(np.isfinite(h["loss"]) for h in steps) and {"loss_edge", "loss_group1", "loss_grouping"} <= steps[0].keys()
    assert [h["lr"] for h in steps][-1] == pytest.approx(0.05 * 0.1 ** 3)  # decayed at 32 / 56 / 75 %
    head = get_head("hsg").load({"in_dim": 6, "code_dim": 8, "n_classes": 2, **res.payload,
                                 "config": {"hsg": _config()["hsg"].to_dict()}})
    codes = head.codes(torch.from_numpy(banks[0].warped_arr[:, 0].astype(np.float32)))
    assert torch.allclose(codes.norm(dim=1), torch.ones(1), atol=1e-5)
    levels = head.levels(codes)
    assert len(levels) == 3 and levels[0].shape == (6, 8, 8) and int(levels[2].max()) < 2
    assert head.clusterer is None


def test_loss_has_gradients_for_head_and_transformers():
    cfg = _config()["hsg"]
    bank = FakeBank()
    from usseg_core.heads.hsg import Hierarchy, HsgHead

    torch.manual_seed(0)
    head, hier = HsgHead(6, 16, 8), Hierarchy(cfg)
    regions = view_regions([bank], [bank.segs], (8, 8))
    emb = head(torch.from_numpy(bank.warped_arr[:2].reshape(4, 6, 8, 8).astype(np.float32)))
    loss, stats = hsg_loss(emb, regions[:2].reshape(4, 8, 8).long(), hier, cfg, 2)
    loss.backward()
    assert stats["segments"] >= 8 and stats["anchors_edge"] > 0
    assert head.net[0].weight.grad.abs().sum() > 0
    assert hier.transformers[0].queries.grad.abs().sum() > 0  # through L_g (M_l depends on Z_l)
    assert hier.transformers[1].z_fc.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("options", [{}, {"knn_mode": "per_view", **REFERENCE, "warmup_steps": 3},
                                     {"tokens": "segments", "transformer": "reference"}],
                         ids=["defaults", "reference", "reference-transformer"])
def test_mid_epoch_interrupt_resumes_bit_identical(tmp_path: Path, options: dict):
    banks = [FakeBank(), FakeBank(n=4, seed=1)]  # 10 images, 5 steps per epoch
    cfg = _config(epochs=2, **options)
    full = train_hsg_head(_inputs(banks), cfg, device="cpu", progress=False)

    class Interrupt(Exception):
        pass

    def stop(step, _):
        if step == 7:
            raise Interrupt

    ckpt = tmp_path / "checkpoint.pt"
    with pytest.raises(Interrupt):
        train_hsg_head(_inputs(banks), cfg, checkpoint_path=ckpt, device="cpu", progress=False, on_step=stop)
    assert torch.load(ckpt, weights_only=True)["step"] == 6
    torch.manual_seed(999)
    resumed = train_hsg_head(_inputs(banks), cfg, checkpoint_path=ckpt, device="cpu", progress=False)
    for part in ("head", "hierarchy"):
        a, b = full.payload[part], resumed.payload[part]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    assert full.history == resumed.history
    with pytest.raises(InputError, match="lambda_g"):
        train_hsg_head(_inputs(banks), _config(epochs=2, lambda_g=1.0, **options), checkpoint_path=ckpt,
                       device="cpu", progress=False)


def test_config_validation_presets_and_inputs():
    assert get_head("hsg").config("camvid11")["hsg"].test_grid == (6, 8)
    coco = get_head("hsg").config("cocostuff27")["hsg"]
    assert (coco.lr, coco.weight_decay, coco.knn_k, coco.knn_mode) == (0.003, 5e-4, 2, "per_view")
    with pytest.raises(ConfigError, match="knn_mode"):
        get_head("hsg").config("camvid11", {"knn_mode": "all"})
    with pytest.raises(ConfigError, match="oversegmentation"):
        train_hsg_head(HeadInputs(n_classes=2, views=[FakeBank()]), _config(), device="cpu", progress=False)
    with pytest.raises(ConfigError, match="2 views"):
        bank = FakeBank(v=1)
        train_hsg_head(_inputs([bank]), _config(), device="cpu", progress=False)


def test_grid_kmeans_starts_from_the_grid_and_converges_to_lloyd():
    emb = F.normalize(torch.randn(1, 4, 6, 6, generator=torch.Generator().manual_seed(3)), dim=1)
    labels0, cents0, _ = grid_kmeans(emb, (2, 2), iters=0)
    assert torch.equal(labels0[0, :3, :3], torch.zeros(3, 3, dtype=torch.long))  # grid cell 0
    x = emb[0].flatten(1).t()
    c = torch.stack([F.normalize(x[(labels0[0].flatten() == k)].mean(0), dim=0) for k in range(4)])
    assert torch.allclose(cents0[0], c, atol=1e-6)
    labels, cents, counts = grid_kmeans(emb, (2, 2), iters=30)
    for _ in range(30):  # brute-force Lloyd from the same start
        lab = (x @ c.t()).argmax(1)
        c = torch.stack([F.normalize(x[lab == k].mean(0), dim=0) if (lab == k).any() else c[k] for k in range(4)])
    assert torch.equal(labels[0].flatten(), lab) and int(counts.sum()) == 36
