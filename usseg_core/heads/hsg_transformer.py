"""HSG's clustering transformers: one per level step, grouping the tokens of an image (docs/methods/hsg.md §1.2).

A transformer maps the tokens X_l of level l (B, T, m) to the next level's X_{l+1} (B, n_{l+1}, m), its
centroids Z_{l+1} and the transition matrix C_l^{l+1} = softmax(Y_l Z_{l+1}ᵀ / √m) (B, T, n_{l+1});
:class:`Hierarchy` chains them and propagates the assignments, M_{l+1} = M_l C_l^{l+1}.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from usseg_core.heads.hsg import HsgConfig


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


class Hierarchy(nn.Module):
    """The chain of clustering transformers: X0 → (X1, Z1, C01) → (X2, Z2, C12) → ..."""

    def __init__(self, cfg: HsgConfig) -> None:
        super().__init__()
        self.levels = tuple(int(n) for n in cfg.levels)
        self.transformers = nn.ModuleList(
            ClusteringTransformer(cfg.dim, n, cfg.heads, cfg.enc_layers, cfg.dec_layers, cfg.ffn, cfg.dropout)
            for n in self.levels)

    def forward(self, x0: Tensor, valid: Tensor | None = None) -> tuple[list[Tensor], list[Tensor]]:
        """x0 (B, n0, m) -> M_l (B, n0, n_l) = C01 C12 ⋯ (propagated soft assignments) and Z_l, per level."""
        ms, zs = [], []
        x, v, prop = x0, valid, None
        for tr in self.transformers:
            x, z, c = tr(x, v)
            prop = c if prop is None else prop @ c  # P_{l+1} = P_l C_l^{l+1}, P_0 one-hot per X0 centroid
            ms.append(prop)
            zs.append(z)
            v = None  # X_{l>=1} tokens are all valid
        return ms, zs
