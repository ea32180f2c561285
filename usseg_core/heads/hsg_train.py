"""HSG training on the view bank and the cached OWT-UCM segments, on the shared resumable loop.

Per step: B images x all V views of the bank (warped features f(G_v(P_v(x)))); the embeddings of every
view; G0 (grid k-means per view, no gradient); segments = G0 clusters split by the view's UCM regions
(the image's segment map cut to the base frame and warped with the view's recorded geometry, computed
once at start); segment prototypes u_s and the transformer's tokens X0 (with gradient: each image's V x K0
G0 centroids, or with ``tokens="segments"`` its segments); the hierarchy of clustering transformers over
them; losses of Eq. 9 (``usseg_core.heads.hsg``).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from usseg_core.errors import ConfigError
from usseg_core.heads.hsg import (HsgConfig, HsgHead, Hierarchy, contrast_denominator, knn_graph,
                                  modularity_terms, pixel_segment_loss, separation_term)
from usseg_core.heads.bank_training import BankMethod
from usseg_core.heads.registry import HeadInputs, TrainedState, config_to_dict
from usseg_core.segsort import compact_ids, grid_kmeans, segment_means
from usseg_core.device import pinned, resolve_device, to_device
from usseg_core.trainer import RESUMABLE_FIELDS, load_checkpoint, run_training
from usseg_core.viewbank import base_region, warp_labels
from usseg_core.views import ViewSpec

HSG_RESUMABLE = RESUMABLE_FIELDS | {"epochs"}


def view_regions(banks: Sequence, segments: Sequence, grid_hw: tuple[int, int]) -> Tensor:
    """UCM regions of every (image, view) on the feature grid: (N, V, h, w) int32.

    ``segments[s][i]`` is image i's region map (H, W) at the original size; it is cut to the bank's base
    frame (mirrored when the base view is) and warped with view v's recorded geometry, nearest sampling
    at each feature cell's centre (labels never blend).
    """
    out = []
    for bank, segs in zip(banks, segments, strict=True):
        if len(segs) != bank.n_images:
            raise ConfigError(f"{len(segs)} oversegmentations for a view bank of {bank.n_images} images")
        base = ViewSpec.from_params(bank.meta["view"])
        for i in range(bank.n_images):
            seg = np.asarray(segs[i])
            t, l, h, w = base_region(seg.shape[:2], base)
            frame = seg[t:t + h, l:l + w]
            frame = frame[:, ::-1] if base.flip else frame
            frame = np.repeat(np.ascontiguousarray(frame, dtype=np.int32)[None], bank.n_views, axis=0)
            geoms = [bank.geometry(i, v) for v in range(bank.n_views)]
            out.append(torch.from_numpy(warp_labels(frame, geoms, grid_hw)))
    return torch.stack(out)


class HsgPlan(NamedTuple):
    """What one HSG step reads: every view of B images, views of an image consecutive."""

    img: np.ndarray  # (B*V,) image of each item
    views: np.ndarray  # (B*V,) its view


class HsgMethod(BankMethod):
    """HSG's multiview segment grouping on cached view features."""

    name = "hsg"

    def __init__(self, banks: Sequence, segments: Sequence, config: HsgConfig, device: torch.device) -> None:
        self.init_bank(banks, config, device, "HSG")
        self.regions = view_regions(banks, segments, tuple(self.bank.shape[1:]))  # (N, V, h, w)
        torch.manual_seed(config.seed)
        self.head = HsgHead(self.bank.shape[0], config.hidden, config.dim).to(device)
        self.hier = Hierarchy(config).to(device)
        self.opt = hsg_optimiser([*self.head.named_parameters(), *self.hier.named_parameters()], config)
        self.init_order()
        if config.transformer == "reference" and self.batch_size < 2:
            raise ConfigError("hsg transformer=reference needs at least 2 images per step (its decoder-input "
                              f"MLP normalises over the batch's images); got {self.batch_size}")
        self.total_steps = config.epochs * self.steps_per_epoch
        self.t = 0  # steps taken (the lr schedule's clock)

    def modules(self):
        return {"head": self.head, "hierarchy": self.hier}

    def optimisers(self):
        return [self.opt]

    def state(self) -> dict:
        return {**super().state(), "t": self.t}

    def load_state(self, state: dict) -> None:
        super().load_state(state)
        self.t = int(state["t"])

    def lr_at(self, t: int) -> float:
        """Step decay at the configured fractions of training ([001] §5.8), after a linear warm-up from lr / 10
        over ``warmup_steps`` ([code:HSG] lr_step: lr (1/10 (1 − t/W) + t/W) while t < W)."""
        cfg = self.config
        if t < cfg.warmup_steps:
            alpha = t / cfg.warmup_steps
            return cfg.lr * (0.1 * (1 - alpha) + alpha)
        passed = sum(t >= round(f * self.total_steps) for f in cfg.decay_at)
        return cfg.lr * cfg.decay_factor ** passed

    def plan(self, step: int) -> HsgPlan:
        idx = self.next_images()  # (B,)
        V = self.bank.n_views
        return HsgPlan(np.repeat(idx, V), np.tile(np.arange(V), len(idx)))

    def read(self, plan: HsgPlan) -> Tensor:
        return pinned(self.bank.batch("warped", plan.img, plan.views), self.device)  # (B*V, C, h, w)

    def step(self, plan: HsgPlan, batch: Tensor) -> dict:
        cfg, V = self.config, self.bank.n_views
        feats = to_device(batch, self.device)  # (B*V, C, h, w)
        emb = self.head(feats)  # (B*V, m, h, w)
        regions = self.regions[torch.from_numpy(plan.img), torch.from_numpy(plan.views)]
        loss, stats = hsg_loss(emb, to_device(regions, self.device).long(), self.hier, cfg, V)
        for g in self.opt.param_groups:
            g["lr"] = self.lr_at(self.t) * g.get("lr_scale", 1.0)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.t += 1
        return {"loss": loss.detach(), "lr": self.lr_at(self.t - 1), **stats}


