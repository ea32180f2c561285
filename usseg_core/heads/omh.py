"""OMH: Optimally Matched Hierarchy, a training-time add-on to STEGO (docs/methods/omh.md §4, `[004]`).

OMH adds N parallel cluster predictors H^(i) with K_i = round(K·ρ^i) unit-norm centres on the
STEGO codes F (B, D, h, w), and ties consecutive levels together with an entropic OT plan
between their centres:

    M^(i)        = relu(cos(H^(i), F))                      (B, K_i, h, w), no stop-gradient on F
    L_i^cluster  = -mean_{x,p} M^(i)_{argmax_k, p}          (diagonal reading of Eq. 3)
    C^(i,i+1)    = 1 - relu(cos(H^(i), H^(i+1)))            (K_i, K_{i+1})
    A^(i,i+1)    = Sinkhorn(C, ε = λ), uniform marginals, rescaled (see below)
    M̂^(i)_{k,p}  = max_l A_{k,l} · M^(i+1)_{l,p}            (transported coarse activation)
    L^match_i    = mean_{x,k,p} | M̂^(i)_{k,p} - M^(i)_{k,p} |
    L^OMH        = λ_sparsity Σ_i L_i^cluster + λ_structure Σ_i L^match_i

``OMHLoss`` is the ``aux`` module of ``train_stego``: it receives the head's codes *undetached*
every step, its centres are trained by the probe optimiser (Adam, 5e-3), and its loss is added to
the STEGO loss. At test time it is discarded (OMH §4.3: inference uses the base cluster probe).

Method notes (gaps in the paper, docs/methods/omh.md §6.18–19, and how this implementation fills them):

1. **Cluster loss is the diagonal.** OMH Eq. 3, as printed, sums the whole K×K product M·M̂ᵀ,
   which makes the arg-max irrelevant. We use the diagonal: minus the mean over pixels of the
   activation of the arg-max cluster, i.e. STEGO's cluster probe (online spherical k-means).
   The activations are relu(cos), so a pixel whose cosines are all negative gives 0 and no
   gradient; with random centres that has probability ≈ 2^-K.
2. **λ is the entropic weight.** We use kernel exp(-C/λ), so larger λ means a blurrier plan. OMH
   Table 7 reports that behaviour (λ = 0.02 sparsest and best), which contradicts the 1/λ
   printed in Eq. 7. Sinkhorn runs in the log domain in float64, and the whole loss is computed
   in fp32 with autocast off (OMH: fp32 is required; λ < 0.02 NaNs with the naive fp32 kernel).
3. **Scale of the plan.** With uniform marginals A_{k,l} ≈ 1/(K_i K_{i+1}), far below the
   activations in [0, 1]. We divide each coarse row by its maximum (``plan_scale="max"``), so the
   best-matching fine cluster of every coarse cluster has weight exactly 1. Then, when level i+1
   exactly refines level i (each coarse centre duplicated into children, plan sharp), the
   transported activation equals the coarse one and the match loss is 0, as it should be for a
   perfect hierarchy. The alternative, multiplying by K_i so each row sums to 1 (``"row"``),
   gives each of a coarse cluster's ρ children only weight 1/ρ. The loss would then be
   (1 - 1/ρ)·M^(i) > 0 even for a perfect hierarchy, and it would keep pushing the activations
   down. ``"row"`` is kept only for ablations.
4. **Gradient through the plan.** Yes by default (``grad_through_plan=True``). Autograd unrolls
   the Sinkhorn iterations, so the match loss also reaches the centres through the cost matrix.
   This is what lets it organise the centres into a hierarchy (a child pulled toward one parent),
   rather than only moving activations for a fixed assignment. The unrolled graph is tiny
   ((27×54) and (54×108) matrices, ≤ 200 iterations).
5. **Sinkhorn iterations.** Not stated in the paper. We use at most 200, stopping early once the
   largest row-marginal error is below 1e-6. At λ = 0.02, random and tree-like 27×54 / 54×108
   costs converge to < 1e-6 in ≤ 100 iterations. Degenerate costs, where centres of consecutive
   levels coincide (cost exactly 0) and a coarse centre has no close fine centre, converge only
   sublinearly: λ = 0.02 on costs in [0, 1] gives kernel ratios up to e^50. After 200 iterations
   the error is ~1e-3 (absolute, against row masses 1/K_i). We accept that: the plan is rescaled
   per row ("max"), so only the shape of each row matters, and more iterations would lengthen
   the unrolled backward. The error reached is reported every step as ``sinkhorn_err_{i}``.
6. **Mean, not sum.** The paper sums the L1 over (x, k, p). We average over (B, K_i, h, w), and
   likewise the cluster loss over (B, h, w). Then the terms lie in [0, 1] whatever the batch size,
   the number of clusters and the resolution, and STEGO's own losses (code: means) are on the same
   scale. That keeps λ_structure = 0.3 and λ_sparsity = 0.01, borrowed unchanged from the paper,
   meaningful at K = 3 (Potsdam) as at K = 27, and at 28×28 or 40×40 codes. The paper's scale is
   kept as an option, ``match_reduction="pixel_sum"``: the L1 summed over the K_i coarse clusters
   and averaged over images and pixels (the paper's sum read per pixel, so that the weights do not
   depend on batch size and resolution either), i.e. K_i times the default match term. The cluster
   term is a per-pixel value in both readings (one arg-max per pixel) and is the same in both.
   Measured on CamVid val (docs/results.md, "OMH: loss scale and weights"): the mean beats the per-pixel sum
   on both seeds (27.81 against 24.45 mIoU at 1000 steps), which is what the default rests on.
7. **Level sizes.** K_i = round(K·ρ^i): 27/54/108 for K = 27, 3/6/12 for K = 3 (Potsdam, inferred).
   Python rounds halves to even, so ρ = 1.5 gives 27/40/61.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from usseg_core.errors import ConfigError
from usseg_core.sinkhorn import marginal_error, sinkhorn_log

_PLAN_SCALES = ("max", "row")
_MATCH_REDUCTIONS = ("mean", "pixel_sum")


@dataclass
class OMHConfig:
    """OMH hyper-parameters; defaults are the paper's (OMH §4, Tables 5–7) unless marked."""

    n_levels: int = 3  # N, hierarchy levels incl. the coarsest (OMH Table 5: N = 3 best)
    rho: float = 2.0  # ρ, K_i = round(K·ρ^i) (OMH Table 6 / worked example 27→54→108)
    ot_eps: float = 0.02  # λ, entropic WEIGHT: kernel exp(-C/λ), larger = blurrier (OMH Table 7)
    sinkhorn_iters: int = 200  # not in the paper: max iterations, early stop at 1e-6 marginal error
    sinkhorn_tol: float = 1e-6  # not in the paper: absolute row-marginal error for early stop
    w_cluster: float = 0.01  # λ_sparsity (OMH §4.2 hyper-parameters)
    w_match: float = 0.3  # λ_structure (OMH §4.2 hyper-parameters)
    # How A (entries ~1/(K_i·K_{i+1})) is brought to the scale of activations in [0, 1]. Not in the
    # paper. "max": divide each coarse row by its max, so the match loss is exactly 0 when the fine
    # level refines the coarse one; "row": multiply by K_i (rows sum to 1; a perfect ρ-ary
    # refinement still costs (1 - 1/ρ)·M). See the module docstring, note 3.
    plan_scale: str = "max"
    # Whether the match loss reaches the centres through A (Sinkhorn unrolled by autograd). Not in
    # the paper; True lets L^match shape the hierarchy of centres itself (module docstring, note 4).
    grad_through_plan: bool = True
    # L^match over (B, K_i, h, w): "mean" (ours) or "pixel_sum" (summed over K_i, the paper's scale per
    # pixel); module docstring, note 6.
    match_reduction: str = "mean"

    def __post_init__(self) -> None:
        if self.n_levels < 1:
            raise ConfigError(f"OMHConfig.n_levels must be >= 1, got {self.n_levels}")
        if not self.rho >= 1.0:
            raise ConfigError(f"OMHConfig.rho must be >= 1 (OMH Table 6: 1..3), got {self.rho}")
        if not self.ot_eps > 0:
            raise ConfigError(f"OMHConfig.ot_eps (λ) must be > 0, got {self.ot_eps}")
        if self.sinkhorn_iters < 1:
            raise ConfigError(f"OMHConfig.sinkhorn_iters must be >= 1, got {self.sinkhorn_iters}")
        if self.plan_scale not in _PLAN_SCALES:
            raise ConfigError(
                f"OMHConfig.plan_scale must be one of {_PLAN_SCALES}, got {self.plan_scale!r}"
            )
        if self.match_reduction not in _MATCH_REDUCTIONS:
            raise ConfigError(f"OMHConfig.match_reduction must be one of {_MATCH_REDUCTIONS}, "
                              f"got {self.match_reduction!r}")


