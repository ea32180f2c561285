"""STEGO head and its correspondence-distillation loss (Hamilton et al., ICLR 2022; docs/methods/stego.md §3).

The head maps frozen backbone features ``f`` (B, C, h, w) to codes ``s`` (B, D, h, w). It is trained so
that the cosine correlation of codes between two images follows the (spatially centred) cosine
correlation of their backbone features, for three kinds of pairs: an image with itself, with one of its
K nearest neighbours, and with random other images of the batch (paper Eq. 5).

Where the paper is silent (it is truncated before Appendix A.10) the values come from the official
code, tagged ``[code:STEGO]`` = ``mhamilton723/STEGO`` ``src/configs/train_config.yml`` and
``src/modules.py``. Deliberate differences from that code, all documented where they happen:

* one Dropout2d mask per forward, shared by the head's two branches and by the features that feed the
  correspondence tensor F (the reference draws three independent masks);
* negatives are true derangements drawn uniformly (the reference's ``super_perm`` bumps fixed points by
  one, which can repeat an index, i.e. it is not always a permutation);
* the sampling grid is used as given (the reference transposes its random grid, a relabelling only).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from usseg_core.errors import ConfigError
from usseg_core.heads.registry import dataset_preset

TERMS = ("self", "knn", "random")  # order of every (self, knn, random) triple in this module


@dataclass
class StegoConfig:
    """Hyper-parameters of STEGO head training on cached features.

    Defaults are the active values of ``[code:STEGO]`` ``train_config.yml`` unless the comment says
    otherwise. Triples are ordered (self, knn, random) = the reference's (pos_intra, pos_inter, neg_inter).
    """

    dim: int = 70  # code dimension D; [code:STEGO] `dim: 70` (the released Cityscapes ckpt uses 100)
    dropout: float = 0.1  # Dropout2d on backbone features; [code:STEGO] modules.DinoFeaturizer p=0.1
    lr: float = 5e-4  # head Adam learning rate; [code:STEGO] `lr: 5e-4`
    probe_lr: float = 5e-3  # cluster probe / aux Adam learning rate; [code:STEGO] probes Adam 5e-3
    batch_size: int = 16  # [code:STEGO] `batch_size: 16`
    steps: int = 5000  # [code:STEGO] `max_steps: 5000`
    feature_samples: int = 11  # S: S x S random points per image; [code:STEGO] `feature_samples: 11`
    neg_samples: int = 5  # derangements of the batch per step; [code:STEGO] `neg_samples: 5`
    num_neighbors: int = 7  # KNN positive drawn from ranks 1..7; paper §3.1 and [code:STEGO]
    pointwise: bool = True  # spatial centering of F (paper Eq. 3); [code:STEGO] `pointwise: True`
    zero_clamp: bool = True  # max(S, 0) (paper Eq. 4); [code:STEGO] `zero_clamp: True`
    # (self, knn, random) loss weights; [code:STEGO] active block "IAROA vit small" (0.67, 0.25, 0.63),
    # which satisfies the paper's λ_self ≈ λ_rand ≈ 2 λ_knn only roughly.
    weights: tuple[float, float, float] = (0.67, 0.25, 0.63)
    # (self, knn, random) shifts b, or "auto" = measured on the data before training (heads/stego_shifts.py).
    # The paper tuned b per dataset and backbone by hand; users cannot reproduce them (docs/references.md §3,
    # STEGO #23, #63), so unknown data defaults to the automatic rule.
    shifts: tuple[float, float, float] | str = "auto"
    # Fraction of centred feature correlations F^SC above each automatic shift (self, knn, random).
    # Our choice (not from the paper), tuned once on CamVid val with EfficientNet-Lite0 (bench/tune_shifts.py,
    # cluster probe, no CRF, seed 0; raw-feature k-means 31.5 mIoU on the same features):
    #   (1/3, 1/3, 0.15)   -> shifts 0.34/0.32/0.23, 31.8 mIoU (1500 steps), KNN/random code sim 0.14/0.02;
    #   (0.35, 0.45, 0.06) -> shifts 0.33/0.26/0.30, 32.0 (1500) / 31.9 (800 steps), code sim 0.20/0.01;
    #   (0.35, 0.45, 0.45) -> random shift 0.13 (random pairs attract like KNN ones), 28.2 (800 steps);
    #   (0.2, 0.2, 0.2)    -> shifts 0.44/0.40/0.21, 26.9 (800 steps).
    # (0.35, 0.45, 0.06) is the best of these and meets the paper's criterion best (KNN ~0.3, random ~0).
    auto_targets: tuple[float, float, float] = (0.35, 0.45, 0.06)
    checkpoint_every: int = 200  # steps between resumable checkpoints (ours; reference saves every 400)
    seed: int = 0  # seeds torch (init, dropout, sampling) and numpy (batches, KNN picks)
    log_every: int = 50  # steps between history entries (ours)

    def __post_init__(self) -> None:
        if isinstance(self.shifts, str) and self.shifts != "auto":
            raise ConfigError(f"StegoConfig.shifts must be 'auto' or three numbers, got {self.shifts!r}")
        if not isinstance(self.shifts, str):
            self.shifts = _triple("shifts", self.shifts)
        self.weights = _triple("weights", self.weights)
        self.auto_targets = _triple("auto_targets", self.auto_targets)
        if any(not 0.0 < t < 1.0 for t in self.auto_targets):
            raise ConfigError(f"StegoConfig.auto_targets must lie in (0, 1), got {self.auto_targets}")
        for name in ("dim", "batch_size", "steps", "feature_samples", "neg_samples", "num_neighbors",
                     "checkpoint_every", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"StegoConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise ConfigError("StegoConfig.batch_size must be >= 2: random pairs need another image")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"StegoConfig.dropout must lie in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict:
        """Plain JSON-able dict (tuples become lists) for artifact metadata and checkpoints."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}