class ReferenceSGD(torch.optim.Optimizer):
    """[code:HSG]'s SGD (lib/nn/optimizer.py): buf ← m·buf + lr·(g + wd·p), p ← p − buf.

    torch.optim.SGD keeps the lr outside the buffer (buf ← m·buf + g + wd·p, p ← p − lr·buf): the two agree
    while the lr is constant; after a change of lr the reference's past steps keep their old size.
    """

    def __init__(self, params, lr: float, momentum: float, weight_decay: float) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad.add(p, alpha=group["weight_decay"]) if group["weight_decay"] else p.grad
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"].mul_(group["momentum"]).add_(d, alpha=group["lr"])
                p.sub_(buf)
        return None


def hsg_optimiser(named: Sequence[tuple[str, Tensor]], cfg: HsgConfig) -> torch.optim.Optimizer:
    """The SGD of ``cfg.sgd`` over the named parameters, grouped by ``cfg.param_groups``.

    "reference": the parameters whose name ends in "bias" (conv, linear, attention, BatchNorm) form a group
    with ``lr_scale`` 2 and no weight decay ([code:HSG] get_params_lr); the step sets each group's lr to
    ``lr_at(t) * lr_scale``.
    """
    if cfg.param_groups == "reference":
        groups = [{"params": [p for n, p in named if not n.endswith("bias")], "lr_scale": 1.0},
                  {"params": [p for n, p in named if n.endswith("bias")], "lr_scale": 2.0, "weight_decay": 0.0}]
    else:
        groups = [{"params": [p for _, p in named]}]
    if cfg.sgd == "reference":
        return ReferenceSGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def hsg_loss(emb: Tensor, regions: Tensor, hier: Hierarchy, cfg: HsgConfig, n_views: int) -> tuple[Tensor, dict]:
    """Eq. 9 on one batch.

    Args:
        emb: (B*V, m, h, w) unit embeddings, views of an image consecutive.
        regions: (B*V, h, w) long UCM region ids (image-global: a region has one id in every view).
        hier: the clustering transformers. cfg: the config. n_views: V.
    Returns:
        (loss, float stats).
    """
    BV, m, h, w = emb.shape
    B, V = BV // n_views, n_views
    K0 = cfg.train_grid[0] * cfg.train_grid[1]
    with torch.no_grad():
        g0, _, _ = grid_kmeans(emb.detach(), cfg.train_grid, cfg.kmeans_iters, init=cfg.g0_grid,
                               location=cfg.g0_location)  # (BV, h, w)
    flat = emb.permute(0, 2, 3, 1).reshape(-1, m)  # (BV*h*w, m)
    view_of = torch.arange(BV, device=emb.device).repeat_interleave(h * w)  # (N,)
    g0f, rf = g0.reshape(-1), regions.reshape(-1)
    R = int(rf.max()) + 1
    seg, keys = compact_ids((view_of * K0 + g0f) * R + rf)  # (N,) in [0, S); keys (S,)
    S = keys.numel()
    u, _ = segment_means(flat, seg, S)  # (S, m) u_s, with gradient
    s_view, s_cluster, s_region = keys // (K0 * R), (keys // R) % K0, keys % R
    s_img = s_view // V
    # segments are sorted by key, hence by image: each image's segments are one contiguous block
    starts = torch.searchsorted(s_img, torch.arange(B + 1, device=emb.device))  # (B+1,)
    tok = transformer_tokens(cfg.tokens, flat, u, seg, view_of * K0 + g0f, s_view, s_cluster, starts, hier,
                             (B, V, K0, h, w))
    ms, zs = hier(tok.x0, tok.valid, tok.pos)  # M_l (B, T, n_l), Z_l (B, n_l, m)

    # anchors: a random sample of pixels per view (global torch RNG, checkpointed by the loop)
    A = min(cfg.anchors_per_view, h * w)
    pick = torch.rand(BV, h * w, device=emb.device).argsort(dim=1)[:, :A]  # (BV, A)
    anchors = (pick + torch.arange(BV, device=emb.device)[:, None] * (h * w)).reshape(-1)  # (BV*A,)
    own = seg[anchors]
    a_img = view_of[anchors] // V
    logits = flat[anchors] @ u.t() * cfg.concentration  # (BV*A, S)
    denom = contrast_denominator(logits, own)  # (BV*A,)
    # no_positive="own-segment": an anchor without positives takes its own segment ([code:HSG])
    own_logit = logits.gather(1, own[:, None])[:, 0] if cfg.no_positive == "own-segment" else None
    # Positives live in the anchor's own image, one column block of the segments; gather it (padded to the
    # largest image) instead of masking S.
    sizes = starts[1:] - starts[:-1]
    offs = torch.arange(int(sizes.max()), device=emb.device)
    cols = starts[a_img][:, None] + offs[None]  # (BV*A, Smax)
    inblock = offs[None] < sizes[a_img][:, None]
    cols = torch.where(inblock, cols, own[:, None])  # padding points at the own segment (never positive)
    block = logits.gather(1, cols)
    cand = inblock & (cols != own[:, None])
    l_e, n_e = pixel_segment_loss(denom, block, cand & (s_region[cols] == rf[anchors][:, None]), own_logit)
    total = cfg.lambda_e * l_e
    stats = {"loss_edge": float(l_e.detach()), "anchors_edge": n_e, "segments": S}
    for li, m_l in enumerate(ms):
        win = m_l.argmax(-1)  # (B, T): G_l of each token
        grp = win[s_img, tok.of_segment]  # (S,)
        l_f, _ = pixel_segment_loss(denom, block, cand & (grp[cols] == grp[own][:, None]), own_logit)
        total = total + cfg.lambda_f * l_f
        stats[f"loss_group{li + 1}"] = float(l_f.detach())
        used = [len(torch.unique(win[b][tok.valid[b]])) for b in range(B)]  # collapse watch: groups in use
        stats[f"groups_used{li + 1}"] = float(np.mean(used))
    l_g = grouping_loss(tok.x0.detach(), tok.valid, tok.view, ms, zs, cfg)
    total = total + cfg.lambda_g * l_g
    stats["loss_grouping"] = float(l_g.detach())
    if cfg.separation == "reference":  # outside λ_G, over the whole batch ([code:HSG] hsg_cs.py:182-223)
        l_s = sum(separation_term(z_l.reshape(-1, m), cfg.separation_concentration) for z_l in zs)
        total = total + cfg.separation_weight * l_s
        stats["loss_separation"] = float(l_s.detach())
    return total, stats


