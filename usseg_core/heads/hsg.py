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
* **Transformer** (``usseg_core.heads.hsg_transformer``; sizes not stated): FFN width 256, statistics MLP 2m → m → m, m = 128; BatchNorm over
  the valid tokens of the batch in place of LayerNorm, 4 heads, 2 + 2 layers, dropout 0.1 (paper).
* **Transition softmax** over the next-level index (each row a distribution, docs/methods/hsg.md §1.2, inferred).
* **kNN graph of L_g** (§1.2): ``knn_mode="pooled"`` = top-``knn_k`` (4) over all views' centroids of an
  image (Cityscapes / KITTI-STEP rule; CamVid, road scenes, takes it), ``"within_across"`` = top-``knn_k``
  (2) inside the centroid's view plus top-``knn_k`` among the other views (our first reading of "within an
  image and its augmented views, respectively"), ``"per_view"`` = top-``knn_k`` inside *every* view
  ([code:HSG]'s rule, the COCO-stuff and Potsdam presets; the two agree at V = 2 only). Binary; by
  default symmetrised (``graph="symmetric"``, as DMoN's modularity assumes); [code:HSG] keeps it directed.
* **L_g's separation term** has no temperature in the paper: by default none (unit vectors, τ = 1) among
  one image's centroids; [code:HSG] uses concentration 16 over the whole batch (``separation``).
* **[code:HSG]'s own choices** (twke18/HSG at aa54ddb, docs/methods/hsg.md, Deviations) are options of
  :class:`HsgConfig`, keyed only when set and all selected by ``REFERENCE`` in the presets of
  cocostuff27, cityscapes27 and potsdam3: ``no_positive`` (L_f of an anchor without positives),
  ``modularity``, ``graph``, ``collapse_norm``, ``separation`` (+ weight and concentration) of L_g,
  ``g0_grid`` and ``g0_location`` of G0's k-means, ``sgd``, ``param_groups``, ``warmup_steps``, and the
  transformer's ``tokens`` (every segment instead of the G0 centroids) and architecture (``transformer``,
  :mod:`usseg_core.heads.hsg_transformer`). One deliberate deviation stays: for an anchor with
  positives the reference forms Σ_same e_s − e_own, which cancels in fp32; we keep the exact
  log-sum-exp over the positives (:func:`pixel_segment_loss`).
* **Optimiser**: SGD, momentum 0.9 (not stated), lr and weight decay of Table 7's nearest row, step decay
  ×0.1 (factor not stated) at 32 / 56 / 75 % of the steps ([001] §5.8). Length in epochs over the cached
  images (HSG's 400 Cityscapes epochs train a ResNet from scratch; a light head on frozen features
  converges far sooner: 10 epochs, ours).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from usseg_core.config import KEYED_WHEN_SET, keyed_asdict
from usseg_core.datasets.registry import dataset_protocol
from usseg_core.errors import ConfigError
from usseg_core.heads.hsg_transformer import ClusteringTransformer, Hierarchy, TokenBatchNorm  # noqa: F401
from usseg_core.heads.registry import TrainedHead, dataset_preset
from usseg_core.segsort import GRID_INITS, grid_kmeans

KNN_MODES = ("pooled", "within_across", "per_view")
NO_POSITIVE = ("drop", "own-segment")
MODULARITY = ("dmon", "reference")
GRAPHS = ("symmetric", "directed")
COLLAPSE_NORMS = ("valid", "padded")
SEPARATIONS = ("per-image", "reference")
OPTIMISERS = ("torch", "reference")
PARAM_GROUPS = ("uniform", "reference")
TOKENS = ("g0-centroids", "segments")
TRANSFORMERS = ("ours", "reference")
# [code:HSG]'s choices where usseg's first version differs (docs/methods/hsg.md, Deviations): the presets of
# the paper's datasets. Each option's default is that first version and enters artifact keys only when set.
REFERENCE = {"no_positive": "own-segment", "modularity": "reference", "graph": "directed",
             "collapse_norm": "padded", "separation": "reference", "g0_grid": "reference", "g0_location": True,
             "sgd": "reference", "param_groups": "reference", "warmup_steps": 100, "tokens": "segments",
             "transformer": "reference"}


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
    knn_mode: str = "pooled"  # "pooled" | "within_across" | "per_view" (module docstring)
    lambda_e: float = 1.0  # λ_E (Table 7, Cityscapes / KITTI / COCO-stuff / Potsdam rows)
    lambda_f: float = 0.1  # λ_F (Table 7)
    lambda_g: float = 0.2  # λ_G (Table 7)
    lr: float = 0.1  # SGD lr (Table 7 Cityscapes / KITTI rows)
    momentum: float = 0.9  # not stated in the paper; [code:HSG] hsg/config/default.py: 0.9
    weight_decay: float = 1e-4  # Table 7 Cityscapes / KITTI rows
    decay_at: tuple[float, ...] = (0.32, 0.56, 0.75)  # step decay points, fractions of training ([001] §5.8)
    decay_factor: float = 0.1  # not in the paper (docs/methods/hsg.md §1.2); [code:HSG] lr_step: 0.1
    epochs: int = 10  # passes over the cached images (ours: frozen features, see docstring)
    batch_size: int = 8  # images per step, each with all its views (ours; Table 7: 32 crops for Cityscapes)
    anchors_per_view: int = 128  # anchor pixels of L_f per view (ours: memory; docstring)
    seed: int = 0  # head init, batch order, anchor sampling
    checkpoint_every: int = 50  # steps between resumable checkpoints (ours)
    log_every: int = 10  # steps between history entries (ours)
    # [code:HSG] (twke18/HSG at aa54ddb) where usseg's first version differs (docs/methods/hsg.md,
    # Deviations); keyed only when set (usseg_core.config.KEYED_WHEN_SET): the defaults are that first
    # version, so its artifact keys and checkpoints stay valid. REFERENCE sets them all.
    # L_f for an anchor without positives: "own-segment" = [code:HSG] hsg/utils/segsort/loss.py:61-70,
    # 183-184: its own segment is the positive, −log e_own / (e_own + Σ_neg), and every anchor is averaged;
    # "drop": left out of the mean (ours)
    no_positive: str = field(default="drop", metadata=KEYED_WHEN_SET)
    # L_g's modularity term: "reference" = 1 − tr(Mᵀ A M − Mᵀ d dᵀ M / 2Σd) / 2Σd (hsg/utils/graph/loss.py:
    # 63-72, d = row sums of A, so twice DMoN's 2e on a symmetric graph); "dmon": DMoN's −tr(...)/2e, 2e = ΣA
    modularity: str = field(default="dmon", metadata=KEYED_WHEN_SET)
    # the kNN graph: "directed" = [code:HSG] (row i keeps its k nearest; loss.py:138 leaves the
    # symmetrisation commented out); "symmetric": A ∨ Aᵀ (ours, as modularity assumes)
    graph: str = field(default="symmetric", metadata=KEYED_WHEN_SET)
    # collapse term: "padded" = [code:HSG] loss.py:82-86, √n_l / n_pad ‖1ᵀ M‖ with n_pad the largest node
    # count of the batch's images and no −1; "valid": √n_l / n_valid ‖1ᵀ M‖ − 1 (DMoN, ours)
    collapse_norm: str = field(default="valid", metadata=KEYED_WHEN_SET)
    # centroid separation: "reference" = [code:HSG] models/predictions/hsg_cs.py:182-223, a SegSort loss of
    # every level centroid against all centroids of the batch's images at concentration
    # ``separation_concentration``, weighted by ``separation_weight`` outside λ_G; "per-image": InfoNCE
    # among one image's centroids at temperature 1, inside λ_G (ours)
    separation: str = field(default="per-image", metadata=KEYED_WHEN_SET)
    # [code:HSG] CENTROID_CONT_LOSS_WEIGHT: 0.2 bashscripts/cityscapes/train.sh, 1.0 COCO stage 2 (= its λ_G)
    separation_weight: float = field(default=0.2, metadata=KEYED_WHEN_SET)
    separation_concentration: float = field(default=16.0, metadata=KEYED_WHEN_SET)  # [code:HSG] CONCENTRATION
    # G0's k-means (training and ``levels``): "reference" grid = round(linspace(0, g − 1, n)) per axis, edge
    # cells half-size (hsg/utils/segsort/common.py:129-153); "floor": equal cells (ours)
    g0_grid: str = field(default="floor", metadata=KEYED_WHEN_SET)
    # True: k-means on normalize([embedding, (y − 0.5, x − 0.5)]) (common.py:312-317, 346-352); False: the
    # embedding alone (ours). Segment prototypes u_s and X0 are means of the embedding either way, as there.
    g0_location: bool = field(default=False, metadata=KEYED_WHEN_SET)
    # "reference": [code:HSG] lib/nn/optimizer.py SGD, the lr inside the momentum buffer (buf ← m buf +
    # lr (g + wd p); p ← p − buf), so a decay slows the step gradually; "torch": torch.optim.SGD (ours)
    sgd: str = field(default="torch", metadata=KEYED_WHEN_SET)
    # "reference": biases at twice the lr and without weight decay (models/embeddings/resnet_fcn_hsg_cs.py
    # get_params_lr); "uniform": one lr and weight decay for every parameter (ours)
    param_groups: str = field(default="uniform", metadata=KEYED_WHEN_SET)
    # steps of linear warm-up from lr / 10 to lr ([code:HSG] WARMUP_ITERATION 100, utils/general/train.py
    # lr_step); 0: none (ours)
    warmup_steps: int = field(default=0, metadata=KEYED_WHEN_SET)
    # the transformer's tokens in training: "segments" = [code:HSG] every segment (G0 cluster ∩ UCM region) of
    # every view of the image, padded to the batch's largest count (models/embeddings/resnet_fcn_hsg_cs.py:
    # 201-239, 1052-1142), so two segments of one G0 cluster may join different groups; "g0-centroids": the
    # V x K0 G0 centroids (ours). At test time there is no UCM: the tokens are the G0 clusters either way.
    tokens: str = field(default="g0-centroids", metadata=KEYED_WHEN_SET)
    # "reference": [code:HSG]'s clustering transformer (hsg/models/heads/transformer.py:15-139,
    # models/embeddings/transformer_clusters.py:50-112; usseg_core.heads.hsg_transformer lists each element:
    # query positions, decoder input fc([mean, std]), learned token positions, final decoder BatchNorm,
    # separate Z and X heads, xavier init); "ours": usseg's first version
    transformer: str = field(default="ours", metadata=KEYED_WHEN_SET)

    def __post_init__(self) -> None:
        for name in ("train_grid", "test_grid", "levels", "decay_at"):
            v = getattr(self, name)
            setattr(self, name, tuple(v) if isinstance(v, (list, tuple)) else (v,))
        for name, allowed in (("knn_mode", KNN_MODES), ("no_positive", NO_POSITIVE), ("modularity", MODULARITY),
                              ("graph", GRAPHS), ("collapse_norm", COLLAPSE_NORMS), ("separation", SEPARATIONS),
                              ("g0_grid", GRID_INITS), ("sgd", OPTIMISERS), ("param_groups", PARAM_GROUPS),
                              ("tokens", TOKENS), ("transformer", TRANSFORMERS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"HsgConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not isinstance(self.g0_location, bool):
            raise ConfigError(f"HsgConfig.g0_location must be true or false, got {self.g0_location!r}")
        if int(self.warmup_steps) < 0:
            raise ConfigError(f"HsgConfig.warmup_steps must be >= 0, got {self.warmup_steps}")
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
        if self.transformer == "reference" and self.dim % 2:
            raise ConfigError(f"HsgConfig.dim ({self.dim}) must be even for transformer=reference (row and "
                              "column position halves)")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"HsgConfig.dropout must lie in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict:
        return keyed_asdict(self)  # the KEYED_WHEN_SET options only when set


# Table 7 rows (docs/methods/hsg.md §1.2) per dataset registry name; an empty row keeps the defaults. The test-time
# n0 (``test_grid``) is the dataset's own declaration (``DatasetProtocol.hsg_test_grid``, HSG [001] §1.3).
# The paper's datasets take [code:HSG]'s choices (REFERENCE); COCO's kNN rule there is top-k inside every
# view (``per_view``: graph/common.py:95-119 with the view as segment label). CamVid, synthetic and
# directory keep usseg's first version: on CamVid, REFERENCE scored lower on every predictor and seed measured
# (docs/results.md, "HSG: the reference's H1–H6 against usseg's first version").
_COCO_ROW = {"lr": 0.003, "weight_decay": 5e-4, "knn_k": 2, "knn_mode": "per_view", **REFERENCE}
HSG_PRESETS: dict[str, dict] = {
    "cocostuff27": _COCO_ROW,
    "potsdam3": _COCO_ROW,
    "cityscapes27": {**REFERENCE},  # bashscripts/cityscapes/train.sh: DMON_KNN 4 pooled, weights 0.2 / 0.2
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


def pixel_segment_loss(denominator: Tensor, logits: Tensor, positive: Tensor,
                       own_logit: Tensor | None = None) -> tuple[Tensor, int]:
    """HSG Eq. 3 averaged over the anchors.

    Args:
        denominator: (A,) :func:`contrast_denominator`.
        logits: (A, P) v_iᵀ u_s / T for the candidate positives of each anchor (e.g. the segments of the
            anchor's own image; any column layout).
        positive: (A, P) bool, G_i^+ in that layout: same group, same image, never the own segment.
        own_logit: (A,) v_iᵀ u_own / T, or None. None: an anchor without positives is left out of the mean
            (``no_positive="drop"``). Given: its own segment is its positive, −log e_own / (e_own + Σ_{s≠own}
            e_s) ([code:HSG] segsort/loss.py:61-70, ``no_positive="own-segment"``), and every anchor counts.
    Returns:
        (mean of −log Σ_+ exp / Σ_{s ≠ own} exp, number of anchors in the mean).
    """
    has = positive.any(1)
    # only the rows with positives: a row of −inf would give NaN gradients even where it is not selected
    num = torch.logsumexp(logits[has].masked_fill(~positive[has], float("-inf")), dim=1)
    if own_logit is not None:
        # [code:HSG] forms Σ_same e_s − e_own, which cancels in fp32 when the own term dominates (up to 19
        # nats on one pixel); the exact log-sum-exp of the positives is kept (docs/methods/hsg.md, Deviations)
        per = torch.logaddexp(denominator, own_logit) - own_logit  # (A,) −log e_own / (e_own + Σ_{s≠own})
        per = per.index_put((has.nonzero()[:, 0],), denominator[has] - num)
        return per.mean(), int(has.numel())
    if not bool(has.any()):
        return logits.sum() * 0.0, 0
    return (denominator[has] - num).mean(), int(has.sum())


def modularity_terms(adj: Tensor, m: Tensor, modularity: str = "dmon", collapse: str = "valid",
                     n_pad: int | None = None) -> tuple[Tensor, Tensor]:
    """The modularity and collapse terms of HSG Eq. 8 for one image and one level.

    Args:
        adj: (n0, n0) binary adjacency of the kNN graph over the X0 centroids (symmetric or directed).
        m: (n0, n_l) soft assignments M_l (rows sum to 1).
        modularity: "dmon": −(1/2e) tr(Mᵀ (A − d dᵀ / 2e) M), 2e = Σ A (DMoN); "reference": [code:HSG]'s
            1 − (1/N) tr(Mᵀ (A − d dᵀ / N) M) with N = 2 Σ d = 2 Σ A (hsg/utils/graph/loss.py:63-72).
            d = the row sums of A.
        collapse: "valid": (√n_l / n0) ‖1ᵀ M‖_F − 1 (DMoN); "padded": (√n_l / n_pad) ‖1ᵀ M‖_F, n_pad the
            padded node count ([code:HSG] loss.py:82-86, no −1).
        n_pad: the padded node count for ``collapse="padded"`` (≥ n0).
    Returns:
        (modularity term, collapse term), scalars.
    """
    norm = adj.sum().clamp_min(1.0) * (2.0 if modularity == "reference" else 1.0)
    deg = adj.sum(1)  # (n0,)
    am = adj @ m  # (n0, n_l)
    dm = deg @ m  # (n_l,)
    tr = (m * am).sum() - (dm * dm).sum() / norm
    mod = 1.0 - tr / norm if modularity == "reference" else -tr / norm
    n0, nl = m.shape
    size = torch.linalg.norm(m.sum(0)) * math.sqrt(nl)
    col = size / n_pad if collapse == "padded" else size / n0 - 1.0
    return mod, col


def separation_term(z: Tensor, concentration: float = 1.0) -> Tensor:
    """(1/n) Σ_k −log softmax_j(κ z_kᵀ z_j)[k] over the L2-normalised rows of z (n, m), κ = ``concentration``.

    κ = 1 on one image's Z_l is usseg's first version (the paper gives no temperature); [code:HSG]
    (models/predictions/hsg_cs.py:182-223) takes every centroid of the batch's images at κ = 16: a SegSort
    loss whose only same-label prototype is the centroid itself, i.e. this InfoNCE.
    """
    z = F.normalize(z, dim=-1)
    sim = z @ z.t() * concentration
    return -torch.log_softmax(sim, dim=1).diagonal().mean()


def knn_graph(x: Tensor, view: Tensor, k: int, mode: str, directed: bool = False) -> Tensor:
    """Binary kNN graph (n, n) over unit centroids ``x`` (n, m) of one image (no self loops).

    ``view`` (n,) long: the view of each centroid. ``pooled``: top-k over all; ``within_across``: top-k in
    the own view plus top-k among the other views; ``per_view``: top-k inside every view ([code:HSG]'s
    per-segment-label k-NN, hsg/utils/graph/common.py:95-119; equal to ``within_across`` at two views).
    Fewer where fewer exist. Row i holds i's neighbours; ``directed=False`` symmetrises (A ∨ Aᵀ).
    """
    n = x.shape[0]
    sim = x @ x.t()
    eye = torch.eye(n, dtype=torch.bool, device=x.device)
    sim = sim.masked_fill(eye, float("-inf"))
    adj = torch.zeros(n, n, dtype=x.dtype, device=x.device)
    same = view[:, None] == view[None, :]
    if mode == "pooled":
        pools = [torch.ones_like(same)]
    elif mode == "within_across":
        pools = [same, ~same]
    else:
        pools = [(view[None, :] == v).expand(n, n) for v in torch.unique(view)]
    kk = min(k, n - 1)
    for pool in pools:
        if kk < 1:
            continue
        val, idx = sim.masked_fill(~pool, float("-inf")).topk(kk, dim=1)
        # a pool with fewer than kk members pads its top-k with −inf columns: they must not erase an
        # edge another pool set, hence the maximum
        adj = torch.maximum(adj, torch.zeros_like(adj).scatter_(1, idx, (val > float("-inf")).to(x.dtype)))
    return adj if directed else torch.maximum(adj, adj.t())


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


def hierarchy_labels(hier: Hierarchy, emb: Tensor, grid: tuple[int, int], iters: int, init: str = "floor",
                     location: bool = False) -> list[Tensor]:
    """[G0, G1, ..., G_L] label maps (B, h, w), fine to coarse, of unit embeddings (B, m, h, w).

    G0: spherical k-means (grid init; ``init`` and ``location`` as :func:`usseg_core.segsort.grid_kmeans`);
    G_l: winner-take-all of the propagated assignments of each pixel's G0 cluster, so every G_{l+1} group
    is a union of G_l groups.
    """
    g0, cents, counts = grid_kmeans(emb, grid, iters, init=init, location=location)
    B, K = cents.shape[:2]
    token = g0 + torch.arange(B, device=g0.device)[:, None, None] * K  # (B, h, w) flat token of each pixel
    ms, _ = hier(cents, counts > 0, hier.token_positions(token, B, K))
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
                                self.cfg.kmeans_iters, self.cfg.g0_grid, self.cfg.g0_location)