def _triple(name: str, value) -> tuple[float, float, float]:
    try:
        out = tuple(float(v) for v in value)
    except TypeError as exc:
        raise ConfigError(f"StegoConfig.{name} must be three numbers, got {value!r}") from exc
    if len(out) != 3:
        raise ConfigError(f"StegoConfig.{name} must be three numbers (self, knn, random), got {value!r}")
    return out  # type: ignore[return-value]


# Per-dataset weights/shifts, each copied from one commented block of [code:STEGO] train_config.yml.
# Which block produced which paper table is undocumented (docs/methods/stego.md §6.13).
STEGO_PRESETS: dict[str, dict] = {
    # "Cocostuff27 vit small 1/31/22": neg_inter w 0.63 b 0.66, pos_inter w 0.25 b 0.02, pos_intra w 0.67 b 0.08
    "cocostuff27": {"weights": (0.67, 0.25, 0.63), "shifts": (0.08, 0.02, 0.66)},
    # "Cityscapes 10/3": neg_inter w 0.9059 b 0.3136, pos_inter w 0.5775 b 0.1754, pos_intra w 1 b 0.4583
    "cityscapes27": {"weights": (1.0, 0.5775, 0.9059), "shifts": (0.4583, 0.1754, 0.3136)},
    # "Potsdam vit small 1/31/22": neg_inter w 0.63 b 0.46, pos_inter w 0.25 b 0.02, pos_intra w 0.67 b 0.08
    "potsdam3": {"weights": (0.67, 0.25, 0.63), "shifts": (0.08, 0.02, 0.46)},
    # Ours, not the reference's: CamVid (SegNet release) has no reference block; automatic shifts, and a
    # code dimension of 32 chosen once on CamVid val with EfficientNet-Lite0 (cluster probe, no CRF, 800
    # steps): dim 70 -> 31.9 mIoU (seed 0), dim 32 -> 35.8 / 34.7 (seeds 0 / 1), dim 16 -> 29.0; raw-feature
    # k-means on the same features 31.5. With 11 classes a 70-d code leaves room for many near-orthogonal
    # directions that the 11-centroid cluster probe must then merge; 16 is too few to hold the classes.
    # Length: 1000 steps, the length every CamVid number in the README was measured at; the curve over
    # 250..5000 steps (docs/results.md, "Training length") shows the score peaking early and falling by 5000 (the
    # reference's max_steps), so the reference length is not CamVid's default.
    "camvid11": {"shifts": "auto", "dim": 32, "steps": 1000},
    # No reference block: the reference code dimension and automatic shifts (targets, StegoConfig.auto_targets)
    "directory": {"shifts": "auto"},
    "synthetic": {"shifts": "auto"},
    # the active (uncommented) block, labelled "IAROA vit small": b 0.18 / 0.12 / 0.46
    "reference-default": {"weights": (0.67, 0.25, 0.63), "shifts": (0.18, 0.12, 0.46)},
}