class Tokens(NamedTuple):
    """The transformer's input X0 for a batch of B images, padded to T tokens per image."""

    x0: Tensor  # (B, T, m) unit token features, with gradient
    valid: Tensor  # (B, T) bool, False on padding (and on G0 clusters emptied by k-means)
    view: Tensor  # (B, T) long, the view of each token (kNN graph of L_g)
    of_segment: Tensor  # (S,) each segment's token index within its image
    pos: Tensor | None  # (B, T, m) mean pixel position of each token (reference transformer), or None


def transformer_tokens(kind: str, flat: Tensor, u: Tensor, seg: Tensor, cluster: Tensor, s_view: Tensor,
                       s_cluster: Tensor, starts: Tensor, hier: Hierarchy, shape: tuple) -> Tokens:
    """X0 of ``cfg.tokens``: "g0-centroids" (the V x K0 G0 centroids of each image, ours) or "segments" (every
    segment of every view of the image, [code:HSG] resnet_fcn_hsg_cs.py:1052-1142, padded to the batch's
    largest count).

    Args:
        flat: (N, m) pixel embeddings; u: (S, m) segment prototypes; seg: (N,) segment of each pixel;
        cluster: (N,) G0 cluster of each pixel, view-major (view * K0 + k); s_view, s_cluster: (S,) view and
        G0 cluster of each segment; starts: (B+1,) first segment of each image (segments sorted by image);
        hier: the hierarchy (token positions); shape: (B, V, K0, h, w).
    """
    B, V, K0, h, w = shape
    m, dev = flat.shape[1], flat.device
    s_img = s_view // V
    if kind == "segments":
        T = int((starts[1:] - starts[:-1]).max())
        of_segment = torch.arange(u.shape[0], device=dev) - starts[s_img]  # rank of the segment in its image
        at = (s_img, of_segment)
        x0 = u.new_zeros(B, T, m).index_put(at, u)  # (B, T, m), padded with zeros
        valid = torch.zeros(B, T, dtype=torch.bool, device=dev).index_put(at, torch.ones_like(s_img, dtype=torch.bool))
        view = torch.zeros(B, T, dtype=torch.long, device=dev).index_put(at, s_view % V)
        pixel_token = s_img[seg] * T + of_segment[seg]  # (N,)
    else:
        T = V * K0
        x0, counts = segment_means(flat, cluster, B * T)  # (B*V*K0, m) G0 centroids, with gradient
        x0, valid = x0.reshape(B, T, m), (counts > 0).reshape(B, T)
        view = torch.arange(V, device=dev).repeat_interleave(K0).expand(B, T)
        of_segment = (s_view % V) * K0 + s_cluster
        pixel_token = cluster  # view-major numbering is image-major too: b * V*K0 + v * K0 + k
    pos = hier.token_positions(pixel_token.reshape(B * V, h, w), B, T)
    return Tokens(x0, valid, view, of_segment, pos)


