"""PiCIE training on the view bank: a per-epoch clustering pass and a training step on the shared loop.

Everything that makes an epoch (the view pairing, both views' centroids, pseudo-labels and weights) is
method state, checkpointed with the loop's: a run interrupted mid-epoch resumes bit-identically. The view
pairing is drawn with the batch order, by the planner (``usseg_core.trainer``): at an epoch's first step the
pairs (a, b), then the epoch's order, the same draws in the same order as one generator always made them.
The image order of ``kmeans="reference"`` ([code:PiCIE]'s one shuffle per epoch) is a function of the seed
and the epoch, drawn from a generator of its own: nothing to checkpoint, and the plan's draws unchanged.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from usseg_core.cluster import reference_kmeans, spherical_kmeans
from usseg_core.errors import ConfigError
from usseg_core.features import prefetch_iter
from usseg_core.heads.picie import (PicieConfig, PicieHead, cluster_weights, over_clustering_weights,
                                    picie_loss, pseudo_labels)
from usseg_core.heads.bank_training import BankMethod
from usseg_core.heads.registry import HeadInputs, TrainedState, config_to_dict
from usseg_core.device import pinned, resolve_device, to_device
from usseg_core.trainer import RESUMABLE_FIELDS, load_checkpoint, run_training
from usseg_core.viewbank import warp_maps

PICIE_RESUMABLE = RESUMABLE_FIELDS | {"epochs"}
_CLUSTER_BATCH = 32  # images per forward in the clustering pass
_ORDER_STREAM = 0x9C1E  # tags the generator of the "reference" k-means image order (apart from the plan's)


def warp_view2(z: Tensor, geoms: list, out_hw, normalise: str) -> Tensor:
    """View 2's raw head output (B, D, h, w) warped by G onto view 1's grid -> (B, D, *out_hw), unit per pixel.

    "before-and-after-warp" (ours): normalised, warped, normalised again (bilinear blends shorten unit
    codes); "after-warp" ([code:PiCIE]): warped raw, then normalised, so a longer code weighs more in a blend.
    """
    if normalise == "before-and-after-warp":
        z = F.normalize(z, dim=1)
    return F.normalize(warp_maps(z, geoms, out_size=tuple(out_hw)), dim=1)


class PiciePlan(NamedTuple):
    """What one PiCIE step reads: images, view 1 = warped ``a``, view 2 = plain ``b`` of each."""

    idx: np.ndarray  # (B,) sorted images
    a: np.ndarray  # (B,) view of view 1 (its geometry G_a also warps view 2's codes)
    b: np.ndarray  # (B,) view of view 2, != a
    pairs: np.ndarray  # (N, 2) the epoch's (a, b) of every image (the clustering pass reads them)


class PicieMethod(BankMethod):
    """PiCIE's alternation on cached view features (see ``usseg_core.heads.picie``)."""

    name = "picie"

    def __init__(self, banks: Sequence, n_classes: int, config: PicieConfig, device: torch.device) -> None:
        self.init_bank(banks, config, device, "PiCIE")
        self.ks = [n_classes] + ([config.k_over] if config.over_clustering else [])
        self.lams = list(over_clustering_weights(*self.ks)) if len(self.ks) == 2 else [1.0]
        torch.manual_seed(config.seed)  # initialisation (and dropout, if any) draw from the global RNG
        self.head = PicieHead(self.bank.shape[0], config.dim, config.dropout).to(device)
        self.opt = torch.optim.Adam(self.head.parameters(), lr=config.lr, betas=(0.9, 0.999))
        self.init_order()  # its generator also draws the view pairing
        self.pairs = np.zeros((self.bank.n, 2), dtype=np.int64)  # (a, b): view 1 = warped a, view 2 = plain b
        self.clusterings: list[dict] = []  # per K: mu1, mu2 (K, D); y1, y2 (N, h, w) int16; w1, w2 (K,)

    # --- state -----------------------------------------------------------------------------------------
    def modules(self):
        return {"head": self.head}

    def optimisers(self):
        return [self.opt]

    def state(self) -> dict:
        return {"clusterings": self.clusterings}

    def load_state(self, state: dict) -> None:
        self.clusterings = list(state["clusterings"])

    def plan_state(self) -> dict:
        return {**super().plan_state(), "pairs": torch.from_numpy(self.pairs)}

    def load_plan_state(self, state: dict) -> None:
        super().load_plan_state(state)
        self.pairs = state["pairs"].numpy().copy()

    # --- the plan: view pairs at the start of an epoch, then its batches -------------------------------
    def plan(self, step: int) -> PiciePlan:
        if step % self.steps_per_epoch == 0:  # new view pairs: a replaced array, never changed in place
            n, v = self.bank.n, self.bank.n_views
            a = self.rng.integers(0, v, size=n)
            b = (a + self.rng.integers(1, v, size=n)) % v  # a different view: P² ≠ P¹
            self.pairs = np.stack([a, b], axis=1).astype(np.int64)
        idx = self.next_images()  # (B,)
        return PiciePlan(idx, self.pairs[idx, 0], self.pairs[idx, 1], self.pairs)

    def read(self, plan: PiciePlan) -> tuple[Tensor, Tensor]:
        """Warped view ``a`` and plain view ``b`` features of the plan's images: (B, C, h, w) each."""
        return (pinned(self.bank.batch("warped", plan.idx, plan.a), self.device),
                pinned(self.bank.batch("plain", plan.idx, plan.b), self.device))

    # --- the two views ---------------------------------------------------------------------------------
    def _view1(self, f1: Tensor, train: bool) -> Tensor:
        """Unit codes (B, D, h, w) of view 1 = f(G_a P_a x) from its features (B, C, h, w)."""
        return (self.head.embed if train else self.head.codes)(to_device(f1, self.device))

    def _view2(self, f2: Tensor, idx: np.ndarray, a: np.ndarray, train: bool, out_hw) -> Tensor:
        """Unit codes of view 2 = G_a(f(P_b x)): embedded on the whole frame, then its *code map* warped by G_a."""
        z2 = (self.head.embed if train else self.head.codes)(to_device(f2, self.device), unit=False)
        return warp_view2(z2, self.bank.geometries(idx, a), out_hw, self.config.normalise)

    def _codes(self, view: int, pairs: np.ndarray,
               images: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, Tensor]]:
        """Eval codes of one view of ``images`` (default every image), in batches (read one batch ahead)."""
        images = np.arange(self.bank.n) if images is None else np.asarray(images)

        def batches() -> Iterator[tuple[np.ndarray, Tensor]]:
            for start in range(0, len(images), _CLUSTER_BATCH):
                idx = np.sort(images[start:start + _CLUSTER_BATCH])
                kind, v = ("warped", pairs[idx, 0]) if view == 1 else ("plain", pairs[idx, 1])
                yield idx, self.bank.batch(kind, idx, v)

        with torch.no_grad():
            for idx, f in prefetch_iter(batches()):
                if view == 1:
                    yield idx, self._view1(f, train=False)
                else:
                    yield idx, self._view2(f, idx, pairs[idx, 0], train=False, out_hw=self.bank.shape[1:])

    # --- the clustering pass ---------------------------------------------------------------------------
    def begin_epoch(self, epoch: int, plan: PiciePlan) -> dict:
        """k-means on each view separately (the epoch's view pairs, ``plan.pairs``) and the epoch's fixed
        pseudo-labels."""
        pairs = plan.pairs
        # [code:PiCIE]'s one image order per epoch, both views alike; its own generator, so that the plan's
        # draws (and with them every run on the default k-means) are unchanged
        order = np.random.default_rng([self.config.seed, epoch, _ORDER_STREAM]).permutation(self.bank.n)
        self.head.eval()
        stats: dict[str, float] = {}
        self.clusterings = []
        for ci, (k, lam) in enumerate(zip(self.ks, self.lams)):
            c: dict = {"lam": float(lam), "k": int(k)}
            for view in (1, 2):
                def pixels() -> Iterator[Tensor]:  # on the device: k-means takes them where they are
                    for _, z in self._codes(view, pairs):
                        yield z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).float()  # (B*h*w, D)

                seed = int(self.config.seed * 100_003 + epoch * 101 + ci * 11 + view)
                if self.config.kmeans == "reference":
                    mu = self._reference_kmeans(view, pairs, k, seed, order)
                else:
                    mu = torch.from_numpy(spherical_kmeans(pixels, k, n_epochs=self.config.kmeans_epochs,
                                                           init_samples=self.config.kmeans_samples,
                                                           n_init_iter=self.config.kmeans_iters, seed=seed,
                                                           device=str(self.device)))
                labels, counts, fit = self._assign(view, mu, pairs)
                c[f"mu{view}"], c[f"y{view}"] = mu, labels
                c[f"w{view}"] = cluster_weights(counts, self.config.balance)
                tag = f"{k}_v{view}"
                stats[f"kmeans_used_{tag}"] = float((counts > 0).sum())
                stats[f"kmeans_largest_{tag}"] = float(counts.max() / counts.sum())
                stats[f"kmeans_cos_{tag}"] = fit
            self.clusterings.append(c)
        self.head.train()
        return stats

    def _pixels(self, view: int, pairs: np.ndarray, images: np.ndarray) -> Tensor:
        """Every pixel code (n · h · w, D) of one view of ``images``, on the device."""
        return torch.cat([z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).float()
                          for _, z in self._codes(view, pairs, images)])

    def _reference_kmeans(self, view: int, pairs: np.ndarray, k: int, seed: int, order: np.ndarray) -> Tensor:
        """[code:PiCIE]'s k-means of one view: init on every pixel of the first ``kmeans_init_images`` images
        of ``order``, then one running-mean update per group of ``kmeans_update_images`` of the rest
        (``usseg_core.cluster.reference_kmeans``). Raw centroids (K, D) on the CPU."""
        n_init, group = self.config.kmeans_init_images, self.config.kmeans_update_images
        rest = order[n_init:]
        groups = (self._pixels(view, pairs, rest[s:s + group]) for s in range(0, len(rest), group))
        mu, _ = reference_kmeans(self._pixels(view, pairs, order[:n_init]), groups, k,
                                 n_iter=self.config.kmeans_iters, seed=seed)
        return mu.float().cpu()

    def _assign(self, view: int, mu: Tensor, pairs: np.ndarray) -> tuple[Tensor, Tensor, float]:
        """Pseudo-labels (N, h, w) int16 (nearest centroid, ``pseudo_labels``), cluster pixel counts (K,),
        mean cosine to the assigned centroid."""
        labels = torch.empty((self.bank.n, *self.bank.shape[1:]), dtype=torch.int16)
        counts = torch.zeros(mu.shape[0], dtype=torch.float64)
        cos_sum, n_pix = 0.0, 0
        mu = mu.to(self.device)
        centres = F.normalize(mu, dim=1)
        for idx, z in self._codes(view, pairs):
            lab = pseudo_labels(z, mu, self.config.centroids)  # (B, h, w)
            best = torch.einsum("bdhw,kd->bkhw", z, centres).gather(1, lab[:, None])[:, 0]  # (B, h, w)
            labels[torch.from_numpy(idx)] = lab.to(torch.int16).cpu()
            counts += torch.bincount(lab.flatten().cpu(), minlength=mu.shape[0]).double()
            cos_sum, n_pix = cos_sum + float(best.sum()), n_pix + best.numel()
        return labels, counts, cos_sum / max(n_pix, 1)

    # --- the training step -----------------------------------------------------------------------------
    def step(self, plan: PiciePlan, batch: tuple[Tensor, Tensor]) -> dict:
        z1 = self._view1(batch[0], train=True)  # (B, D, h, w)
        z2 = self._view2(batch[1], plan.idx, plan.a, train=True, out_hw=z1.shape[-2:])
        t = torch.from_numpy(plan.idx)
        labels = [{**{k: c[k].to(self.device) for k in ("mu1", "mu2", "w1", "w2")}, "lam": c["lam"],
                   "y1": to_device(c["y1"][t], self.device).long(), "y2": to_device(c["y2"][t], self.device).long()}
                  for c in self.clusterings]
        loss, stats = picie_loss(z1, z2, labels, self.config.centroids)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return {"loss": loss.detach(), **stats}