def level_sizes(n_classes: int, n_levels: int, rho: float) -> list[int]:
    """Cluster counts K_i = round(K·ρ^i), i = 0..N-1 (27 -> [27, 54, 108]; 3 -> [3, 6, 12])."""
    return [int(round(n_classes * rho**i)) for i in range(n_levels)]


class HierarchicalClusterHeads(nn.Module):
    """N levels of cluster centres H^(i) (K_i, D), unit-normalised when used.

    Centres are stored unconstrained and normalised in every forward, as in STEGO's cluster probe
    (Gaussian init, cosine scores), so Adam never has to stay on the sphere.
    """

    def __init__(self, code_dim: int, sizes: list[int], generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.code_dim = code_dim
        self.sizes = list(sizes)
        self.centres = nn.ParameterList([nn.Parameter(torch.randn(k, code_dim, generator=generator))
                                         for k in sizes])

    def unit_centres(self) -> list[Tensor]:
        """Unit-norm centres, one (K_i, D) tensor per level."""
        return [F.normalize(h, dim=1) for h in self.centres]

    def activations(self, codes: Tensor) -> list[Tensor]:
        """M^(i) = relu(cos(H^(i), codes)), one (B, K_i, h, w) tensor per level, in [0, 1].

        No stop-gradient on ``codes`` (OMH: unlike the base probe, the OMH heads shape the codes).
        """
        z = F.normalize(codes, dim=1)  # (B, D, h, w)
        return [torch.einsum("bdhw,kd->bkhw", z, h).relu() for h in self.unit_centres()]


def cluster_loss(act: Tensor) -> Tensor:
    """Diagonal OMH Eq. 3 / STEGO probe loss: -mean over pixels of the arg-max cluster's activation.

    Args:
        act: (B, K, h, w) activations.

    Returns:
        0-d tensor in [-1, 0] for activations in [0, 1]. The gradient reaches only the winning
        cluster at each pixel (online spherical k-means).
    """
    return -act.max(dim=1).values.mean()  # (B, h, w) -> scalar


def match_loss(act_coarse: Tensor, act_fine: Tensor, plan: Tensor, reduction: str = "mean") -> Tensor:
    """L1 between coarse activations and fine activations transported through the plan.

    M̂_{k,p} = max_l plan_{k,l} · act_fine_{l,p} (max-pool over fine clusters of the joint
    activation), loss = mean over (B, K_i, h, w) of |M̂ - act_coarse| (the paper sums; see note 6).

    Args:
        act_coarse: (B, K_i, h, w) level-i activations.
        act_fine: (B, K_{i+1}, h, w) level-(i+1) activations.
        plan: (K_i, K_{i+1}) scaled transport plan (``level_plan``).
        reduction: "mean" over (B, K_i, h, w), or "pixel_sum": summed over K_i, mean over (B, h, w).

    Returns:
        0-d tensor, >= 0.
    """
    fine = act_fine.flatten(2)  # (B, K_{i+1}, P)
    # The joint activation (K_i, K_{i+1}, P) per image is only needed to find the arg-max fine
    # cluster l*(k, p); build it without autograd, one image at a time, to bound memory
    # (~18 MB at 54×108×28×28). The differentiable value plan[k, l*]·fine[l*, p] is then
    # gathered, which has the same (sub)gradient as the max but a backward of size (B, K_i, P)
    # instead of (B, K_i, K_{i+1}, P).
    with torch.no_grad():
        fine_t = fine.transpose(1, 2).contiguous()  # (B, P, K_{i+1}): reduce over the last dim,
        # which is ~3x faster on CPU than reducing over a middle dim
        best = torch.stack(
            [(plan[:, None, :] * fine_t[j, None]).max(dim=2).indices for j in range(fine.shape[0])]
        )  # (B, K_i, P) index into K_{i+1}
    rows = torch.arange(plan.shape[0], device=plan.device)[None, :, None]  # (1, K_i, 1)
    transported = plan[rows, best] * fine.gather(1, best)  # (B, K_i, P)
    err = (transported - act_coarse.flatten(2)).abs()
    return err.sum(dim=1).mean() if reduction == "pixel_sum" else err.mean()


def plan_cost(centres_coarse: Tensor, centres_fine: Tensor) -> Tensor:
    """OT cost C = 1 - relu(cos(H^(i), H^(i+1))), (K_i, K_{i+1}) in [0, 1]."""
    z = F.normalize(centres_coarse, dim=1) @ F.normalize(centres_fine, dim=1).T  # (K_i, K_{i+1})
    return 1.0 - z.relu()


def scale_plan(plan: Tensor, scale: str) -> Tensor:
    """Bring a uniform-marginal plan (entries ~1/(K_i K_{i+1})) to the [0, 1] activation scale.

    "max": each row divided by its max (best child weight 1; zero match loss for a perfect
    refinement). "row": multiplied by K_i (each row sums to 1).
    """
    if scale == "max":
        return plan / plan.amax(dim=1, keepdim=True)  # (K_i, K_{i+1})
    if scale == "row":
        return plan * plan.shape[0]  # (K_i, K_{i+1})
    raise ConfigError(f"plan scale must be one of {_PLAN_SCALES}, got {scale!r}")


def level_plan(
    centres_coarse: Tensor,
    centres_fine: Tensor,
    eps: float,
    n_iter: int,
    scale: str,
    tol: float = 1e-6,
) -> Tensor:
    """Scaled OT plan between consecutive levels: Sinkhorn(1 - relu(cos)), then ``scale_plan``.

    Args:
        centres_coarse: (K_i, D) centres (normalised inside).
        centres_fine: (K_{i+1}, D) centres.
        eps: entropic weight λ. n_iter / tol: Sinkhorn limits. scale: "max" or "row".

    Returns:
        (K_i, K_{i+1}) plan on the activation scale, float32 or the centres' dtype.
    """
    raw = sinkhorn_log(plan_cost(centres_coarse, centres_fine), eps, n_iter=n_iter, tol=tol)
    return scale_plan(raw, scale)


def _plan_stats(raw: Tensor) -> tuple[float, float]:
    """Entropy of the plan (nats, as a distribution over K_i·K_{i+1} cells) and effective
    children per coarse cluster (mean over rows of exp(entropy of the row); ρ for a clean ρ-ary
    hierarchy, K_{i+1} for a uniform plan)."""
    p = raw.detach().double()
    ent = -(p * p.clamp_min(1e-300).log()).sum()
    rows = p / p.sum(dim=1, keepdim=True)
    row_ent = -(rows * rows.clamp_min(1e-300).log()).sum(dim=1)
    return float(ent), float(row_ent.exp().mean())


class OMHLoss(nn.Module):
    """OMH auxiliary loss on STEGO codes: ``aux(codes) -> (loss, stats)`` for ``train_stego``.

    Args:
        code_dim: D, channels of the codes (STEGO: 70).
        n_classes: K, clusters of the coarsest level (= number of classes: 27, or 3 for Potsdam).
        config: ``OMHConfig``.
        seed: seeds the centres' Gaussian initialisation (training passes the run seed); None draws from the
            global torch RNG.

    Parameters are the centres of ``self.heads`` (trained by the probe optimiser, Adam 5e-3).
    """

    def __init__(self, code_dim: int, n_classes: int, config: OMHConfig | None = None,
                 seed: int | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else OMHConfig()
        if code_dim < 1 or n_classes < 1:
            raise ConfigError(
                f"OMHLoss: code_dim and n_classes must be >= 1, got {code_dim}, {n_classes}"
            )
        self.sizes = level_sizes(n_classes, self.config.n_levels, self.config.rho)
        # The centres' initialisation is drawn from their own generator, seeded by the run seed: the module is
        # built before the trainer seeds the global RNG, so drawing from that made every OMH run (same key,
        # same seed) start from different centres (measured: 29.46 / 27.72 / 28.11 mIoU for one setting).
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        self.heads = HierarchicalClusterHeads(code_dim, self.sizes, gen)

    def plans(self) -> list[tuple[Tensor, Tensor]]:
        """(raw, scaled) OT plans for each consecutive level pair; raw sums to 1, (K_i, K_{i+1})."""
        cfg = self.config
        out = []
        with torch.set_grad_enabled(cfg.grad_through_plan and torch.is_grad_enabled()):
            cs = list(self.heads.centres)
            for i in range(len(cs) - 1):
                cost = plan_cost(cs[i].float(), cs[i + 1].float())  # (K_i, K_{i+1})
                raw = sinkhorn_log(
                    cost, cfg.ot_eps, n_iter=cfg.sinkhorn_iters, tol=cfg.sinkhorn_tol
                )  # (K_i, K_{i+1}), sums to 1
                out.append((raw, scale_plan(raw, cfg.plan_scale)))
        return out

    def forward(self, codes: Tensor) -> tuple[Tensor, dict[str, float]]:
        """Total OMH loss and per-term stats.

        Args:
            codes: (B, D, h, w) STEGO codes, not detached (gradients flow back into the head).

        Returns:
            loss: 0-d fp32 tensor, w_cluster·Σ_i cluster_i + w_match·Σ_i match_i.
            stats: floats ``cluster_{i}``, ``match_{i}`` (unweighted), ``plan_entropy_{i}``
                (nats), ``plan_children_{i}`` (effective fine clusters per coarse cluster),
                ``sinkhorn_err_{i}`` (max marginal error), ``omh_loss``.
        """
        if codes.ndim != 4 or codes.shape[1] != self.heads.code_dim:
            raise ValueError(
                f"OMHLoss: codes must be (B, {self.heads.code_dim}, h, w), got {tuple(codes.shape)}"
            )
        cfg = self.config
        # fp32 throughout: OMH reports NaNs with mixed precision (Sinkhorn at small λ).
        with torch.autocast(device_type=codes.device.type, enabled=False):
            acts = self.heads.activations(codes.float())  # [(B, K_i, h, w)]
            stats: dict[str, float] = {}
            cluster_terms = [cluster_loss(a) for a in acts]
            match_terms = []
            for i, (raw, plan) in enumerate(self.plans()):
                match_terms.append(match_loss(acts[i], acts[i + 1], plan, cfg.match_reduction))
                ent, children = _plan_stats(raw)
                stats[f"plan_entropy_{i}"] = ent
                stats[f"plan_children_{i}"] = children
                stats[f"sinkhorn_err_{i}"] = float(marginal_error(raw.detach()))
            total = cfg.w_cluster * torch.stack(cluster_terms).sum()
            if match_terms:
                total = total + cfg.w_match * torch.stack(match_terms).sum()
        for i, t in enumerate(cluster_terms):
            stats[f"cluster_{i}"] = float(t.detach())
        for i, t in enumerate(match_terms):
            stats[f"match_{i}"] = float(t.detach())
        stats["omh_loss"] = float(total.detach())
        return total, stats
