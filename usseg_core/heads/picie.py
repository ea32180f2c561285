"""PiCIE head on frozen cached features (Cho et al., CVPR 2021; docs/methods/picie.md §2, docs/methods/protocol.md §5 S5–S6).

PiCIE alternates two steps every epoch:

1. **Clustering pass** (no gradient): embed both views of every training image and run mini-batch
   k-means on each view *separately*, giving centroids μ¹, μ² and pseudo-labels y¹, y² that stay fixed for
   the epoch. View 1 is z¹ = f(G(P¹(x))) (the image is warped, then embedded); view 2 is
   z² = G(f(P²(x))) (embedded, then the *code map* is warped with the same G): photometric invariance
   between P¹ and P², geometric equivariance through G.
2. **Training pass**: prototype cross-entropy with logits = similarity to the frozen centroids
   (no temperature), within views (z¹ vs y¹/μ¹, z² vs y²/μ²) and across
   views (z¹ vs y²/μ², z² vs y¹/μ¹); total = ((ℓ₁₂ + ℓ₂₁)/2 + (ℓ₁₁ + ℓ₂₂)/2) / 2 as [code:PiCIE].

Deliberate differences from the paper, and the paper's gaps (docs/methods/picie.md §6.10–11), resolved:

* **Frozen features, a light head.** PiCIE fine-tunes a ResNet-18 FPN; here the backbone is frozen and
  cached (the project's premise), and the trainable part is a projection head of the STEGO family
  (1x1 linear + 1x1 MLP, no dropout) to a 128-d, per-pixel L2-normalised embedding (PiCIE's FPN width).
  The augmented views come from the cached *view bank*: each view's photometric and geometric draw is
  recorded once, its features extracted once, and G is replayed on code maps by
  ``usseg_core.viewbank.warp_maps`` (the same code HSG uses on segment maps).
* **Views per epoch.** PiCIE draws P¹, P², G afresh every epoch. With V banked views per image we draw,
  per image and epoch, an ordered pair of distinct views (a, b): P¹ = P_a, G = G_a (view 1 is the bank's
  warped view a), P² = P_b (view 2 is the bank's un-warped view b, warped here by G_a). V = 4 gives 12
  distinct (P¹, P², G) combinations per image.
* **Cluster weights.** The paper says the cross-entropy is "balanced with the size of each cluster";
  [code:PiCIE] passes ``weight = counts / counts.sum()`` to ``nn.CrossEntropyLoss``, i.e. weights
  *proportional* to cluster frequency, which un-balances (big clusters count more). ``balance`` chooses:
  ``"inverse"`` (inverse frequency, the paper's word: our default), ``"frequency"`` (the code; the
  ``cocostuff27`` / ``cityscapes27`` presets keep it, so the published protocol can be reproduced) or
  ``"none"``. Measured on CamVid with frozen EfficientNet-Lite0 features (bench/picie_ablation.py, seed 0,
  10 epochs, no CRF, mIoU / accuracy): frequency 18.7 / 61.1, inverse 35.5 / 70.0, raw-feature k-means
  28.2 / 58.2. With frequency weights the light head collapses every pixel onto its cluster's centroid
  (mean code–centroid cosine 0.985; a linear probe fitted on the codes reaches 17.9 mIoU against 70.4 on
  the raw features) and the small classes are merged away; inverse weights keep them. With PyTorch's
  mean reduction the loss is Σ w_y ℓ / Σ w_y either way.
* **Learning rate and length.** Adam β = (0.9, 0.999), no weight decay, 10 epochs (paper). The paper's
  lr is 1e-3; [code:PiCIE]'s COCO script uses 1e-4 (a later "unstable training" fix), its Cityscapes
  script 1e-3: the ``cocostuff27`` preset takes 1e-4, every other dataset 1e-3.
* **[code:PiCIE]'s centroids, k-means and view 2 (options).** [code:PiCIE]'s frozen zero-bias 1x1 conv
  holds the *raw* centroids: logits <z, μ> = |μ| cos, pseudo-labels argmin ||z − μ||², evaluation
  argmax <z, μ>; its k-means is Euclidean (faiss, not spherical) on every pixel of 5,120 images, then one
  exact running-mean pass in groups of 256 images, never renormalised; it warps view 2's raw map and
  normalises after. usseg's first version used cosine to unit centroids (``centroids="unit"``), spherical
  k-means on a pixel reservoir with renormalised running-count updates (``kmeans="spherical-reservoir"``,
  ``usseg_core.cluster.spherical_kmeans``) and normalise-warp-normalise (``normalise=
  "before-and-after-warp"``); these stay the fields' defaults (and ``camvid11``'s until measured), the
  ``cocostuff27`` / ``cityscapes27`` / ``potsdam3`` presets take [code:PiCIE]'s ("raw", "reference",
  "after-warp"; ``usseg_core.cluster.reference_kmeans``). K = number of classes. usseg keeps its one
  fractional crop box G for both views where [code:PiCIE] rounds separate boxes at image and feature
  resolution (docs/methods/picie.md, Deviations).
* **+H over-clustering** (optional, ``over_clustering=True``): a second clustering with K₂ = ``k_over``
  (100) on the same views, loss λ₁ L_K₁ + λ₂ L_K₂ with λ₁ = log K₂ / (log K₁ + log K₂) and
  λ₂ = log K₁ / (log K₁ + log K₂) (the paper's garbled formula read as "stop the K = 100 term from
  dominating", docs/methods/picie.md §2.2; the released code has no +H path).
* **The method's own clusterer** at evaluation is the last epoch's view-1 centroids μ¹ (PiCIE's
  "prototype classifier", Table 1), scored as in training (cosine, or <z, μ> with ``centroids="raw"``).
  The reference's final protocol, fresh k-means on un-augmented training codes, is the shared k-means row
  of the same results table.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from usseg_core.errors import ConfigError
from usseg_core.config import KEYED_WHEN_SET, keyed_asdict
from usseg_core.heads.registry import TrainedHead, dataset_preset
from usseg_core.heads.stego import StegoHead

BALANCES = ("frequency", "inverse", "none")
CENTROIDS = ("unit", "raw")
KMEANS = ("spherical-reservoir", "reference")
NORMALISE = ("before-and-after-warp", "after-warp")
# [code:PiCIE]'s choices, the presets of the paper's datasets
REFERENCE = {"centroids": "raw", "kmeans": "reference", "normalise": "after-warp"}


@dataclass
class PicieConfig:
    """Hyper-parameters of PiCIE on cached features; sources in the comments (docs/methods/picie.md §2)."""

    dim: int = 128  # embedding width; PiCIE §2.1 (FPN 1x1 convs project to 128)
    dropout: float = 0.0  # PiCIE has no dropout; kept settable for ablations with the STEGO head
    lr: float = 1e-3  # Adam, β (0.9, 0.999), wd 0 (paper); cocostuff27 preset 1e-4 ([code:PiCIE] COCO script)
    epochs: int = 10  # paper: 10 epochs from ImageNet init
    batch_size: int = 32  # images per step; ours ([code:PiCIE] 128 at 320 px with the backbone in the loop)
    balance: str = "inverse"  # CE cluster weights: paper "balanced"; [code:PiCIE] counts/sum = "frequency" (docstring)
    over_clustering: bool = False  # "+H": a second clustering with k_over clusters (paper Table 1)
    k_over: int = 100  # K₂ of "+H" (paper)
    kmeans_samples: int = 100_000  # init sample of kmeans="spherical-reservoir" (ours; [code:PiCIE] 5,120 images)
    kmeans_iters: int = 20  # faiss iterations of the init (either k-means); [code:PiCIE] kmeans_n_iter 20
    kmeans_epochs: int = 1  # update passes after the init of kmeans="spherical-reservoir" (ours; [code:PiCIE] 1)
    seed: int = 0  # seeds the head init, the view pairing, the batch order and the k-means
    # [code:PiCIE]'s three choices that usseg's first version did differently (docs/methods/picie.md,
    # Deviations); keyed only when set (usseg_core.config.KEYED_WHEN_SET): the defaults are that
    # first version, so its artifact keys and checkpoints stay valid.
    # "raw": [code:PiCIE]'s frozen 1x1 conv holds the raw centroids: logits <z, μ> = |μ| cos, pseudo-labels
    # argmin ||z − μ||², evaluation argmax <z, μ>; "unit": cosine to unit centroids everywhere (ours)
    centroids: str = field(default="unit", metadata=KEYED_WHEN_SET)
    # "reference": [code:PiCIE]'s Euclidean faiss k-means on every pixel of kmeans_init_images images, then
    # one running-mean pass over the rest in groups of kmeans_update_images; "spherical-reservoir": ours
    kmeans: str = field(default="spherical-reservoir", metadata=KEYED_WHEN_SET)
    # "after-warp": [code:PiCIE] warps view 2's raw map, then L2-normalises; "before-and-after-warp": ours
    normalise: str = field(default="before-and-after-warp", metadata=KEYED_WHEN_SET)
    kmeans_init_images: int = field(default=5120, metadata=KEYED_WHEN_SET)  # [code:PiCIE] 20 batches x 256
    kmeans_update_images: int = field(default=256, metadata=KEYED_WHEN_SET)  # [code:PiCIE] batch 256
    checkpoint_every: int = 50  # steps between resumable checkpoints (ours)
    log_every: int = 10  # steps between history entries (ours)

    def __post_init__(self) -> None:
        for name, allowed in (("balance", BALANCES), ("centroids", CENTROIDS), ("kmeans", KMEANS),
                              ("normalise", NORMALISE)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"PicieConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("dim", "epochs", "batch_size", "k_over", "kmeans_samples", "kmeans_iters",
                     "kmeans_init_images", "kmeans_update_images", "checkpoint_every", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"PicieConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.kmeans_epochs < 0:
            raise ConfigError(f"PicieConfig.kmeans_epochs must be >= 0, got {self.kmeans_epochs}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"PicieConfig.dropout must lie in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict:
        return keyed_asdict(self)  # the KEYED_WHEN_SET options only when set


# Per-dataset values that differ from the paper's defaults; an empty row keeps the defaults.
PICIE_PRESETS: dict[str, dict] = {
    # [code:PiCIE] train_picie.sh (COCO): lr 1e-4; its frequency-proportional CE weights; its raw centroids,
    # Euclidean k-means and warp-then-normalise (REFERENCE)
    "cocostuff27": {"lr": 1e-4, "balance": "frequency", **REFERENCE},
    # [code:PiCIE] train_picie_cityscapes.sh: lr 1e-3, 10 epochs; its frequency-proportional CE weights; REFERENCE
    "cityscapes27": {"lr": 1e-3, "balance": "frequency", **REFERENCE},
    # no PiCIE script: the paper's defaults, the code's centroids, k-means and views (REFERENCE)
    "potsdam3": {**REFERENCE},
    # ours: the higher mean on CamVid (own centroids 35.04 mIoU against REFERENCE's 34.42, three seeds, no CRF;
    # less than the seed spread of 1.29: a choice of default);
    # docs/results.md, "PiCIE: the reference's centroids, k-means and views (P1–P3) against usseg's first version")
    "camvid11": {},
    "directory": {},
    "synthetic": {},
}


def picie_presets(dataset: str) -> dict[str, dict]:
    return {"picie": dataset_preset(PICIE_PRESETS, "picie", dataset)}


def over_clustering_weights(k1: int, k2: int) -> tuple[float, float]:
    """(λ_K1, λ_K2) = (log K2, log K1) / (log K1 + log K2): CE grows like log K, so the K2 term is damped."""
    a, b = math.log(k1), math.log(k2)
    return b / (a + b), a / (a + b)


def cluster_weights(counts: Tensor, balance: str) -> Tensor:
    """Per-cluster CE weights (K,) from pixel counts (K,).

    "frequency": counts / counts.sum() ([code:PiCIE]); "inverse": total / (K_used · count) for used
    clusters, 0 for empty ones (an empty cluster is never a target); "none": ones.
    """
    counts = counts.double()
    if balance == "frequency":
        w = counts / counts.sum()
    elif balance == "inverse":
        used = counts > 0
        w = torch.where(used, counts.sum() / (used.sum() * counts.clamp_min(1)), torch.zeros_like(counts))
    elif balance == "none":
        w = torch.ones_like(counts)
    else:
        raise ConfigError(f"balance must be one of {BALANCES}, got {balance!r}")
    return w.float()


def prototype_logits(codes: Tensor, centroids: Tensor, kind: str = "unit") -> Tensor:
    """Prototype logits of codes (B, D, h, w) against centroids (K, D) -> (B, K, h, w).

    "unit": cosine to the normalised centroids (ours); "raw": <z, μ> = |μ| cos with the raw centroids,
    [code:PiCIE]'s frozen zero-bias 1x1 conv.
    """
    mu = F.normalize(centroids, dim=1) if kind == "unit" else centroids.to(codes)
    return torch.einsum("bdhw,kd->bkhw", codes, mu)


def pseudo_labels(codes: Tensor, centroids: Tensor, kind: str = "unit") -> Tensor:
    """Nearest centroid of unit codes (B, D, h, w) -> (B, h, w) int64.

    "unit": argmax cosine; "raw": argmin ||z − μ||² = argmax (2<z, μ> − |μ|²) ([code:PiCIE]'s L2 index),
    which is not the argmax of the raw logits when the |μ| differ.
    """
    if kind == "unit":
        return prototype_logits(codes, centroids, "unit").argmax(1)
    mu = centroids.to(codes)
    return (2 * prototype_logits(codes, mu, "raw") - (mu * mu).sum(1)[None, :, None, None]).argmax(1)


def prototype_ce(codes: Tensor, centroids: Tensor, labels: Tensor, weight: Tensor, kind: str = "unit") -> Tensor:
    """PiCIE's L_clust: weighted CE of the prototype logits (:func:`prototype_logits`) against pseudo-labels.

    Args:
        codes: (B, D, h, w) unit codes. centroids: (K, D). labels: (B, h, w) int64 in [0, K).
        weight: (K,) per-cluster weights (:func:`cluster_weights`). kind: "unit" | "raw" logits.
    Returns:
        Σ_p w[y_p] · (−log softmax(logits)_p[y_p]) / Σ_p w[y_p] (PyTorch's weighted mean).
    """
    return F.cross_entropy(prototype_logits(codes, centroids, kind), labels, weight=weight.to(codes))


def picie_loss(z1: Tensor, z2: Tensor, clusterings: list[dict], kind: str = "unit") -> tuple[Tensor, dict]:
    """Within + cross-view prototype CE, summed over clusterings with their λ.

    Args:
        z1, z2: (B, D, h, w) unit codes of view 1 and of view 2 (already warped onto view 1's grid).
        clusterings: per clustering a dict with ``lam`` and, for each view v ∈ {1, 2}, ``mu{v}`` (K, D),
            ``y{v}`` (B, h, w) int64 and ``w{v}`` (K,).
        kind: the logits, "unit" (cosine) or "raw" (<z, μ>), ``PicieConfig.centroids``.
    Returns:
        (loss, stats): loss = Σ_c λ_c ((ℓ12 + ℓ21)/2 + (ℓ11 + ℓ22)/2) / 2 ([code:PiCIE]); stats are floats
        ``loss_within``, ``loss_cross`` (λ-weighted) and ``acc_1`` / ``acc_2`` (fraction of pixels whose
        arg-max logit is their pseudo-label, first clustering).
    """
    total, within_sum, cross_sum = z1.new_zeros(()), 0.0, 0.0
    stats: dict[str, float] = {}
    for ci, c in enumerate(clusterings):
        l11 = prototype_ce(z1, c["mu1"], c["y1"], c["w1"], kind)
        l22 = prototype_ce(z2, c["mu2"], c["y2"], c["w2"], kind)
        l12 = prototype_ce(z1, c["mu2"], c["y2"], c["w2"], kind)
        l21 = prototype_ce(z2, c["mu1"], c["y1"], c["w1"], kind)
        within, cross = (l11 + l22) / 2, (l12 + l21) / 2
        total = total + c["lam"] * (within + cross) / 2
        within_sum += c["lam"] * float(within.detach())
        cross_sum += c["lam"] * float(cross.detach())
        if ci == 0:
            with torch.no_grad():
                for v in (1, 2):
                    z = z1 if v == 1 else z2
                    hit = prototype_logits(z, c[f"mu{v}"], kind).argmax(1) == c[f"y{v}"]
                    stats[f"acc_{v}"] = float(hit.float().mean())
    stats.update(loss_within=within_sum, loss_cross=cross_sum)
    return total, stats


class PicieHead(StegoHead):
    """The projection head with PiCIE's per-pixel L2 normalisation of its output."""

    def embed(self, feats: Tensor, unit: bool = True) -> Tensor:
        """Training-mode codes (dropout if configured): (B, C, h, w) -> (B, D, h, w), unit unless ``unit=False``."""
        z = self(feats)[1]
        return F.normalize(z, dim=1) if unit else z

    def codes(self, feats: Tensor, unit: bool = True) -> Tensor:
        z = self._project(feats)
        return F.normalize(z, dim=1) if unit else z


class PicieTrained(TrainedHead):
    """A trained PiCIE head: unit codes and the last epoch's view-1 centroids as its clusterer.

    With ``centroids="unit"`` the buffer holds unit centroids and the logits are cosines; with "raw" it holds
    [code:PiCIE]'s raw centroids and the logits are <z, μ> on the codes as given: bilinearly upsampled unit
    codes give exactly the reference's upsampled logits, and the arg-max is the reference's.
    """

    method = "picie"
    clusterer = "centroids"

    def __init__(self, in_dim: int, code_dim: int, centroids: Tensor, dropout: float = 0.0,
                 kind: str = "unit") -> None:
        super().__init__(in_dim, code_dim, int(centroids.shape[0]))
        if kind not in CENTROIDS:
            raise ConfigError(f"PicieTrained: centroids must be one of {CENTROIDS}, got {kind!r}")
        self.head = PicieHead(in_dim, code_dim, dropout)
        self.kind = kind
        mu = centroids.float()
        self.register_buffer("centroids", F.normalize(mu, dim=1) if kind == "unit" else mu)  # (K, D)

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> "PicieTrained":
        cfg = ckpt["config"]["picie"]  # a field marked KEYED_WHEN_SET is absent at its default
        kind = cfg.get("centroids", PicieConfig.centroids)
        head = cls(ckpt["in_dim"], ckpt["code_dim"], ckpt["centroids"], cfg["dropout"], kind)
        head.head.load_state_dict(ckpt["head"])
        return head

    def codes(self, feats: Tensor) -> Tensor:
        return self.head.codes(feats)

    def cluster_logits(self, codes: Tensor) -> Tensor:
        # alpha 2 like every other row's CRF unary (STEGO's probe, k-means); the arg-max is the paper's.
        if self.kind == "raw":
            return 2.0 * prototype_logits(codes.float(), self.centroids, "raw")
        return 2.0 * prototype_logits(F.normalize(codes, dim=1), self.centroids)