def train_picie_head(inputs: HeadInputs, config: dict, *, checkpoint_path=None, device: str = "auto",
                     progress: bool = True, on_step=None) -> TrainedState:
    """Train PiCIE on ``inputs.views`` (a list of view banks); registry entry point."""
    cfg: PicieConfig = config["picie"]
    if inputs.views is None:
        raise ConfigError("PiCIE trains on the view bank; the pipeline gave it none")
    dev = resolve_device(device)
    method = PicieMethod(inputs.views, inputs.n_classes, cfg, dev)
    plain = config_to_dict(config)
    ckpt = load_checkpoint(checkpoint_path, plain, method=method.name, resumable=PICIE_RESUMABLE)
    loop = run_training(method, plain, steps=cfg.epochs * method.steps_per_epoch,
                        checkpoint_every=cfg.checkpoint_every, log_every=cfg.log_every,
                        checkpoint_path=checkpoint_path, checkpoint=ckpt, progress=progress, on_step=on_step)
    first = method.clusterings[0]
    payload = {"in_dim": int(method.bank.shape[0]), "code_dim": cfg.dim, "head": loop.states["head"],
               "centroids": first["mu1"].float().cpu()}
    if len(method.clusterings) > 1:
        payload["centroids_over"] = method.clusterings[1]["mu1"].float().cpu()
    meta = {"steps_per_epoch": method.steps_per_epoch, "n_images": method.bank.n, "n_views": method.bank.n_views,
            "k": method.ks, "lambdas": method.lams}
    epochs = [h for h in loop.history if "epoch" in h]
    if loop.seconds_per_step:
        meta["seconds_per_epoch"] = loop.seconds_per_step * method.steps_per_epoch
    meta["epoch_stats"] = epochs[-3:]
    return TrainedState(payload=payload, meta=meta, steps_done=loop.steps_done,
                        seconds_per_step=loop.seconds_per_step, history=loop.history)
