"""HSG's clustering transformers: one per level step, grouping the tokens of an image (docs/methods/hsg.md §1.2).

A transformer maps the tokens X_l of level l (B, T, m) to the next level's X_{l+1} (B, n_{l+1}, m), its
centroids Z_{l+1} and the transition matrix C_l^{l+1} = softmax(Y_l Z_{l+1}ᵀ / √m) (B, T, n_{l+1});
:class:`Hierarchy` chains them and propagates the assignments, M_{l+1} = M_l C_l^{l+1}.

Two architectures (``HsgConfig.transformer``):

* ``"ours"`` (:class:`ClusteringTransformer`, usseg's first version): learned queries added once to an MLP
  of the mean and standard deviation of Y_l; BatchNorm over the valid tokens; Z = Linear(X_{l+1}); the
  decoder output is the next level's tokens.
* ``"reference"`` (:class:`ReferenceClusteringTransformer`, [code:HSG] twke18/HSG at aa54ddb,
  ``hsg/models/heads/transformer.py:15-139`` and ``hsg/models/embeddings/transformer_clusters.py:50-112``;
  docs/methods/hsg.md, Deviations): the decoder's input is one vector per image, fc([mean, std] of Y_l)
  (Linear 2m → ffn without bias, BatchNorm, ReLU, Linear ffn → m; :func:`reference_token_stats`),
  repeated for every query; the learned queries are *query positions*, added to q and k (never v) of
  both attentions of every decoder layer (DETR); token positions (:class:`PositionTable`, learned row
  and column embeddings averaged over each token's pixels) likewise enter q and k of the encoder and the
  keys of the cross-attention; BatchNorm over every token, padded ones included (the reference's
  ``_BatchNorm1d``); a final BatchNorm after the decoder; Z_{l+1} and X_{l+1} are two separate heads,
  ReLU → Linear (no bias) → BatchNorm, of the decoder output; xavier-uniform init of every matrix of the
  encoder, decoder and decoder-input MLP. The next level's token positions are the mean position of the
  tokens of each group (arg-max of C; zero for an empty group), as ``_collect_nd_coarser_prototype``.
  Not reproduced: the reference re-orders its queries by their largest logit (``topk`` over all n
  queries, a permutation, transformer_clusters.py:96-112), which changes no grouping.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from usseg_core.segsort import segment_means


class TokenBatchNorm(nn.Module):
    """BatchNorm1d over the valid tokens of a (B, T, m) batch (HSG replaces LayerNorm by BatchNorm)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(dim)

    def forward(self, x: Tensor, valid: Tensor | None) -> Tensor:
        if valid is None:
            return self.bn(x.reshape(-1, x.shape[-1])).reshape(x.shape)
        out = torch.zeros_like(x)
        out[valid] = self.bn(x[valid])
        return out


class _Block(nn.Module):
    """Post-norm attention block (DETR): x = BN(x + attn(x, mem)); x = BN(x + FFN(x))."""

    def __init__(self, dim: int, heads: int, ffn: int, dropout: float, cross: bool) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True) if cross else None
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn, dim))
        self.norms = nn.ModuleList(TokenBatchNorm(dim) for _ in range(3 if cross else 2))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, valid: Tensor | None, mem: Tensor | None = None,
                mem_valid: Tensor | None = None) -> Tensor:
        pad = None if valid is None else ~valid
        x = self.norms[0](x + self.drop(self.self_attn(x, x, x, key_padding_mask=pad, need_weights=False)[0]), valid)
        if self.cross_attn is not None:
            mpad = None if mem_valid is None else ~mem_valid
            att = self.cross_attn(x, mem, mem, key_padding_mask=mpad, need_weights=False)[0]
            x = self.norms[1](x + self.drop(att), valid)
        return self.norms[-1](x + self.drop(self.ffn(x)), valid)