def grouping_loss(x0: Tensor, valid: Tensor, view: Tensor, ms: list[Tensor], zs: list[Tensor],
                  cfg: HsgConfig) -> Tensor:
    """L_g (Eq. 8) averaged over the images: Σ_l modularity + collapse (+ per-image separation).

    x0 (B, T, m) the tokens, valid (B, T), view (B, T) each token's view. The terms follow ``cfg.modularity``,
    ``cfg.graph``, ``cfg.collapse_norm`` and ``cfg.separation`` (``separation="reference"`` leaves the
    separation to :func:`hsg_loss`: it spans the batch).
    """
    n_pad = int(valid.sum(1).max())  # [code:HSG] pads every image's nodes to the batch's largest count
    out = x0.new_zeros(())
    for b in range(x0.shape[0]):
        keep = valid[b]
        adj = knn_graph(F.normalize(x0[b][keep], dim=-1), view[b][keep], cfg.knn_k, cfg.knn_mode,
                        directed=cfg.graph == "directed")
        for m_l, z_l in zip(ms, zs):
            mod, col = modularity_terms(adj, m_l[b][keep], cfg.modularity, cfg.collapse_norm, n_pad)
            out = out + mod + col
            if cfg.separation == "per-image":
                out = out + separation_term(z_l[b])
    return out / x0.shape[0]


def train_hsg_head(inputs: HeadInputs, config: dict, *, checkpoint_path=None, device: str = "auto",
                   progress: bool = True, on_step=None) -> TrainedState:
    """Train HSG on ``inputs.views`` (view banks) and ``inputs.segments`` (oversegmentations)."""
    cfg: HsgConfig = config["hsg"]
    if inputs.views is None or inputs.segments is None:
        raise ConfigError("HSG trains on the view bank and the oversegmentations; the pipeline gave "
                          f"{'no view bank' if inputs.views is None else 'no oversegmentation'}")
    method = HsgMethod(inputs.views, inputs.segments, cfg, resolve_device(device))
    plain = config_to_dict(config)
    ckpt = load_checkpoint(checkpoint_path, plain, method=method.name, resumable=HSG_RESUMABLE)
    loop = run_training(method, plain, steps=method.total_steps, checkpoint_every=cfg.checkpoint_every,
                        log_every=cfg.log_every, checkpoint_path=checkpoint_path, checkpoint=ckpt,
                        progress=progress, on_step=on_step)
    payload = {"in_dim": int(method.bank.shape[0]), "code_dim": cfg.dim, "head": loop.states["head"],
               "hierarchy": loop.states["hierarchy"]}
    regions = method.regions
    meta = {"steps_per_epoch": method.steps_per_epoch, "n_images": method.bank.n, "n_views": method.bank.n_views,
            "regions_per_view": float(np.mean([len(torch.unique(r)) for r in regions.flatten(0, 1)[:64]]))}
    if loop.seconds_per_step:
        meta["seconds_per_epoch"] = loop.seconds_per_step * method.steps_per_epoch
    return TrainedState(payload=payload, meta=meta, steps_done=loop.steps_done,
                        seconds_per_step=loop.seconds_per_step, history=loop.history)
