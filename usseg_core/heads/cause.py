"""CAUSE: causal unsupervised semantic segmentation (Kim et al., arXiv 2310.07379; docs/methods/cause.md).

Three parts, all trained on cached frozen features (no backbone in the loop):

1. the *concept clusterbook* (the paper's mediator, [code:CAUSE] ``train_mediator.py``): K concept vectors
   in the backbone's feature space fitted by maximising the modularity of each image's patch-affinity graph
   under a soft concept assignment (:func:`modularity_loss`, :func:`fit_clusterbook`). It is a cached stage
   of its own (``tasks/clusterbook.py``), shared by both variants and every seed;
2. the *front-door* concept-wise self-supervised training ([code:CAUSE] ``train_front_door_{mlp,tr}.py``):
   a student head and its EMA teacher; each patch's positives and negatives are the patches (of the batch,
   and of a bank of earlier teacher projections) whose concepts are close / far from its own concept
   (:func:`concept_masks`, :func:`front_door_loss`, :class:`ConceptBank`);
3. the *cluster-probe fine-tuning* ([code:CAUSE] ``fine_tuning_{mlp,tr}.py``): K = n_classes centroids in
   code space fitted by the same modularity objective on the teacher's codes; that probe is the head's own
   clusterer (:class:`CauseTrained`).

``[code:CAUSE]`` = ``ByungKwanLee/Causal-Unsupervised-Segmentation`` at ``ee0aa84`` (``modules/segment_module.py``,
``modules/segment.py`` and the scripts above). Deliberate differences from that code (each an option where
it can move numbers; docs/methods/cause.md, "Deviations from the reference code"):

* one device, batch 16, learning rates 1e-3: the reference runs 4 GPUs of 16 images with ``lr = 1e-3 * 4``
  (each GPU its own loss and bank, gradients averaged); we keep its per-loss batch and scale the rate back
  by the linear rule (``lr`` fields);
* fp32 everywhere (the reference trains under fp16 autocast with a GradScaler);
* the supervised linear probe the reference trains beside the head (and, in its fine-tuning script, through
  the teacher: labels reach the codes there) is not part of training: the linear probe is the shared
  evaluation stage, and the teacher is frozen during the probe's fine-tuning;
* an image whose anchors have no positive pair is left out of the loss average (the reference's mean of
  an empty set is NaN, and its GradScaler then skips the whole step);
* CAUSE-TR's learned query positions (one per training token) are resized bilinearly as a grid when the
  evaluation grid differs from the training grid (the reference trains and tests at the same 320 px);
* random draws (grid sampling, bank cuts) come from a checkpointed generator, not the global RNG.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from usseg_core.errors import ConfigError
from usseg_core.heads.registry import TrainedHead, dataset_preset

VARIANTS = ("mlp", "tr")


@dataclass
class ClusterbookConfig:
    """The concept clusterbook (mediator) fit: [code:CAUSE] ``train_mediator.py`` unless noted."""

    concepts: int = 2048  # K concepts; [code:CAUSE] `--num_codebook 2048` (paper §4.1)
    epochs: int = 1  # passes over the five-crop features; [code:CAUSE] `--epoch 1`
    batch_size: int = 16  # [code:CAUSE] `--batch_size 16` (per GPU)
    lr: float = 1e-3  # Adam; [code:CAUSE] `1e-3 * ngpus` with 4 GPUs; one device here (module doc)
    temperature: float = 0.1  # tanh temperature of the concept co-assignment; [code:CAUSE] `temp=0.1`
    grid: int = 4  # one random token per grid x grid block (`stochastic_sampling`, `--grid yes`, k=4); 1 = all
    codebook_seed: int = 0  # initialisation and grid draws (ours; not the run seed: one book for every seed)

    def __post_init__(self) -> None:
        for name in ("concepts", "epochs", "batch_size", "grid"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"clusterbook.{name} must be >= 1, got {getattr(self, name)}")
        if self.concepts < 2:
            raise ConfigError(f"clusterbook.concepts must be >= 2, got {self.concepts}")
        if self.lr <= 0 or self.temperature <= 0:
            raise ConfigError("clusterbook.lr and clusterbook.temperature must be > 0")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def fit_params(self) -> dict:
        """The fields that decide the fitted book: all of them (its key)."""
        return self.to_dict()


@dataclass
class CauseConfig:
    """Front-door training and cluster-probe fine-tuning: [code:CAUSE] defaults unless noted.

    Lengths are in epochs over the five-crop features, as in the reference (drop-last batches of
    ``batch_size``); ``probe_epochs=None`` takes the variant's reference value (MLP 1, TR 5).
    """

    dim: int = 90  # code dimension; [code:CAUSE] `--reduced_dim 90`
    projection_dim: int = 2048  # projection head output; [code:CAUSE] `--projection_dim 2048`
    dropout: float = 0.1  # nn.Dropout(p=0.1) on the head's input tokens ([code:CAUSE] modules/segment.py)
    batch_size: int = 16  # [code:CAUSE] `--batch_size 16` (per GPU)
    epochs: int = 2  # front-door epochs; [code:CAUSE] train_front_door_{mlp,tr}.py `--epoch 2`
    probe_epochs: int | None = None  # fine-tuning epochs; None: [code:CAUSE] fine_tuning_mlp 1, fine_tuning_tr 5
    front_steps: int | None = None  # front-door length in steps instead of epochs (ours: small budgets)
    probe_steps: int | None = None  # fine-tuning length in steps instead of epochs (ours)
    lr: float = 1e-3  # head Adam; [code:CAUSE] `1e-3 * ngpus` (4 GPUs), one device here (module doc)
    weight_decay: float = 1e-4  # Adam L2; [code:CAUSE] 1e-4, except Cityscapes 0
    clip: float | None = None  # grad-norm clip; None: [code:CAUSE] COCO MLP 0.1, TR 2 (Cityscapes 1: preset)
    probe_lr: float = 1e-3  # cluster-probe Adam; [code:CAUSE] `1e-3 * ngpus`, StepLR(2 epochs, 0.5)
    temperature: float = 0.07  # InfoNCE temperature; [code:CAUSE] `temp=0.07`
    pos_thresh: float = 0.3  # concept cosine above: positive; [code:CAUSE] `pos_thresh=0.3`
    neg_thresh: float = 0.1  # concept cosine below: negative; [code:CAUSE] `neg_thresh=0.1`
    ema: float = 0.99  # teacher = ema * teacher + (1 - ema) * student; [code:CAUSE] `lamb=0.99`
    bank_size: int = 100  # teacher projections kept per concept; [code:CAUSE] `max_num=100`
    bank_keep: float = 0.5  # fraction of a concept's new projections banked per step; [code:CAUSE] 50 %
    grid: int = 4  # one random token per grid x grid block in the loss ([code:CAUSE] `--grid yes`, k=4)
    probe_temperature: float = 0.1  # fine-tuning modularity tanh temperature ([code:CAUSE] `temp=0.1`)
    crf_alpha: float = 3.0  # CRF unary log softmax(alpha * cos); [code:CAUSE] forward_centroid `alpha=3`
    tr_hidden: int = 2048  # CAUSE-TR feed-forward width; [code:CAUSE] TRDecoder `hidden_dim=2048`
    tr_heads: int = 1  # CAUSE-TR attention heads; [code:CAUSE] TRDecoder `nhead=1`
    checkpoint_every: int = 100  # steps between resumable checkpoints (ours)
    log_every: int = 10  # steps between history entries (ours)
    seed: int = 0  # the run seed: initialisation, dropout, batches, grid and bank draws

    def __post_init__(self) -> None:
        for name in ("dim", "projection_dim", "batch_size", "epochs", "bank_size", "grid", "tr_hidden",
                     "tr_heads", "checkpoint_every", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"cause.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("probe_epochs", "front_steps", "probe_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ConfigError(f"cause.{name} must be >= 0, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise ConfigError("cause.batch_size must be >= 2: in-batch pairs need another image")
        if not 0.0 <= self.dropout < 1.0 or not 0.0 <= self.ema <= 1.0 or not 0.0 < self.bank_keep <= 1.0:
            raise ConfigError("cause.dropout must lie in [0, 1), cause.ema in [0, 1], cause.bank_keep in (0, 1]")
        if not self.neg_thresh <= self.pos_thresh:
            raise ConfigError(f"cause.neg_thresh {self.neg_thresh} must be <= pos_thresh {self.pos_thresh}")
        if self.clip is not None and self.clip <= 0:
            raise ConfigError(f"cause.clip must be > 0 or None, got {self.clip}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def clip_for(self, variant: str) -> float:
        return self.clip if self.clip is not None else {"mlp": 0.1, "tr": 2.0}[variant]

    def probe_epochs_for(self, variant: str) -> int:
        return self.probe_epochs if self.probe_epochs is not None else {"mlp": 1, "tr": 5}[variant]

    def lengths(self, variant: str, per_epoch: int) -> tuple[int, int]:
        """(front-door steps, fine-tuning steps): the ``*_steps`` fields where set, else epochs x ``per_epoch``."""
        front = self.front_steps if self.front_steps is not None else self.epochs * per_epoch
        probe = self.probe_steps if self.probe_steps is not None else self.probe_epochs_for(variant) * per_epoch
        return front, probe


# Per-dataset rows (every registered dataset has one; an empty row keeps the reference's COCO values).
CAUSE_PRESETS: dict[str, dict] = {
    "cocostuff27": {},
    # [code:CAUSE] cityscapes branches: no weight decay, grad-norm clip 1 for both variants
    "cityscapes27": {"weight_decay": 0.0, "clip": 1.0},
    "potsdam3": {},  # not in the reference: COCO's values
    "camvid11": {},  # lengths per variant below
    "directory": {},  # a user's folder: the reference's values
    "synthetic": {},
}
# Per dataset and variant, on top of CAUSE_PRESETS.
CAUSE_VARIANT_PRESETS: dict[str, dict[str, dict]] = {
    # Ours: CamVid is not in the reference. Its 468 training images give 2340 five-crops, 146 steps an
    # epoch. CAUSE-MLP trains the reference's lengths (2 front-door epochs, 292 steps, and 1 probe epoch):
    # 438 steps in 3 min 6 s on 2 idle CPU cores (docs/results.md, "CAUSE on CamVid"); its first preset,
    # 120 front-door steps, came from a bench under load average ~8 (2-4 s a step) and scored below it on
    # k-means over codes. A CAUSE-TR front-door step takes 3-8 s (its decoder over 784 tokens of 472
    # channels, student and teacher), so the reference's 2 + 5 epochs (1022 steps) would be 1-2 hours
    # here: 24 + 24 steps, a token training, not the reference's (`--set cause.front_steps=null
    # --set cause.probe_steps=null` trains them).
    "camvid11": {"mlp": {}, "tr": {"front_steps": 24, "probe_steps": 24}},
}
CLUSTERBOOK_PRESETS: dict[str, dict] = {
    "cocostuff27": {}, "cityscapes27": {}, "potsdam3": {}, "camvid11": {}, "directory": {}, "synthetic": {},
}


def cause_presets(dataset: str, variant: str = "mlp") -> dict[str, dict]:
    """The preset rows of CAUSE-``variant`` on ``dataset`` (both sections)."""
    cause = dataset_preset(CAUSE_PRESETS, "cause", dataset)
    cause.update(CAUSE_VARIANT_PRESETS.get(dataset, {}).get(variant, {}))
    return {"cause": cause, "clusterbook": dataset_preset(CLUSTERBOOK_PRESETS, "clusterbook", dataset)}


# --- shape helpers -----------------------------------------------------------------------------------

def tokens(feats: Tensor) -> Tensor:
    """(B, C, h, w) -> (B, h*w, C) (the reference's ``untransform``)."""
    return feats.flatten(2).transpose(1, 2)


def untokens(x: Tensor, hw: tuple[int, int]) -> Tensor:
    """(B, h*w, C) -> (B, C, h, w) (the reference's ``transform``, for any h, w)."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *hw)


def grid_order(batch: int, hw: tuple[int, int], k: int, generator: torch.Generator | None) -> Tensor:
    """One position in 0..k*k-1 per k x k block: (B * h//k * w//k,) int64 (drawn on the CPU)."""
    n = batch * (hw[0] // k) * (hw[1] // k)
    return torch.randint(k * k, (n,), generator=generator)


def grid_sample(x: Tensor, hw: tuple[int, int], k: int, order: Tensor) -> Tensor:
    """(B, h*w, C) tokens -> (B, h//k * w//k, C): token ``order[b]`` of each k x k block (row-major in the
    block); trailing rows/columns that fill no block are dropped ([code:CAUSE] ``stochastic_sampling``)."""
    if k == 1:
        return x
    b, _, c = x.shape
    h, w = hw
    if h < k or w < k:
        raise ConfigError(f"grid sampling k={k} needs a feature grid of at least {k}x{k}, got {h}x{w}")
    grid = untokens(x, hw)[:, :, :h // k * k, :w // k * k]  # (B, C, H', W')
    blocks = grid.unfold(2, k, k).unfold(3, k, k)  # (B, C, h/k, w/k, k, k)
    blocks = blocks.permute(0, 2, 3, 4, 5, 1).reshape(-1, k * k, c)  # (B*h/k*w/k, k*k, C)
    picked = blocks[torch.arange(blocks.shape[0]), order.to(x.device)]  # (B*h/k*w/k, C)
    return picked.reshape(b, -1, c)


# --- modularity (clusterbook and cluster probe) ------------------------------------------------------

def modularity_matrix(x: Tensor) -> tuple[Tensor, Tensor]:
    """Patch graphs of each image: x (B, P, C) -> (W (B, P, P), e (B, 1, 1)).

    A = max(cos, 0) with a zero diagonal, d = row sums, e = sum of A (= 2m), W = A - d dᵀ / e: the
    modularity matrix (Newman), so that Q = Σ_ij W_ij δ(c_i, c_j) / e.
    """
    xn = F.normalize(x, dim=2)
    a = (xn @ xn.transpose(1, 2)).clamp(min=0)
    a = a * (1 - torch.eye(a.shape[1], device=a.device, dtype=a.dtype))
    d = a.sum(dim=2, keepdim=True)  # (B, P, 1)
    e = a.sum(dim=(1, 2), keepdim=True)  # (B, 1, 1)
    return a - d @ d.transpose(1, 2) / e, e


def modularity_loss(centres: Tensor, x: Tensor, temperature: float) -> Tensor:
    """−(mean over images of the soft modularity) of the tokens ``x`` (B, P, C) under ``centres`` (K, C).

    Soft assignment C_ik = max(cos(x_i, c_k), 0); co-assignment δ_ij = max_k tanh(C_ik C_jk / T);
    Q_b = Σ_ij W_ij δ_ij / e (paper Eq. 6, [code:CAUSE] ``compute_modularity_based_codebook``). ``x`` is
    treated as a constant (the reference detaches it): only the centres learn.
    """
    x = x.detach()
    w, e = modularity_matrix(x)
    c = (F.normalize(x, dim=2) @ F.normalize(centres, dim=1).t()).clamp(min=0)  # (B, P, K)
    # δ_ij = tanh(C_ik* C_jk* / T) with k* = argmax_k C_ik C_jk (tanh is increasing). The arg-max is found
    # without autograd, in chunks of centres, so no (B, K, P, P) tensor is kept; the gradient of a max
    # reaches its arg-max only, as here.
    with torch.no_grad():
        best = torch.full(c.shape[:1] + (c.shape[1], c.shape[1]), -1.0, dtype=c.dtype, device=c.device)
        arg = torch.zeros(best.shape, dtype=torch.long, device=c.device)
        for k0 in range(0, c.shape[2], 256):
            ck = c[:, :, k0:k0 + 256].permute(0, 2, 1)  # (B, k, P)
            val, idx = (ck.unsqueeze(3) * ck.unsqueeze(2)).max(dim=1)  # (B, P, P)
            better = val > best
            best = torch.where(better, val, best)
            arg = torch.where(better, idx + k0, arg)
    ci = torch.gather(c, 2, arg)  # (B, P, P): C_{i, k*_ij}
    cj = torch.gather(c, 2, arg.transpose(1, 2)).transpose(1, 2)  # C_{j, k*_ij} (k*_ij = k*_ji)
    delta = torch.tanh(ci * cj / temperature)
    q = ((w / e) * delta).sum(dim=(1, 2))  # (B,) (δ is symmetric: trace((W/e) δ) = Σ_ij W_ij δ_ij / e)
    return -q.mean()


def init_centres(k: int, dim: int, generator: torch.Generator | None = None) -> Tensor:
    """Uniform(−1/k, 1/k) initialisation ([code:CAUSE] ``reset``): (k, dim)."""
    return (torch.rand(k, dim, generator=generator) * 2 - 1) / k


# --- vector quantisation through the clusterbook -----------------------------------------------------

def concept_index(x: Tensor, book: Tensor) -> Tensor:
    """Nearest concept by cosine: (..., C) tokens, (K, C) book -> (...) int64."""
    return (F.normalize(x, dim=-1) @ F.normalize(book, dim=1).t()).argmax(dim=-1)


def concept_masks(anchor_concepts: Tensor, other_concepts: Tensor, book: Tensor, pos_thresh: float,
                  neg_thresh: float) -> tuple[Tensor, Tensor]:
    """Which pairs are positive / negative through the clusterbook: (Na,), (No,) concept ids ->
    (Na, No) bool masks pos = cos(c_a, c_o) > pos_thresh, neg = cos(c_a, c_o) < neg_thresh
    ([code:CAUSE] ``contrastive_ema_with_codebook_bank``: distances between the anchor's and the other
    patch's *concept vectors*, not their features)."""
    bn = F.normalize(book, dim=1)
    sim = bn[anchor_concepts] @ bn[other_concepts].t()
    return sim > pos_thresh, sim < neg_thresh


def nce_rows(sim: Tensor, pos: Tensor, neg: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Per-anchor InfoNCE over chosen pairs: sim (Na, No) cosines, masks (Na, No) ->
    (sum over positives of −s_ap + log Σ_{o ∈ pos ∪ neg} exp(s_ao), number of positives), each (Na,),
    with s = sim / temperature (shifted by its row max for stability, which cancels)."""
    s = sim / temperature
    s = s - s.max(dim=1, keepdim=True).values.detach()
    denom = torch.log((s.exp() * (pos | neg)).sum(dim=1, keepdim=True))  # (Na, 1)
    losses = (denom - s) * pos
    return losses.sum(dim=1), pos.sum(dim=1)


def front_door_loss(concepts: Tensor, proj: Tensor, proj_ema: Tensor, book: Tensor, bank_ids: Tensor,
                    bank_proj: Tensor, config: CauseConfig) -> tuple[Tensor, dict]:
    """The concept-wise contrastive loss of one batch ([code:CAUSE] ``contrastive_ema_with_codebook_bank``).

    Args:
        concepts: (B, P) concept id of each (grid-sampled) token.
        proj: (B, P, E) student projections (gradient flows here only).
        proj_ema: (B, P, E) teacher projections (constants).
        book: (K, C) the clusterbook.
        bank_ids / bank_proj: (N,) concept ids and (N, E) teacher projections of the bank (N may be 0).
    Returns:
        (loss, stats): the mean over images of the in-batch term and, when the bank is not empty, of the
        bank term (2B terms then, as in the reference; images without a positive pair are left out).
    """
    b, p, _ = proj.shape
    anchors = F.normalize(proj, dim=2).reshape(b * p, -1)
    keys = F.normalize(proj_ema, dim=2).reshape(b * p, -1)
    flat = concepts.reshape(-1)
    pos, neg = concept_masks(flat, flat, book, config.pos_thresh, config.neg_thresh)
    pos = pos & ~torch.eye(b * p, dtype=torch.bool, device=pos.device)  # never the anchor with itself
    total, count = nce_rows(anchors @ keys.t(), pos, neg, config.temperature)
    terms = _image_means(total, count, b, p)
    n_pos = float(count.sum())
    if bank_ids.numel():
        bpos, bneg = concept_masks(flat, bank_ids, book, config.pos_thresh, config.neg_thresh)
        btotal, bcount = nce_rows(anchors @ F.normalize(bank_proj, dim=1).t(), bpos, bneg, config.temperature)
        terms = torch.cat([terms, _image_means(btotal, bcount, b, p)])
    if terms.numel() == 0:
        return proj.sum() * 0.0, {"positives": n_pos, "terms": 0.0}
    return terms.mean(), {"positives": n_pos, "terms": float(terms.numel())}


def _image_means(total: Tensor, count: Tensor, b: int, p: int) -> Tensor:
    """Per image: its anchors' summed losses over their positives' count; images with none left out."""
    t, c = total.reshape(b, p).sum(1), count.reshape(b, p).sum(1)
    keep = c > 0
    return t[keep] / c[keep]


@torch.no_grad()
def ema_update(student: nn.Module, teacher: nn.Module, decay: float) -> None:
    """teacher ← decay · teacher + (1 − decay) · student, parameter by parameter ([code:CAUSE] ``ema_update``)."""
    for s, t in zip(student.parameters(), teacher.parameters(), strict=True):
        t.mul_(decay).add_(s, alpha=1 - decay)


class ConceptBank:
    """Teacher projections per concept, at most ``size`` each, oldest dropped first ([code:CAUSE]
    ``bank_update`` / ``bank_compute``). :meth:`flat` lists them by concept then age (the reference's order)."""

    def __init__(self, size: int, keep: float) -> None:
        self.size, self.keep = size, keep
        self.entries: dict[int, Tensor] = {}

    def update(self, concepts: Tensor, proj_ema: Tensor, generator: torch.Generator) -> None:
        """Bank a random ``keep`` fraction of each concept's new projections: (B, P) ids, (B, P, E)."""
        flat, vals = concepts.reshape(-1), proj_ema.reshape(-1, proj_ema.shape[-1]).detach()
        for c in torch.unique(flat).tolist():  # ascending, as torch.unique in the reference
            new = vals[flat == c]
            new = new[torch.randperm(len(new), generator=generator).to(new.device)][:int(len(new) * self.keep)]
            old = self.entries.get(c)
            merged = new if old is None else torch.cat([old, new])
            self.entries[c] = merged[max(0, len(merged) - self.size):]

    def flat(self, width: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """(N,) concept ids and (N, E) projections, concepts ascending, each oldest first."""
        keys = sorted(c for c, v in self.entries.items() if len(v))
        if not keys:
            return torch.zeros(0, dtype=torch.long, device=device), torch.zeros(0, width, device=device)
        ids = torch.cat([torch.full((len(self.entries[c]),), c, dtype=torch.long) for c in keys]).to(device)
        return ids, torch.cat([self.entries[c] for c in keys])

    def state(self) -> dict:
        ids, vals = self.flat(0, torch.device("cpu")) if self.entries else (torch.zeros(0, dtype=torch.long),
                                                                            torch.zeros(0, 0))
        return {"bank_ids": ids.cpu(), "bank_proj": vals.cpu()}

    def load_state(self, state: dict, device: torch.device) -> None:
        ids, vals = state["bank_ids"], state["bank_proj"].to(device)
        self.entries = {int(c): vals[ids == c] for c in torch.unique(ids).tolist()}


# --- the heads ---------------------------------------------------------------------------------------

class MlpHead(nn.Module):
    """CAUSE-MLP's head: linear + (1x1 conv, ReLU, 1x1 conv) on the tokens ([code:CAUSE] ``HeadSegment``)."""

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.f1 = nn.Conv2d(in_dim, dim, 1)
        self.f2 = nn.Sequential(nn.Conv2d(in_dim, in_dim, 1), nn.ReLU(), nn.Conv2d(in_dim, dim, 1))

    def forward(self, x: Tensor, hw: tuple[int, int], drop: nn.Module) -> Tensor:
        """(B, P, C) tokens on an (h, w) grid -> (B, P, D)."""
        g = untokens(x, hw)
        return tokens(self.f1(drop(g)) + self.f2(drop(g)))


class TrHead(nn.Module):
    """CAUSE-TR's head ([code:CAUSE] ``Decoder`` + ``TRDecoder``): the tokens' concept vectors are the queries
    (self-attention, then cross-attention to the tokens, feed-forward, post-norm), added back to the tokens,
    then projected like the MLP head. ``query_pos`` holds one learned position per training token."""

    def __init__(self, in_dim: int, dim: int, hw: tuple[int, int], hidden: int, heads: int,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.hw = tuple(int(v) for v in hw)
        self.query_pos = nn.Parameter(torch.randn(self.hw[0] * self.hw[1], in_dim))
        self.self_attn = nn.MultiheadAttention(in_dim, heads, dropout=dropout)
        self.cross_attn = nn.MultiheadAttention(in_dim, heads, dropout=dropout)
        self.linear1, self.linear2 = nn.Linear(in_dim, hidden), nn.Linear(hidden, in_dim)
        self.dropout, self.dropout1, self.dropout2, self.dropout3 = (nn.Dropout(dropout) for _ in range(4))
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(in_dim), nn.LayerNorm(in_dim), nn.LayerNorm(in_dim)
        self.out = MlpHead(in_dim, dim)
        self.register_buffer("book", torch.zeros(0, in_dim), persistent=True)

    def set_book(self, book: Tensor) -> None:
        self.book = book.detach().clone().to(self.query_pos.device)

    def positions(self, hw: tuple[int, int]) -> Tensor:
        """(h*w, C) query positions for an (h, w) grid: the trained ones, resized bilinearly if needed."""
        if tuple(hw) == self.hw:
            return self.query_pos
        grid = self.query_pos.t().reshape(1, -1, *self.hw)
        return F.interpolate(grid, size=tuple(hw), mode="bilinear", align_corners=False)[0].flatten(1).t()

    def forward(self, x: Tensor, hw: tuple[int, int], drop: nn.Module) -> Tensor:
        """(B, P, C) tokens -> (B, P, D)."""
        query = self.book[concept_index(x, self.book)]  # (B, P, C) the tokens' concepts
        tgt, mem = query.transpose(0, 1), x.transpose(0, 1)  # (P, B, C) sequence-first
        pos = self.positions(hw).unsqueeze(1)  # (P, 1, C)
        q = k = tgt + pos
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(q, k, value=tgt)[0]))
        tgt = self.norm2(tgt + self.dropout2(self.cross_attn(query=tgt + pos, key=mem, value=mem)[0]))
        tgt = self.norm3(tgt + self.dropout3(self.linear2(self.dropout(F.relu(self.linear1(tgt))))))
        return self.out((mem + tgt).transpose(0, 1), hw, drop)


def build_head(variant: str, in_dim: int, config: CauseConfig, hw: tuple[int, int]) -> nn.Module:
    if variant == "mlp":
        return MlpHead(in_dim, config.dim)
    if variant == "tr":
        return TrHead(in_dim, config.dim, hw, config.tr_hidden, config.tr_heads)
    raise ConfigError(f"CAUSE variant must be one of {VARIANTS}, got {variant!r}")


class Projection(nn.Module):
    """1x1 conv D -> E on tokens ([code:CAUSE] ``ProjectionSegment``)."""

    def __init__(self, dim: int, out: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, out, 1)

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        return tokens(self.conv(untokens(x, hw)))


class CauseTrained(TrainedHead):
    """The teacher head (CAUSE evaluates the EMA head) and the modularity-fitted cluster probe."""

    clusterer = "cluster-probe"

    def __init__(self, variant: str, in_dim: int, config: CauseConfig, n_classes: int,
                 hw: tuple[int, int]) -> None:
        super().__init__(in_dim, config.dim, n_classes)
        self.method, self.variant, self.alpha = f"cause-{variant}", variant, config.crf_alpha
        self.head = build_head(variant, in_dim, config, hw)
        self.probe = nn.Parameter(torch.zeros(n_classes, config.dim))

    def codes(self, feats: Tensor) -> Tensor:
        hw = tuple(feats.shape[-2:])
        return untokens(self.head(tokens(feats), hw, nn.Identity()), hw)

    def cosine(self, codes: Tensor) -> Tensor:
        return torch.einsum("bdhw,kd->bkhw", F.normalize(codes, dim=1), F.normalize(self.probe, dim=1))

    def cluster_logits(self, codes: Tensor) -> Tensor:
        """log softmax(alpha · cos) ([code:CAUSE] ``forward_centroid(crf=True)``, alpha 3): the CRF unary."""
        return torch.log_softmax(self.alpha * self.cosine(codes), dim=1)

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> "CauseTrained":
        config = CauseConfig(**ckpt["config"]["cause"])
        head = cls(ckpt["variant"], int(ckpt["in_dim"]), config, int(ckpt["n_classes"]), tuple(ckpt["grid_hw"]))
        if ckpt["variant"] == "tr":
            head.head.set_book(ckpt["head"]["book"])
        head.head.load_state_dict(ckpt["head"])
        with torch.no_grad():
            head.probe.copy_(ckpt["probe"])
        return head


def n_grid_tokens(hw: tuple[int, int], k: int) -> int:
    return (hw[0] // k) * (hw[1] // k) if k > 1 else hw[0] * hw[1]


def check_grid(hw: tuple[int, int], k: int, what: str) -> None:
    if k > 1 and (hw[0] < k or hw[1] < k):
        raise ConfigError(f"{what}: grid sampling {k}x{k} needs feature maps of at least {k}x{k}, got "
                          f"{hw[0]}x{hw[1]}; set {what}.grid=1")


def feature_cell_box(view: dict, image_hw: tuple[int, int], grid_hw: tuple[int, int], crop: int, y: int, x: int
                     ) -> tuple[float, float, float, float]:
    """``(top, left, height, width)`` in the original image of feature cell (y, x) of crop ``crop`` of a
    training view (``five_crop``: crop 0..4 of ``usseg_core.crops.five_crop_boxes``; other views: 0)."""
    from usseg_core.crops import five_crop_boxes
    from usseg_core.gallery import cell_box

    if view["policy"] != "five_crop":
        return cell_box(view, image_hw, grid_hw, y, x)
    top, left, ch, cw = five_crop_boxes(*image_hw, float(view.get("crop_ratio", 0.5)))[crop]
    if view.get("crop_resize", "short_side") == "short_side":
        inner = cell_box({"policy": "center_crop", "resolution": view["resolution"]}, (ch, cw), grid_hw, y, x)
    else:
        inner = cell_box({"policy": "full"}, (ch, cw), grid_hw, y, x)
    return top + inner[0], left + inner[1], inner[2], inner[3]


def concept_cells(book: np.ndarray, features, n_concepts: int, per_concept: int, max_items: int = 200,
                  batch: int = 32) -> tuple[np.ndarray, dict[int, list[tuple[float, int, int, int]]]]:
    """The most used concepts and, for each, its closest tokens, on at most ``max_items`` items spread evenly
    over ``features`` (a picture, not a statistic of every item: one pass, a bounded cost).

    Returns:
        (usage (K,) tokens nearest each concept in the sample, {concept: [(cosine, item, y, x), ...]} for the
        ``n_concepts`` most used ones, best first, one token per item first).
    """
    bt = F.normalize(torch.from_numpy(np.asarray(book, dtype=np.float32)), dim=1)
    items = np.unique(np.linspace(0, len(features) - 1, min(max_items, len(features))).round().astype(int))
    assign, score = [], []
    for i0 in range(0, len(items), batch):
        idx = items[i0:i0 + batch]
        x = torch.from_numpy(np.stack([np.asarray(features[i], dtype=np.float32) for i in idx]))
        sim = F.normalize(tokens(x), dim=2) @ bt.t()  # (B, P, K)
        s, a = sim.max(dim=2)
        assign.append(a)
        score.append(s)
    hw = tuple(np.asarray(features[int(items[0])]).shape[-2:])
    a, s = torch.cat(assign), torch.cat(score)  # (n, P)
    usage = torch.bincount(a.reshape(-1), minlength=len(bt)).numpy()
    shown = [int(c) for c in np.argsort(-usage, kind="stable")[:n_concepts] if usage[c] > 0]
    cells: dict[int, list] = {}
    for c in shown:
        masked = torch.where(a == c, s, torch.full_like(s, -2.0))
        val, pos = masked.max(dim=1)  # each item's best token of the concept
        found = [(float(val[j]), int(items[j]), int(pos[j]) // hw[1], int(pos[j]) % hw[1])
                 for j in torch.nonzero(val > -2).flatten().tolist()]
        cells[c] = sorted(found, reverse=True)[:per_concept]
    return usage, cells