class ClusteringTransformer(nn.Module):
    """One level transition l → l+1 ([001] §5.7, Fig. 13).

    Encoder over X_l → Y_l; queries Q_{l+1} + MLP(mean, std of Y_l); decoder (self-attention on the
    queries, cross-attention to Y_l) → X_{l+1}; Z_{l+1} = fc(X_{l+1}); C = softmax(Y_l Z_{l+1}ᵀ / √m).
    """

    def __init__(self, dim: int, n_out: int, heads: int, enc_layers: int, dec_layers: int, ffn: int,
                 dropout: float) -> None:
        super().__init__()
        self.encoder = nn.ModuleList(_Block(dim, heads, ffn, dropout, cross=False) for _ in range(enc_layers))
        self.decoder = nn.ModuleList(_Block(dim, heads, ffn, dropout, cross=True) for _ in range(dec_layers))
        self.queries = nn.Parameter(torch.randn(n_out, dim) * dim ** -0.5)  # Q_{l+1}, learned by SGD
        self.stats = nn.Sequential(nn.Linear(2 * dim, dim), nn.ReLU(), nn.Linear(dim, dim))
        self.z_fc = nn.Linear(dim, dim)
        self.scale = dim ** -0.5

    def forward(self, x: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, T, m), valid (B, T) bool or None -> X_{l+1} (B, n, m), Z_{l+1} (B, n, m), C (B, T, n)."""
        y = x
        for blk in self.encoder:
            y = blk(y, valid)
        w = torch.ones(y.shape[:2], dtype=y.dtype, device=y.device) if valid is None else valid.to(y.dtype)
        cnt = w.sum(1, keepdim=True).clamp_min(1.0)  # (B, 1)
        mean = (y * w[..., None]).sum(1) / cnt  # (B, m)
        var = (((y - mean[:, None]) ** 2) * w[..., None]).sum(1) / cnt
        q = self.queries[None] + self.stats(torch.cat([mean, var.clamp_min(1e-12).sqrt()], dim=1))[:, None]
        xo = q
        for blk in self.decoder:
            xo = blk(xo, None, y, valid)
        z = self.z_fc(xo)  # (B, n, m)
        c = torch.softmax(torch.einsum("btm,bnm->btn", y, z) * self.scale, dim=-1)  # (B, T, n)
        if valid is not None:
            c = c * valid[..., None].to(c.dtype)
        return xo, z, c


def reference_token_stats(y: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor]:
    """[code:HSG]'s mean and standard deviation of the encoder output over the tokens (transformer.py:118-129).

    Args:
        y: (B, T, m) encoder output. valid: (B, T) bool, False on padding, or None (levels above G0).
    Returns:
        mean (B, m) over the valid tokens and std (B, m). With ``valid``, std = √(Σ_t (w_t y_t − mean)² /
        (count + 1)), w_t = 0 on padding: a padded token counts as a deviation of −mean and the divisor is
        the valid count plus one (both as the reference). Without: torch's unbiased std (divisor T − 1).
    """
    if valid is None:
        return y.mean(1), y.std(1)
    w = valid.to(y.dtype)[..., None]  # (B, T, 1)
    cnt = w.sum(1).clamp_min(1.0)  # (B, 1)
    mean = (y * w).sum(1) / cnt  # (B, m)
    var = ((y * w - mean[:, None]) ** 2).sum(1)  # (B, m), padded tokens included as (0 − mean)²
    return mean, (var / (cnt + 1)).sqrt()


class PositionTable(nn.Module):
    """[code:HSG]'s learned position embedding (``PositionEmbeddingLearned``, position_encoding.py:47-71).

    A pixel at row r, column c of an h x w map has position [col(c), row(r)] (m/2 + m/2), two tables of
    ``ROWS`` learned rows, uniform [0, 1) at init. The reference indexes them by the absolute row and column
    (its maps never exceed 50); a map larger than 50 here takes the row ⌊r · 50 / h⌋ (ours).
    """

    ROWS = 50  # nn.Embedding(50, m/2) per axis ([code:HSG])

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.col = nn.Parameter(torch.rand(self.ROWS, dim // 2))
        self.row = nn.Parameter(torch.rand(self.ROWS, dim // 2))

    def forward(self, h: int, w: int) -> Tensor:
        """(h*w, m) positions of the pixels of an h x w map, row-major."""
        rows = torch.arange(h, device=self.row.device)
        cols = torch.arange(w, device=self.col.device)
        rows = rows if h <= self.ROWS else rows * self.ROWS // h
        cols = cols if w <= self.ROWS else cols * self.ROWS // w
        return torch.cat([self.col[cols][None].expand(h, w, -1), self.row[rows][:, None].expand(h, w, -1)],
                         dim=-1).reshape(h * w, -1)


def _with(x: Tensor, pos: Tensor | None) -> Tensor:
    return x if pos is None else x + pos


class _ReferenceEncoderLayer(nn.Module):
    """Post-norm DETR encoder layer: q = k = x + pos, v = x; BatchNorm over every token."""

    def __init__(self, dim: int, heads: int, ffn: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn, dim))
        self.norms = nn.ModuleList(TokenBatchNorm(dim) for _ in range(2))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, pad: Tensor | None, pos: Tensor | None) -> Tensor:
        qk = _with(x, pos)
        x = self.norms[0](x + self.drop(self.self_attn(qk, qk, x, key_padding_mask=pad, need_weights=False)[0]),
                          None)
        return self.norms[1](x + self.drop(self.ffn(x)), None)


class _ReferenceDecoderLayer(nn.Module):
    """Post-norm DETR decoder layer: the query positions enter q and k, never v.

    Self-attention q = k = t + qpos, v = t; cross-attention q = t + qpos, k = mem + pos, v = mem.
    """

    def __init__(self, dim: int, heads: int, ffn: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn, dim))
        self.norms = nn.ModuleList(TokenBatchNorm(dim) for _ in range(3))
        self.drop = nn.Dropout(dropout)

    def forward(self, t: Tensor, qpos: Tensor, mem: Tensor, pad: Tensor | None, pos: Tensor | None) -> Tensor:
        qk = t + qpos
        t = self.norms[0](t + self.drop(self.self_attn(qk, qk, t, need_weights=False)[0]), None)
        att = self.cross_attn(t + qpos, _with(mem, pos), mem, key_padding_mask=pad, need_weights=False)[0]
        t = self.norms[1](t + self.drop(att), None)
        return self.norms[2](t + self.drop(self.ffn(t)), None)


def _projection(dim: int) -> nn.Sequential:
    # ReLU → Linear (no bias) → BatchNorm: centroid_fc and centroid_feat_fc ([code:HSG]
    # transformer_clusters.py:50-57), applied to the (B*n, m) rows
    return nn.Sequential(nn.ReLU(), nn.Linear(dim, dim, bias=False), nn.BatchNorm1d(dim))


class ReferenceClusteringTransformer(nn.Module):
    """One level transition l → l+1 as [code:HSG] builds it (module docstring, ``transformer="reference"``)."""

    def __init__(self, dim: int, n_out: int, heads: int, enc_layers: int, dec_layers: int, ffn: int,
                 dropout: float) -> None:
        super().__init__()
        self.encoder = nn.ModuleList(_ReferenceEncoderLayer(dim, heads, ffn, dropout) for _ in range(enc_layers))
        self.decoder = nn.ModuleList(_ReferenceDecoderLayer(dim, heads, ffn, dropout) for _ in range(dec_layers))
        self.decoder_norm = TokenBatchNorm(dim)
        # decoder input fc([mean, std]): [code:HSG] tgt_fc, transformer.py:69-72 (its dim_feedforward = 2m)
        self.tgt_fc = nn.Sequential(nn.Linear(2 * dim, ffn, bias=False), nn.BatchNorm1d(ffn), nn.ReLU(),
                                    nn.Linear(ffn, dim))
        for p in self.parameters():  # Transformer._reset_parameters: every matrix so far, xavier-uniform
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        self.queries = nn.Parameter(torch.randn(n_out, dim))  # SimpleQueryEmbedding: nn.Embedding, N(0, 1)
        self.z_fc = _projection(dim)  # Z_{l+1}: centroid_fc
        self.x_fc = _projection(dim)  # X_{l+1}, the next level's tokens: centroid_feat_fc
        self.scale = dim ** -0.5

    def forward(self, x: Tensor, valid: Tensor | None = None,
                pos: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, T, m), valid (B, T) bool or None, pos (B, T, m) or None -> X_{l+1} (B, n, m), Z_{l+1} (B, n, m),
        C (B, T, n) (zero rows on padding)."""
        pad = None if valid is None else ~valid
        y = x
        for layer in self.encoder:
            y = layer(y, pad, pos)
        mean, std = reference_token_stats(y, valid)  # (B, m) each
        B, n, m = y.shape[0], self.queries.shape[0], y.shape[-1]
        t = self.tgt_fc(torch.cat([mean, std], dim=1))[:, None].expand(B, n, m)  # the same input for every query
        qpos = self.queries[None].expand(B, n, m)
        for layer in self.decoder:
            t = layer(t, qpos, y, pad, pos)
        t = self.decoder_norm(t, None).reshape(B * n, m)
        z, xo = self.z_fc(t).reshape(B, n, m), self.x_fc(t).reshape(B, n, m)
        c = torch.softmax(torch.einsum("btm,bnm->btn", y, z) * self.scale, dim=-1)  # (B, T, n)
        if valid is not None:
            c = c * valid[..., None].to(c.dtype)
        return xo, z, c


