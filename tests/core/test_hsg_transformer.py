"""HSG's clustering transformer as twke18/HSG builds it (transformer="reference") and its segment tokens
(tokens="segments"): hand-computed statistics, positions and parameter counts, the decoder layer against a
re-typed attention, and a constructed case where segment tokens split a G0 cluster (docs/methods/hsg.md,
Deviations)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from usseg_core.heads.hsg import HsgConfig, HsgTrained, hierarchy_labels
from usseg_core.heads.hsg_train import hsg_loss
from usseg_core.heads.hsg_transformer import (Hierarchy, PositionTable, ReferenceClusteringTransformer,
                                              _ReferenceDecoderLayer, group_positions, reference_token_stats)

BN_EVAL = 1 / math.sqrt(1 + 1e-5)  # a fresh BatchNorm in eval mode: x / √(1 + eps)


def _cfg(**kw) -> HsgConfig:
    return HsgConfig(**{"dim": 8, "hidden": 16, "heads": 2, "enc_layers": 1, "dec_layers": 1, "ffn": 16,
                        "levels": (3, 2), "transformer": "reference", **kw})


# --- the decoder's input: fc([mean, std]) ------------------------------------------------------------

def test_masked_mean_and_std_count_padding_as_the_reference_on_three_tokens():
    y = torch.tensor([[[1.0, 2.0], [3.0, 6.0], [100.0, -7.0]],  # image 0: token 2 is padding
                      [[0.0, 0.0], [2.0, 2.0], [4.0, 4.0]]])  # image 1: three valid tokens
    valid = torch.tensor([[True, True, False], [True, True, True]])
    mean, std = reference_token_stats(y, valid)
    # image 0: mean (2, 4); deviations (−1, −2), (1, 2) and the padded token's (0 − 2, 0 − 4):
    # Σ (6, 24) over count + 1 = 3 -> var (2, 8)
    assert torch.allclose(mean[0], torch.tensor([2.0, 4.0]))
    assert torch.allclose(std[0], torch.tensor([math.sqrt(2.0), math.sqrt(8.0)]))
    # image 1: mean (2, 2); Σ (4 + 0 + 4) over 3 + 1 -> var 2 (not the population 8/3, nor the unbiased 4)
    assert torch.allclose(mean[1], torch.tensor([2.0, 2.0]))
    assert torch.allclose(std[1], torch.full((2,), math.sqrt(2.0)))
    # above G0 there is no mask: torch's unbiased std, Σ 8 / (3 − 1) -> 2
    mean, std = reference_token_stats(torch.tensor([[[1.0], [3.0], [5.0]]]), None)
    assert mean.item() == pytest.approx(3.0) and std.item() == pytest.approx(2.0)


# --- query positions enter q and k, never v ------------------------------------------------------

def _attention(att: torch.nn.MultiheadAttention, q, k, v):
    """One-head attention re-typed from its weights: softmax(Q Kᵀ / √d) V, then the output projection."""
    wq, wk, wv = att.in_proj_weight.chunk(3)
    bq, bk, bv = att.in_proj_bias.chunk(3)
    Q, K, V = q @ wq.t() + bq, k @ wk.t() + bk, v @ wv.t() + bv
    a = torch.softmax(Q @ K.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return (a @ V) @ att.out_proj.weight.t() + att.out_proj.bias


def test_decoder_layer_adds_query_positions_to_q_and_k_only():
    torch.manual_seed(0)
    layer = _ReferenceDecoderLayer(dim=4, heads=1, ffn=8, dropout=0.0).eval()
    t = torch.randn(1, 1, 4).expand(1, 3, 4)  # the decoder input is one vector repeated for every query
    qpos, mem, pos = torch.randn(1, 3, 4), torch.randn(1, 5, 4), torch.randn(1, 5, 4)
    seen = {}
    layer.self_attn.register_forward_hook(lambda m, i, o: seen.setdefault("self", o[0]))
    with torch.no_grad():
        out = layer(t, qpos, mem, None, pos)
        # v = t carries no position: with identical rows, every query's self-attention output is the same
        # whatever its weights (with v = t + qpos they would differ)
        assert torch.allclose(seen["self"][0, 0], seen["self"][0, 1], atol=1e-6)
        assert torch.allclose(seen["self"][0, 0], seen["self"][0, 2], atol=1e-6)
        # the whole layer, re-typed: DETR post-norm with positions on q and k
        t1 = (t + _attention(layer.self_attn, t + qpos, t + qpos, t)) * BN_EVAL
        t2 = (t1 + _attention(layer.cross_attn, t1 + qpos, mem + pos, mem)) * BN_EVAL
        t3 = (t2 + layer.ffn[3](torch.relu(layer.ffn[0](t2)))) * BN_EVAL
    assert torch.allclose(out, t3, atol=1e-5)
    assert not torch.allclose(out[0, 0], out[0, 1])  # the queries tell the rows apart through the keys


# --- positions ----------------------------------------------------------------------------------------

def test_position_table_and_token_positions_by_hand():
    table = PositionTable(4)
    with torch.no_grad():
        table.col.copy_(torch.arange(100.0).reshape(50, 2))  # col[c] = (2c, 2c + 1)
        table.row.copy_(-torch.arange(100.0).reshape(50, 2))  # row[r] = (−2r, −2r − 1)
    p = table(2, 3)  # pixel (r, c) -> [col[c], row[r]]
    assert p.shape == (6, 4)
    assert p[4].tolist() == [2.0, 3.0, -2.0, -3.0]  # r = 1, c = 1
    assert p[2].tolist() == [4.0, 5.0, -0.0, -1.0]  # r = 0, c = 2
    assert table(100, 1)[99].tolist()[2:] == [-98.0, -99.0]  # a map over 50 rows: row ⌊99 · 50 / 100⌋ = 49
    hier = Hierarchy(_cfg(dim=4, heads=1))
    hier.position = table
    # one 2 x 3 map, two tokens: token 0 = pixels (0, 0), (0, 1); token 1 = the rest; pixel (1, 2) has none
    token = torch.tensor([[[0, 0, 1], [1, 1, -1]]])
    pos = hier.token_positions(token, 1, 2)
    assert pos[0, 0].tolist() == [1.0, 2.0, 0.0, -1.0]  # mean of [0, 1, 0, −1] and [2, 3, 0, −1]
    assert pos[0, 1].tolist() == pytest.approx([2.0, 3.0, -4 / 3, -7 / 3])  # (0, 2), (1, 0), (1, 1)


def test_next_level_positions_are_the_mean_over_each_group():
    pos = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [5.0, 4.0], [7.0, 7.0]]])  # (1, 4 tokens, 2)
    c = torch.tensor([[[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.6, 0.3, 0.1], [0.0, 1.0, 0.0]]])
    valid = torch.tensor([[True, True, True, False]])  # token 3 (group 1 by its row) is padding
    out = group_positions(pos, c, valid)
    assert out[0].tolist() == [[3.0, 2.0], [3.0, 2.0], [0.0, 0.0]]  # groups {0, 2}, {1}, empty -> zero


# --- the architecture ---------------------------------------------------------------------------------

def test_parameter_count_of_the_reference_hierarchy_by_hand():
    d, f = 8, 16  # dim, ffn; heads 2, one encoder and one decoder layer, levels (3, 2)
    attention = 3 * d * d + 3 * d + d * d + d  # in-projection and output projection, with biases
    ffn = d * f + f + f * d + d
    bn = 2 * d
    encoder = attention + ffn + 2 * bn
    decoder = 2 * attention + ffn + 3 * bn
    tgt_fc = 2 * d * f + 2 * f + f * d + d  # Linear 2d -> f (no bias), BatchNorm(f), Linear f -> d
    heads = 2 * (d * d + bn)  # Z and X: Linear (no bias) + BatchNorm each
    per_level = encoder + decoder + bn + tgt_fc + heads  # + the final decoder BatchNorm
    positions = 2 * 50 * d // 2
    expected = 2 * per_level + (3 + 2) * d + positions  # + the queries of each level
    assert (encoder, decoder, tgt_fc, per_level, expected) == (600, 904, 424, 2104, 4648)
    hier = Hierarchy(_cfg())
    assert sum(p.numel() for p in hier.parameters()) == expected


def test_xavier_init_of_the_matrices_and_standard_normal_queries():
    torch.manual_seed(0)
    tr = ReferenceClusteringTransformer(64, 200, heads=4, enc_layers=1, dec_layers=1, ffn=128, dropout=0.1)
    for w in (tr.tgt_fc[0].weight, tr.tgt_fc[3].weight, tr.encoder[0].self_attn.out_proj.weight,
              tr.decoder[0].ffn[0].weight):
        bound = math.sqrt(6 / sum(w.shape))  # xavier-uniform: U(−b, b), b = √(6 / (fan_in + fan_out))
        assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound
    assert tr.queries.std().item() == pytest.approx(1.0, abs=0.05)  # nn.Embedding's N(0, 1)


def test_every_parameter_learns_but_the_last_level_x_head():
    """The last level's X head feeds nothing (as the reference's coarse centroid_feats); all else gets gradient."""
    cfg = _cfg(tokens="segments", train_grid=(2, 2), anchors_per_view=16)
    torch.manual_seed(0)
    hier = Hierarchy(cfg)
    emb = F.normalize(torch.randn(2 * 2, 8, 6, 6), dim=1).requires_grad_(True)
    regions = torch.randint(0, 3, (4, 6, 6))
    loss, stats = hsg_loss(emb, regions, hier, cfg, 2)
    loss.backward()
    dead = {n for n, p in hier.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0}
    assert dead == {"transformers.1.x_fc.1.weight", "transformers.1.x_fc.2.weight", "transformers.1.x_fc.2.bias"}
    assert emb.grad.abs().sum() > 0 and stats["segments"] > 8


def test_reference_hierarchy_nests_groups_and_loads_from_a_checkpoint():
    cfg = _cfg(levels=(5, 3, 2), test_grid=(3, 3))
    head = HsgTrained(4, cfg, n_classes=3)
    head.hierarchy.train()(torch.randn(2, 9, 8), torch.ones(2, 9, dtype=torch.bool),
                           torch.randn(2, 9, 8))  # one pass: non-trivial BatchNorm statistics
    ckpt = {"in_dim": 4, "n_classes": 3, "config": {"hsg": cfg.to_dict()}, "head": head.head.state_dict(),
            "hierarchy": head.hierarchy.state_dict()}
    loaded = HsgTrained.from_checkpoint(ckpt)
    emb = F.normalize(torch.randn(2, 8, 9, 12, generator=torch.Generator().manual_seed(1)), dim=1)
    levels = loaded.levels(emb)
    assert all(torch.equal(a, b) for a, b in zip(levels, hierarchy_labels(head.eval().hierarchy, emb, (3, 3), 15)))
    for fine, coarse in zip(levels[:-1], levels[1:]):
        for b in range(2):
            for g in fine[b].unique():  # every fine group lies inside exactly one coarse group
                assert coarse[b][fine[b] == g].unique().numel() == 1
    with pytest.raises(ValueError, match="pos0"):
        loaded.hierarchy(torch.randn(1, 4, 8))


# --- segment tokens -----------------------------------------------------------------------------------

class _NearestAnchor(torch.nn.Module):
    """A stand-in hierarchy: each token joins the nearer of two fixed directions (one level)."""

    def __init__(self, anchors: torch.Tensor) -> None:
        super().__init__()
        self.anchors = anchors  # (2, m)

    def token_positions(self, *_):
        return None

    def forward(self, x0, valid, pos0):
        m = F.one_hot((x0 @ self.anchors.t()).argmax(-1), 2).float() * valid[..., None]
        return [m], [self.anchors[None].expand(x0.shape[0], 2, -1)]


def test_segment_tokens_let_two_segments_of_one_g0_cluster_join_different_groups():
    # one image, two views, one G0 cluster per view (grid 1 x 1) covering two UCM regions: left pixels
    # point along e0, right pixels along e1.
    e = torch.eye(4)
    emb = torch.zeros(2, 4, 4, 4)
    emb[:, :, :, :2], emb[:, :, :, 2:] = e[0][:, None, None], e[1][:, None, None]
    emb = F.normalize(emb + 0.05 * e[2][:, None, None], dim=1)  # a shared component: one k-means cluster
    regions = torch.zeros(2, 4, 4, dtype=torch.long)
    regions[:, :, 2:] = 1
    hier = _NearestAnchor(F.normalize(torch.stack([e[0], e[1]]), dim=1))
    out = {}
    for tokens in ("segments", "g0-centroids"):
        cfg = HsgConfig(dim=4, heads=1, levels=(2,), train_grid=(1, 1), anchors_per_view=16, tokens=tokens,
                        concentration=1.0)
        with torch.no_grad():
            _, out[tokens] = hsg_loss(emb, regions, hier, cfg, 2)
    # segments: the tokens are the 4 segments; the two of each G0 cluster join the groups of their own
    # directions, i.e. the UCM regions, so G1 = Ge and its loss equals the edge loss
    assert out["segments"]["segments"] == 4
    assert out["segments"]["groups_used1"] == 2.0
    assert out["segments"]["loss_group1"] == pytest.approx(out["segments"]["loss_edge"], rel=1e-6)
    # G0 centroids: a view's one centroid carries both of its segments into one group, so every other
    # segment of the image is a positive and the loss is −log 1 = 0, below the edge loss
    assert out["g0-centroids"]["groups_used1"] == 1.0
    assert out["g0-centroids"]["loss_group1"] == pytest.approx(0.0, abs=1e-6)
    assert out["g0-centroids"]["loss_edge"] > 0.3


def test_reference_transformer_refusals():
    from tests.core.test_hsg import FakeBank, _config, _inputs
    from usseg_core.errors import ConfigError
    from usseg_core.heads.hsg_train import train_hsg_head

    with pytest.raises(ConfigError, match="even"):
        HsgConfig(dim=9, heads=3, transformer="reference")
    with pytest.raises(ConfigError, match="2 images per step"):  # tgt_fc's BatchNorm over the batch's images
        train_hsg_head(_inputs([FakeBank()]), _config(batch_size=1, transformer="reference"), device="cpu",
                       progress=False)
