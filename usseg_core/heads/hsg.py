"""HSG head on frozen cached features (Ke et al., CVPR 2022, arXiv supplement version; docs/methods/hsg.md §1).

HSG learns pixel embeddings by *multiview cosegmentation*: every training image is seen in V augmented
views; in each view, pixels are grouped (G0: spherical k-means of the embeddings, split by the warped
OWT-UCM regions into edge-conforming segments), and a pixel is pulled towards segments of its own group
in any view of the same image and pushed from the other groups' segments and from every other image's
segments (pixel-to-segment contrast L_f, Eq. 3). Clustering transformers group the G0 centroids of all
views of an image into n1 = 8, then n2 = 4 groups; their transition matrices propagate the assignments
(a coarse group is a union of fine groups) and give the groupings G1, G2 of L_f(G_l) and the
goodness-of-grouping loss L_g (Eq. 8). Total (Eq. 9): λ_E L_f(Ge) + λ_F Σ_l L_f(G_l) + λ_G L_g.

Deliberate differences from the paper, and its gaps (docs/methods/hsg.md §6.3–6.9), resolved:

* **Frozen features, HSG's FCN head.** HSG trains an FCN-ResNet50 from scratch; here the backbone is
  frozen and cached (the project's premise) and the trainable part is HSG's FCN head alone (1x1 conv →
  BatchNorm → ReLU → 1x1 conv, [001] §5.8) to a 128-d, per-pixel L2-normalised embedding.
* **Views** are the view bank's recorded draws (``usseg_core.viewbank``; PiCIE's augmentation family:
  crop r ∈ [0.5, 1], flip, colour jitter, grey, blur — HSG lists the same kinds without magnitudes).
  Every step takes all V (default 4) views of each of its images; the paper does not state V.
* **G0 per view, hierarchy per image.** k-means runs on each view separately (4 x 4 grid init, 15
  iterations, [001] §5.8); the transformer's input X0 is the G0 centroids of *all* V views of an image,
  so G1/G2 groups are shared by the views (what makes "segments of the same group in any view" of
  Eq. 3 well defined); the kNN graph of L_g is built over the same tokens (§1.2 rule, below).
* **Groups of Ge** are the UCM regions of the source image (a region keeps its id in every view).
* **Anchor pixels.** Eq. 3 sums over every pixel; we sample ``anchors_per_view`` pixels per view (ours:
  the logits matrix is anchors x segments-in-batch). Segment prototypes u_s use every pixel.
* **Transformer sizes** (not stated): FFN width 256, statistics MLP 2m → m → m, m = 128; BatchNorm over
  the valid tokens of the batch in place of LayerNorm, 4 heads, 2 + 2 layers, dropout 0.1 (paper).
* **Transition softmax** over the next-level index (each row a distribution, docs/methods/hsg.md §1.2, inferred).
* **kNN graph of L_g** (§1.2): ``knn_mode="pooled"`` = top-``knn_k`` (4) over all views' centroids of an
  image (Cityscapes / KITTI-STEP rule; CamVid, road scenes, takes it), ``"within_across"`` = top-``knn_k``
  (2) inside the centroid's view plus top-``knn_k`` among the other views (COCO / VOC / Potsdam rule, our
  reading of "within an image and its augmented views, respectively"). The graph is symmetrised (an
  undirected graph, as modularity requires: DMoN) and binary.
* **L_g's separation term** has no temperature in the paper: none here (unit vectors, τ = 1).
* **Optimiser**: SGD, momentum 0.9 (not stated), lr and weight decay of Table 7's nearest row, step decay
  ×0.1 (factor not stated) at 32 / 56 / 75 % of the steps ([001] §5.8). Length in epochs over the cached
  images (HSG's 400 Cityscapes epochs train a ResNet from scratch; a light head on frozen features
  converges far sooner: 10 epochs, ours).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from usseg_core.datasets.registry import dataset_protocol
from usseg_core.errors import ConfigError
from usseg_core.heads.registry import TrainedHead, dataset_preset
from usseg_core.segsort import grid_kmeans

KNN_MODES = ("pooled", "within_across")


@dataclass
class HsgConfig:
    """Hyper-parameters of HSG on cached features; sources in the comments (docs/methods/hsg.md §1)."""

    dim: int = 128  # embedding width m ([001] §5.8)
    hidden: int = 256  # FCN head's middle width (not stated; DeepLab's head width)
    concentration: float = 16.0  # 1 / T of Eq. 3, T = 1/16 ([001] §5.8)
    train_grid: tuple[int, int] = (4, 4)  # G0 in training: 4 x 4 segments per crop ([001] §5.8)
    kmeans_iters: int = 15  # spherical k-means steps for G0 ([001] §5.8)
    test_grid: tuple[int, int] = (6, 6)  # n0 at test time ([001] §1.3: 6x6 VOC / COCO-stuff / Potsdam)
    levels: tuple[int, ...] = (8, 4)  # n1, n2 ([001] §5.8)
    heads: int = 4  # attention heads ([001] §5.7)
    enc_layers: int = 2  # ([001] §5.7)
    dec_layers: int = 2  # ([001] §5.7)
    ffn: int = 256  # transformer FFN width (not stated; ours)
    dropout: float = 0.1  # transformer dropout ([001] §5.7)
    knn_k: int = 4  # kNN graph of L_g ([001] §5.7: 4 pooled for Cityscapes / KITTI, 2 + 2 otherwise)
    knn_mode: str = "pooled"  # "pooled" | "within_across" (module docstring)
    lambda_e: float = 1.0  # λ_E (Table 7, Cityscapes / KITTI / COCO-stuff / Potsdam rows)
    lambda_f: float = 0.1  # λ_F (Table 7)
    lambda_g: float = 0.2  # λ_G (Table 7)
    lr: float = 0.1  # SGD lr (Table 7 Cityscapes / KITTI rows)
    momentum: float = 0.9  # not stated (ours)
    weight_decay: float = 1e-4  # Table 7 Cityscapes / KITTI rows
    decay_at: tuple[float, ...] = (0.32, 0.56, 0.75)  # step decay points, fractions of training ([001] §5.8)
    decay_factor: float = 0.1  # not stated (docs/methods/hsg.md §1.2, inferred)
    epochs: int = 10  # passes over the cached images (ours: frozen features, see docstring)
    batch_size: int = 8  # images per step, each with all its views (ours; Table 7: 32 crops for Cityscapes)
    anchors_per_view: int = 128  # anchor pixels of L_f per view (ours: memory; docstring)
    seed: int = 0  # head init, batch order, anchor sampling
    checkpoint_every: int = 50  # steps between resumable checkpoints (ours)
    log_every: int = 10  # steps between history entries (ours)

    def __post_init__(self) -> None:
        for name in ("train_grid", "test_grid", "levels", "decay_at"):
            v = getattr(self, name)
            setattr(self, name, tuple(v) if isinstance(v, (list, tuple)) else (v,))
        if self.knn_mode not in KNN_MODES:
            raise ConfigError(f"HsgConfig.knn_mode must be one of {KNN_MODES}, got {self.knn_mode!r}")
        for name in ("dim", "hidden", "kmeans_iters", "heads", "enc_layers", "dec_layers", "ffn", "knn_k",
                     "epochs", "batch_size", "anchors_per_view", "checkpoint_every", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"HsgConfig.{name} must be >= 1, got {getattr(self, name)}")
        if len(self.train_grid) != 2 or len(self.test_grid) != 2 or min(*self.train_grid, *self.test_grid) < 1:
            raise ConfigError("HsgConfig.train_grid / test_grid must be two positive ints (rows, cols)")
        if not self.levels or any(int(n) < 1 for n in self.levels):
            raise ConfigError(f"HsgConfig.levels must be positive group counts, got {self.levels}")
        if self.dim % self.heads:
            raise ConfigError(f"HsgConfig.dim ({self.dim}) must be divisible by heads ({self.heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"HsgConfig.dropout must lie in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Table 7 rows (docs/methods/hsg.md §1.2) per dataset registry name; an empty row keeps the defaults. The test-time
# n0 (``test_grid``) is the dataset's own declaration (``DatasetProtocol.hsg_test_grid``, HSG [001] §1.3).
_COCO_ROW = {"lr": 0.003, "weight_decay": 5e-4, "knn_k": 2, "knn_mode": "within_across"}
HSG_PRESETS: dict[str, dict] = {
    "cocostuff27": _COCO_ROW,
    "potsdam3": _COCO_ROW,
    "cityscapes27": {},
    "camvid11": {},
    "directory": {},
    "synthetic": {},
}


def hsg_presets(dataset: str) -> dict[str, dict]:
    row = dataset_preset(HSG_PRESETS, "hsg", dataset)
    return {"hsg": {**row, "test_grid": dataset_protocol(dataset).hsg_test_grid}}


# --- losses ----------------------------------------------------------------------------------------

def contrast_denominator(logits: Tensor, own: Tensor) -> Tensor:
    """log Σ_{s ≠ own(i)} exp(logits[i, s]) per anchor: Eq. 3's denominator, shared by every grouping.

    ``logits`` (A, S) = v_iᵀ u_s / T over every segment of the batch; ``own`` (A,) the anchor's segment.
    Positives and negatives together are every segment but the anchor's own, whatever the grouping.
    """
    return torch.logsumexp(logits.scatter(1, own[:, None], float("-inf")), dim=1)


def pixel_segment_loss(denominator: Tensor, logits: Tensor, positive: Tensor) -> tuple[Tensor, int]:
    """HSG Eq. 3, averaged over the anchors whose positive set is not empty.

    Args:
        denominator: (A,) :func:`contrast_denominator`.
        logits: (A, P) v_iᵀ u_s / T for the candidate positives of each anchor (e.g. the segments of the
            anchor's own image; any column layout).
        positive: (A, P) bool, G_i^+ in that layout: same group, same image, never the own segment.
    Returns:
        (mean of −log Σ_+ exp / Σ_{s ≠ own} exp, number of anchors with positives).
    """
    has = positive.any(1)
    if not bool(has.any()):
        return logits.sum() * 0.0, 0
    num = torch.logsumexp(logits[has].masked_fill(~positive[has], float("-inf")), dim=1)
    return (denominator[has] - num).mean(), int(has.sum())


def modularity_terms(adj: Tensor, m: Tensor) -> tuple[Tensor, Tensor]:
    """DMoN's two terms of HSG Eq. 8 for one image and one level.

    Args:
        adj: (n0, n0) symmetric binary adjacency of the kNN graph over the X0 centroids.
        m: (n0, n_l) soft assignments M_l (rows sum to 1).
    Returns:
        (−(1/2e) tr(Mᵀ (A − D Dᵀ / 2e) M), (√n_l / n0) ‖1ᵀ M‖_F − 1); 2e = Σ A (each edge counted twice).
    """
    two_e = adj.sum().clamp_min(1.0)
    deg = adj.sum(1)  # (n0,)
    am = adj @ m  # (n0, n_l)
    dm = deg @ m  # (n_l,)
    tr = (m * am).sum() - (dm * dm).sum() / two_e
    n0, nl = m.shape
    collapse = math.sqrt(nl) / n0 * torch.linalg.norm(m.sum(0)) - 1.0
    return -tr / two_e, collapse


def separation_term(z: Tensor) -> Tensor:
    """(1/n_l) Σ_k −log softmax_j(z_kᵀ z_j)[k] over the L2-normalised rows of Z_l (n_l, m); no temperature."""
    z = F.normalize(z, dim=-1)
    sim = z @ z.t()
    return -torch.log_softmax(sim, dim=1).diagonal().mean()


def knn_graph(x: Tensor, view: Tensor, k: int, mode: str) -> Tensor:
    """Symmetric binary kNN graph (n, n) over unit centroids ``x`` (n, m) of one image (no self loops).

    ``view`` (n,) long: the view of each centroid. ``pooled``: top-k over all; ``within_across``: top-k in
    the own view plus top-k among the other views (fewer where fewer exist).
    """
    n = x.shape[0]
    sim = x @ x.t()
    eye = torch.eye(n, dtype=torch.bool, device=x.device)
    sim = sim.masked_fill(eye, float("-inf"))
    adj = torch.zeros(n, n, dtype=x.dtype, device=x.device)
    same = view[:, None] == view[None, :]
    pools = [torch.ones_like(same)] if mode == "pooled" else [same, ~same]
    for pool in pools:
        s = sim.masked_fill(~pool, float("-inf"))
        kk = min(k, n - 1)
        if kk < 1:
            continue
        val, idx = s.topk(kk, dim=1)
        adj.scatter_(1, idx, (val > float("-inf")).to(x.dtype))
    adj = torch.maximum(adj, adj.t())
    return adj


# --- clustering transformer ------------------------------------------------------------------------

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


# --- the head --------------------------------------------------------------------------------------

class HsgHead(nn.Module):
    """HSG's FCN head on frozen features: 1x1 conv → BN → ReLU → 1x1 conv, per-pixel L2 norm."""

    def __init__(self, in_dim: int, hidden: int, dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(in_dim, hidden, 1), nn.BatchNorm2d(hidden), nn.ReLU(),
                                 nn.Conv2d(hidden, dim, 1))

    def forward(self, feats: Tensor) -> Tensor:
        """(B, C, h, w) -> (B, m, h, w) unit embeddings."""
        return F.normalize(self.net(feats), dim=1)


def hierarchy_labels(hier: Hierarchy, emb: Tensor, grid: tuple[int, int], iters: int) -> list[Tensor]:
    """[G0, G1, ..., G_L] label maps (B, h, w), fine to coarse, of unit embeddings (B, m, h, w).

    G0: spherical k-means (grid init); G_l: winner-take-all of the propagated assignments of each pixel's
    G0 cluster, so every G_{l+1} group is a union of G_l groups.
    """
    g0, cents, counts = grid_kmeans(emb, grid, iters)
    ms, _ = hier(cents, counts > 0)
    out = [g0]
    for m in ms:
        win = m.argmax(-1)  # (B, n0)
        out.append(torch.gather(win, 1, g0.flatten(1)).reshape(g0.shape))
    return out


class HsgTrained(TrainedHead):
    """A trained HSG head: unit codes and the per-image hierarchy (no dataset-level clusterer)."""

    method = "hsg"
    clusterer = None

    def __init__(self, in_dim: int, cfg: HsgConfig, n_classes: int) -> None:
        super().__init__(in_dim, cfg.dim, n_classes)
        self.cfg = cfg
        self.head = HsgHead(in_dim, cfg.hidden, cfg.dim)
        self.hierarchy = Hierarchy(cfg)

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> "HsgTrained":
        head = cls(ckpt["in_dim"], HsgConfig(**ckpt["config"]["hsg"]), ckpt["n_classes"])
        head.head.load_state_dict(ckpt["head"])
        head.hierarchy.load_state_dict(ckpt["hierarchy"])
        return head.eval()

    def codes(self, feats: Tensor) -> Tensor:
        return self.head(feats)

    @torch.no_grad()
    def levels(self, codes: Tensor, grid: tuple[int, int] | None = None) -> list[Tensor]:
        """Per-image hierarchy [G0 (n0 = grid), G1 (n1), G2 (n2)] of codes (B, m, h, w), fine to coarse."""
        return hierarchy_labels(self.hierarchy, F.normalize(codes, dim=1), tuple(grid or self.cfg.test_grid),
                                self.cfg.kmeans_iters)