def stego_config_for(dataset: str, **overrides) -> StegoConfig:
    """Config for a dataset registry name (or ``"reference-default"``): its row of :data:`STEGO_PRESETS`.

    ``overrides`` replace any field (e.g. ``steps=2000``); unknown names raise ConfigError.
    """
    known = {f.name for f in dataclasses.fields(StegoConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"stego_config_for: unknown StegoConfig field(s) {unknown}; known: {sorted(known)}")
    values = dataset_preset(STEGO_PRESETS, "stego", dataset)
    values.update(overrides)
    return StegoConfig(**values)


class StegoHead(nn.Module):
    """Code head S(f) = linear(drop(f)) + MLP(drop(f)), both 1x1 convs ([code:STEGO] DinoFeaturizer)."""

    def __init__(self, in_dim: int, dim: int = 70, dropout: float = 0.1) -> None:
        super().__init__()
        self.in_dim, self.dim = in_dim, dim
        self.dropout = nn.Dropout2d(p=dropout)  # drops whole channels: a feature-level augmentation
        self.linear = nn.Conv2d(in_dim, dim, kernel_size=1)
        self.nonlinear = nn.Sequential(
            nn.Conv2d(in_dim, in_dim, kernel_size=1), nn.ReLU(), nn.Conv2d(in_dim, dim, kernel_size=1)
        )

    def _project(self, feats: Tensor) -> Tensor:
        return self.linear(feats) + self.nonlinear(feats)  # (B, D, h, w)

    def forward(self, feats: Tensor) -> tuple[Tensor, Tensor]:
        """(B, C, h, w) features -> (dropped-out features (B, C, h, w), codes (B, D, h, w)).

        In training the dropped-out features are what the correspondence tensor F is computed from
        ([code:STEGO] with ``dropout: True``); one mask serves both the head and F.
        """
        dropped = self.dropout(feats)  # (B, C, h, w)
        return dropped, self._project(dropped)

    def codes(self, feats: Tensor) -> Tensor:
        """Eval-mode codes (no dropout, whatever the module's mode): (B, C, h, w) -> (B, D, h, w)."""
        return self._project(feats)


def _unit(t: Tensor) -> Tensor:
    # eps 1e-10 as [code:STEGO] `norm`: an all-zero vector (e.g. a dropped channel set) stays zero.
    return F.normalize(t, dim=1, eps=1e-10)


def correlation(a: Tensor, b: Tensor, *, unit: bool = False) -> Tensor:
    """Cosine correlation of every position of ``a`` with every position of ``b``.

    (B, C, H, W), (B, C, I, J) -> (B, H, W, I, J); vectors are L2-normalised over C first, unless
    ``unit`` says they already are (the loss normalises each sampled map once, not once per pair).
    """
    if not unit:
        a, b = _unit(a), _unit(b)
    return torch.einsum("bchw,bcij->bhwij", a, b)


def sample_points(t: Tensor, coords: Tensor) -> Tensor:
    """Bilinear samples of ``t`` (B, C, h, w) at ``coords`` (B, S, S, 2) in [-1, 1] (x, y) -> (B, C, S, S).

    align_corners=True and border padding as [code:STEGO] `sample`.
    """
    return F.grid_sample(t, coords, mode="bilinear", padding_mode="border", align_corners=True)


def feature_correlation(f1: Tensor, f2: Tensor, *, pointwise: bool = True, unit: bool = False) -> Tensor:
    """F (paper Eq. 2) or its spatially centred form F^SC (Eq. 3), no gradient: the backbone is frozen.

    (B, C, H, W), (B, C, I, J) -> (B, H, W, I, J). Centering follows [code:STEGO]: subtract, per query
    position (h, w), the mean over the second image's positions (i, j), then add back the global mean of
    the uncentred tensor over the whole batch of pairs, so the shift b keeps its uncentred scale.
    """
    with torch.no_grad():
        fd = correlation(f1, f2, unit=unit)  # (B, H, W, I, J)
        if pointwise:
            global_mean = fd.mean()
            fd = fd - fd.mean(dim=(3, 4), keepdim=True)
            # fd.mean() is 0 up to rounding here; subtracted anyway, as the reference does.
            fd = fd - fd.mean() + global_mean
    return fd


def _correspondence_terms(f1: Tensor, f2: Tensor, c1: Tensor, c2: Tensor, shift: float, *,
                          pointwise: bool, zero_clamp: bool, unit: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """(loss map, F or F^SC, code correlation S), all (B, H, W, I, J); ``unit``: inputs already normalised."""
    fd = feature_correlation(f1, f2, pointwise=pointwise, unit=unit)  # (B, H, W, I, J), constant
    cd = correlation(c1, c2, unit=unit)  # (B, H, W, I, J), carries the gradient to the head
    # Zero clamp (Eq. 4): weakly related codes are pushed to orthogonal, not anti-aligned.
    clamped = cd.clamp(min=0.0) if zero_clamp else cd
    return -clamped * (fd - shift), fd, cd


def correspondence_loss(f1: Tensor, f2: Tensor, c1: Tensor, c2: Tensor, shift: float, *,
                        pointwise: bool = True, zero_clamp: bool = True) -> tuple[Tensor, Tensor]:
    """L_corr of paper Eq. 4 before the sum: −max(S, 0) ⊙ (F^SC − b).

    Args:
        f1, f2: backbone features (B, C, H, W), (B, C, I, J) (no gradient flows into them).
        c1, c2: codes (B, D, H, W), (B, D, I, J).
        shift: the scalar b.
    Returns:
        (loss map (B, H, W, I, J) — take ``.mean()``, as [code:STEGO]; feature correlation F^SC, same shape).
    """
    loss, fd, _ = _correspondence_terms(f1, f2, c1, c2, shift, pointwise=pointwise, zero_clamp=zero_clamp)
    return loss, fd


def derangement(n: int, generator: torch.Generator | None = None) -> Tensor:
    """A uniformly random permutation of range(n) with no fixed point (rejection sampling, ~e tries)."""
    if n < 2:
        raise ConfigError(f"a derangement needs at least 2 items, got batch of {n}")
    arange = torch.arange(n)
    while True:
        perm = torch.randperm(n, generator=generator)
        if not bool((perm == arange).any()):
            return perm


class StegoLoss(nn.Module):
    """Full STEGO loss (paper Eq. 5) on S x S random points per image.

    Pairs, as [code:STEGO] ContrastiveCorrelationLoss: self = each image with itself at the same points;
    knn = the image's points vs. its KNN positive's points; random = the image's points vs. another
    image of the batch (``neg_samples`` derangements), sampled at the positive's points.
    """

    def __init__(self, weights: tuple[float, float, float] = (0.67, 0.25, 0.63),
                 shifts: tuple[float, float, float] = (0.18, 0.12, 0.46), *, feature_samples: int = 11,
                 neg_samples: int = 5, pointwise: bool = True, zero_clamp: bool = True) -> None:
        super().__init__()
        self.weights = tuple(float(w) for w in weights)
        self.shifts = tuple(float(b) for b in shifts)
        self.feature_samples, self.neg_samples = feature_samples, neg_samples
        self.pointwise, self.zero_clamp = pointwise, zero_clamp

    @classmethod
    def from_config(cls, config: StegoConfig, shifts: tuple[float, float, float]) -> "StegoLoss":
        """Loss of a config whose shifts are resolved (``config.shifts`` may be "auto")."""
        return cls(config.weights, shifts, feature_samples=config.feature_samples,
                   neg_samples=config.neg_samples, pointwise=config.pointwise, zero_clamp=config.zero_clamp)

    def forward(self, feats: Tensor, feats_pos: Tensor, codes: Tensor, codes_pos: Tensor, *,
                generator: torch.Generator | None = None) -> tuple[Tensor, dict]:
        """Weighted loss and stats.

        Args:
            feats, feats_pos: (dropped-out) features of the images and of their KNN positives (B, C, h, w).
            codes, codes_pos: their codes (B, D, h, w).
            generator: CPU generator for the sample points and derangements (reproducible, resumable).
        Returns:
            (scalar loss, stats) with detached 0-d tensors ``loss_<term>``, ``feat_corr_<term>`` and
            ``code_corr_<term>`` for term in self / knn / random.
        """
        b, s = feats.shape[0], self.feature_samples
        # Points are drawn on the CPU so a run is reproducible across devices.
        coords1 = (torch.rand(b, s, s, 2, generator=generator) * 2 - 1).to(feats)  # (B, S, S, 2)
        coords2 = (torch.rand(b, s, s, 2, generator=generator) * 2 - 1).to(feats)
        # Each sampled map is normalised once here; the pair terms reuse the unit vectors.
        with torch.no_grad():  # frozen features: no graph
            f1 = _unit(sample_points(feats, coords1))  # (B, C, S, S)
            f2 = _unit(sample_points(feats_pos, coords2))
        c1 = _unit(sample_points(codes, coords1))  # (B, D, S, S)
        c2 = _unit(sample_points(codes_pos, coords2))
        kw = dict(pointwise=self.pointwise, zero_clamp=self.zero_clamp, unit=True)
        w_self, w_knn, w_rand = self.weights
        b_self, b_knn, b_rand = self.shifts

        terms = {
            "self": _correspondence_terms(f1, f1, c1, c1, b_self, **kw),
            "knn": _correspondence_terms(f1, f2, c1, c2, b_knn, **kw),
        }
        rand_parts = []
        for _ in range(self.neg_samples):
            perm = derangement(b, generator).to(feats.device)
            # Negatives: image perm[k] sampled at coords2[k], as [code:STEGO]. Sampling every image at the
            # inversely permuted points and then permuting the small result is the same number without
            # copying the full feature maps: (grid_sample(x, g[inv]))[perm][k] = sample(x[perm[k]], g[k]).
            at = coords2[torch.argsort(perm)]  # (B, S, S, 2)
            with torch.no_grad():
                fn = _unit(sample_points(feats, at))[perm]  # (B, C, S, S)
            cn = _unit(sample_points(codes, at))[perm]  # (B, D, S, S)
            rand_parts.append(_correspondence_terms(f1, fn, c1, cn, b_rand, **kw))
        # Concatenating over permutations then averaging = mean of the per-permutation means.
        terms["random"] = tuple(torch.cat(parts, dim=0) for parts in zip(*rand_parts))

        stats: dict[str, Tensor] = {}
        means = {}
        for name, (loss_map, fd, cd) in terms.items():
            means[name] = loss_map.mean()
            stats[f"loss_{name}"] = means[name].detach()
            stats[f"feat_corr_{name}"] = fd.mean().detach()
            stats[f"code_corr_{name}"] = cd.mean().detach()
        total = w_self * means["self"] + w_knn * means["knn"] + w_rand * means["random"]
        return total, stats