def group_positions(pos: Tensor, c: Tensor, valid: Tensor | None) -> Tensor:
    """The next level's token positions (B, n, m): the mean position of the tokens whose arg-max group is g.

    pos (B, T, m); c (B, T, n); valid (B, T) or None. An empty group's position is zero ([code:HSG]
    ``_collect_nd_coarser_prototype``, resnet_fcn_hsg_cs.py:686-751, padded tokens in a dummy group).
    """
    win = c.argmax(-1)  # (B, T)
    onehot = F.one_hot(win, c.shape[-1]).to(pos.dtype)  # (B, T, n)
    if valid is not None:
        onehot = onehot * valid[..., None].to(pos.dtype)
    sums = onehot.transpose(1, 2) @ pos  # (B, n, m)
    return sums / onehot.sum(1)[..., None].clamp_min(1.0)


class Hierarchy(nn.Module):
    """The chain of clustering transformers: X0 → (X1, Z1, C01) → (X2, Z2, C12) → ...

    ``cfg.transformer="reference"`` adds the :class:`PositionTable` (shared by the levels, as the reference's
    one ``pos_embed``): the caller averages :meth:`positions` over each X0 token's pixels.
    """

    def __init__(self, cfg) -> None:  # cfg: usseg_core.heads.hsg.HsgConfig (not imported: hsg imports us)
        super().__init__()
        self.levels = tuple(int(n) for n in cfg.levels)
        self.reference = cfg.transformer == "reference"
        kind = ReferenceClusteringTransformer if self.reference else ClusteringTransformer
        self.transformers = nn.ModuleList(
            kind(cfg.dim, n, cfg.heads, cfg.enc_layers, cfg.dec_layers, cfg.ffn, cfg.dropout) for n in self.levels)
        self.position = PositionTable(cfg.dim) if self.reference else None

    def positions(self, h: int, w: int) -> Tensor | None:
        """(h*w, m) pixel positions of an h x w map (reference architecture), or None."""
        return None if self.position is None else self.position(h, w)

    def token_positions(self, token: Tensor, n_images: int, n_tokens: int) -> Tensor | None:
        """(B, T, m) mean pixel position of every X0 token (reference architecture), or None (ours).

        ``token`` (M, h, w) long: the flat index b * T + t of each pixel's token in M maps of h x w (−1: none);
        a pixel's position is the one of its place in its own map (every view has its own grid).
        """
        if self.position is None:
            return None
        M, h, w = token.shape
        pix = self.positions(h, w).repeat(M, 1)  # (M*h*w, m)
        pos, _ = segment_means(pix, token.reshape(-1), n_images * n_tokens, normalize=False)
        return pos.reshape(n_images, n_tokens, -1)

    def forward(self, x0: Tensor, valid: Tensor | None = None,
                pos0: Tensor | None = None) -> tuple[list[Tensor], list[Tensor]]:
        """x0 (B, n0, m), valid (B, n0), pos0 (B, n0, m) X0's positions (reference architecture only) ->
        M_l (B, n0, n_l) = C01 C12 ⋯ (propagated soft assignments) and Z_l (B, n_l, m), per level."""
        if self.reference and pos0 is None:
            raise ValueError("the reference transformer needs the positions of the X0 tokens (pos0)")
        ms, zs = [], []
        x, v, pos, prop = x0, valid, pos0, None
        for tr in self.transformers:
            if self.reference:
                x, z, c = tr(x, v, pos)
                pos = group_positions(pos, c, v)
            else:
                x, z, c = tr(x, v)
            prop = c if prop is None else prop @ c  # P_{l+1} = P_l C_l^{l+1}, P_0 one-hot per X0 token
            ms.append(prop)
            zs.append(z)
            v = None  # X_{l>=1} tokens are all valid
        return ms, zs
