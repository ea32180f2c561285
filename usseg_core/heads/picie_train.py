"""PiCIE training on the view bank: a per-epoch clustering pass and a training step on the shared loop.

Everything that makes an epoch (the view pairing, both views' centroids, pseudo-labels and weights) is
method state, checkpointed with the loop's: a run interrupted mid-epoch resumes bit-identically.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from usseg_core.backbones.base import resolve_device
from usseg_core.cluster import spherical_kmeans
from usseg_core.errors import ConfigError
from usseg_core.heads.picie import (PicieConfig, PicieHead, cluster_weights, over_clustering_weights,
                                    picie_loss)
from usseg_core.heads.bank_training import BankMethod
from usseg_core.heads.registry import HeadInputs, TrainedState, config_to_dict
from usseg_core.trainer import RESUMABLE_FIELDS, load_checkpoint, run_training
from usseg_core.viewbank import warp_maps

PICIE_RESUMABLE = RESUMABLE_FIELDS | {"epochs"}
_CLUSTER_BATCH = 32  # images per forward in the clustering pass


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
        return {**super().state(), "pairs": torch.from_numpy(self.pairs), "clusterings": self.clusterings}

    def load_state(self, state: dict) -> None:
        super().load_state(state)
        self.pairs = state["pairs"].numpy().copy()
        self.clusterings = list(state["clusterings"])

    # --- the two views ---------------------------------------------------------------------------------
    def _views(self, idx: np.ndarray, train: bool) -> tuple[Tensor, Tensor]:
        """Unit codes (B, D, h, w) of view 1 = f(G_a P_a x) and view 2 = G_a(f(P_b x)) for images ``idx``."""
        a, b = self.pairs[idx, 0], self.pairs[idx, 1]
        f1 = self.bank.batch("warped", idx, a).to(self.device)  # (B, C, h, w)
        f2 = self.bank.batch("plain", idx, b).to(self.device)
        embed = self.head.embed if train else self.head.codes
        z1 = embed(f1)  # (B, D, h, w)
        # Equivariance: view 2 is embedded on the whole frame, then its *code map* is warped by G_a.
        z2 = warp_maps(embed(f2), self.bank.geometries(idx, a), out_size=tuple(z1.shape[-2:]))
        return z1, F.normalize(z2, dim=1)

    def _codes(self, view: int) -> Iterator[tuple[np.ndarray, Tensor]]:
        with torch.no_grad():
            for start in range(0, self.bank.n, _CLUSTER_BATCH):
                idx = np.arange(start, min(start + _CLUSTER_BATCH, self.bank.n))
                yield idx, self._views(idx, train=False)[view - 1]

    # --- the clustering pass ---------------------------------------------------------------------------
    def begin_epoch(self, epoch: int) -> dict:
        """New view pairs, then k-means on each view separately and the epoch's fixed pseudo-labels."""
        n, v = self.bank.n, self.bank.n_views
        a = self.rng.integers(0, v, size=n)
        b = (a + self.rng.integers(1, v, size=n)) % v  # a different view: P² ≠ P¹
        self.pairs = np.stack([a, b], axis=1).astype(np.int64)
        self.head.eval()
        stats: dict[str, float] = {}
        self.clusterings = []
        for ci, (k, lam) in enumerate(zip(self.ks, self.lams)):
            c: dict = {"lam": float(lam), "k": int(k)}
            for view in (1, 2):
                def pixels() -> Iterator[np.ndarray]:
                    for _, z in self._codes(view):
                        yield z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).float().cpu().numpy()  # (B*h*w, D)

                seed = int(self.config.seed * 100_003 + epoch * 101 + ci * 11 + view)
                mu = torch.from_numpy(spherical_kmeans(pixels, k, n_epochs=self.config.kmeans_epochs,
                                                       init_samples=self.config.kmeans_samples,
                                                       n_init_iter=self.config.kmeans_iters, seed=seed,
                                                       device=self.device.type))
                labels, counts, fit = self._assign(view, mu)
                c[f"mu{view}"], c[f"y{view}"] = mu, labels
                c[f"w{view}"] = cluster_weights(counts, self.config.balance)
                tag = f"{k}_v{view}"
                stats[f"kmeans_used_{tag}"] = float((counts > 0).sum())
                stats[f"kmeans_largest_{tag}"] = float(counts.max() / counts.sum())
                stats[f"kmeans_cos_{tag}"] = fit
            self.clusterings.append(c)
        self.head.train()
        return stats

    def _assign(self, view: int, mu: Tensor) -> tuple[Tensor, Tensor, float]:
        """Pseudo-labels (N, h, w) int16, cluster pixel counts (K,), mean cosine to the assigned centroid."""
        labels = torch.empty((self.bank.n, *self.bank.shape[1:]), dtype=torch.int16)
        counts = torch.zeros(mu.shape[0], dtype=torch.float64)
        cos_sum, n_pix = 0.0, 0
        centres = F.normalize(mu.to(self.device), dim=1)
        for idx, z in self._codes(view):
            best, lab = torch.einsum("bdhw,kd->bkhw", z, centres).max(dim=1)  # (B, h, w)
            labels[torch.from_numpy(idx)] = lab.to(torch.int16).cpu()
            counts += torch.bincount(lab.flatten().cpu(), minlength=mu.shape[0]).double()
            cos_sum, n_pix = cos_sum + float(best.sum()), n_pix + best.numel()
        return labels, counts, cos_sum / max(n_pix, 1)

    # --- the training step -----------------------------------------------------------------------------
    def step(self) -> dict:
        idx = np.sort(self.epochs.next_batch(self.batch_size))  # (B,)
        z1, z2 = self._views(idx, train=True)
        t = torch.from_numpy(idx)
        batch = [{**{k: c[k].to(self.device) for k in ("mu1", "mu2", "w1", "w2")}, "lam": c["lam"],
                  "y1": c["y1"][t].long().to(self.device), "y2": c["y2"][t].long().to(self.device)}
                 for c in self.clusterings]
        loss, stats = picie_loss(z1, z2, batch)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return {"loss": float(loss.detach()), **stats}


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
