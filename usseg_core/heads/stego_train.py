"""Resumable training of a STEGO head (plus its cluster probe and an optional aux loss) on cached features.

No backbone runs here: ``features[i]`` is a cached (C, h, w) map (docs/methods/protocol.md §5 S2). Everything random is
seeded from ``config.seed`` and checkpointed (model and optimiser states, the global torch RNG that drives
dropout, the CPU generator that draws sample points and derangements, the numpy generator and the current
epoch order), so an interrupted run resumed from its checkpoint ends bit-identical to an uninterrupted one.

The numpy generator and the epoch order only *plan* batches (which items, which KNN positive): they run
ahead of the step in the loop's prefetcher, and a checkpoint stores them as of the last step computed
(``usseg_core.trainer``). Features held in memory or streamed from Zarr give the same batches.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from usseg_core.device import resolve_device, to_device
from usseg_core.errors import ConfigError
from usseg_core.heads.probes import ClusterProbe
from usseg_core.heads.stego import StegoConfig, StegoHead, StegoLoss
from usseg_core.heads.stego_shifts import choose_shifts, measure_correlations
from usseg_core.trainer import EpochOrder, TrainingMethod, load_checkpoint, read_host_batch, run_training


@dataclass
class TrainResult:
    """What a training run produced; everything JSON-able except the state dicts (tensors)."""

    head_state: dict  # StegoHead state_dict (build with StegoHead(in_dim, config["dim"]))
    cluster_state: dict  # ClusterProbe state_dict (n_clusters = n_classes)
    config: dict  # StegoConfig.to_dict()
    shifts: tuple[float, float, float]  # (self, knn, random) shifts actually used
    correlation_stats: dict | None  # measure_correlations() summary when shifts were "auto"
    history: list[dict]  # one entry per logging step: losses, feature/code correlation per term
    steps_done: int
    aux_state: dict | None = None  # state_dict of the aux module, if one was trained
    in_dim: int = 0  # feature channels C the head expects
    seconds_per_step: float | None = None  # wall time per step of this call (None if no step ran)


def _validate(features: Sequence, knn: np.ndarray, config: StegoConfig) -> tuple[int, int]:
    n = len(features)
    if n < 2:
        raise ConfigError(f"train_stego: need at least 2 feature maps, got {n}")
    first = np.asarray(features[0])
    if first.ndim != 3:
        raise ConfigError(f"train_stego: features[i] must be (C, h, w), got shape {first.shape}")
    knn = np.asarray(knn)
    if knn.ndim != 2 or knn.shape[0] != n or knn.shape[1] < config.num_neighbors + 1:
        raise ConfigError(f"train_stego: knn must be (N={n}, >= num_neighbors + 1 = {config.num_neighbors + 1})"
                          f" with column 0 = self, got shape {knn.shape}")
    if not np.issubdtype(knn.dtype, np.integer) or knn.min() < 0 or knn.max() >= n:
        raise ConfigError(f"train_stego: knn must hold integer indices in [0, {n}), got dtype {knn.dtype}, "
                          f"range [{knn.min()}, {knn.max()}]")
    return n, int(first.shape[0])


class StegoPlan(NamedTuple):
    """What one STEGO step reads: its images and their KNN positives."""

    idx: np.ndarray  # (B,) items of the batch
    pos: np.ndarray  # (B,) one KNN neighbour of each (rank 1..num_neighbors, never self)


class StegoMethod(TrainingMethod):
    """STEGO head + cluster probe (+ an optional aux loss such as OMH's) as a :class:`TrainingMethod`."""

    name = "stego"

    def __init__(self, features: Sequence, knn: np.ndarray, n_classes: int, config: StegoConfig, shifts,
                 device: torch.device, aux: nn.Module | None) -> None:
        self.features, self.knn, self.config, self.device = features, np.asarray(knn), config, device
        self.item_shape = tuple(np.asarray(features[0]).shape)  # (C, h, w)
        in_dim = self.item_shape[0]
        torch.manual_seed(config.seed)  # initialisation and dropout draw from the global torch RNG
        self.head = StegoHead(in_dim, config.dim, config.dropout).to(device)
        self.cluster = ClusterProbe(config.dim, n_classes).to(device)
        self.aux = aux.to(device) if aux is not None else None
        self.loss_fn = StegoLoss.from_config(config, shifts)
        self.opt_head = torch.optim.Adam(self.head.parameters(), lr=config.lr)
        self.opt_cluster = torch.optim.Adam(self.cluster.parameters(), lr=config.probe_lr)
        aux_params = list(self.aux.parameters()) if self.aux is not None else []
        self.opt_aux = torch.optim.Adam(aux_params, lr=config.probe_lr) if aux_params else None
        self.sampler = torch.Generator().manual_seed(config.seed)  # loss sample points + derangements
        self.rng = np.random.default_rng(config.seed)  # plans: epoch orders + KNN rank picks
        self.epochs = EpochOrder(len(features), self.rng)

    def modules(self) -> dict[str, nn.Module]:
        mods = {"head": self.head, "cluster": self.cluster}
        if self.aux is not None:
            mods["aux"] = self.aux
        return mods

    def optimisers(self) -> list[torch.optim.Optimizer]:
        return [o for o in (self.opt_head, self.opt_cluster, self.opt_aux) if o is not None]

    def state(self) -> dict:
        return {"sampler": self.sampler.get_state()}

    def load_state(self, state: dict) -> None:
        self.sampler.set_state(state["sampler"])

    def plan_state(self) -> dict:
        return {"numpy_rng": self.rng.bit_generator.state, **self.epochs.state()}

    def load_plan_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state["numpy_rng"]
        self.epochs.load_state(state)

    def plan(self, step: int) -> StegoPlan:
        idx = self.epochs.next_batch(self.config.batch_size)  # (B,)
        ranks = self.rng.integers(1, self.config.num_neighbors + 1, size=len(idx))  # KNN rank 1..k, never self
        return StegoPlan(idx, self.knn[idx, ranks])

    def read(self, plan: StegoPlan) -> torch.Tensor:
        """Images then positives, one read: (2B, C, h, w) float32 on the host."""
        return read_host_batch(self.features, np.concatenate([plan.idx, plan.pos]), self.item_shape,
                               self.device)

    def step(self, plan: StegoPlan, batch: torch.Tensor) -> dict:
        """One optimisation step of head, cluster probe and aux; returns detached 0-d tensor stats."""
        both = to_device(batch, self.device)  # (2B, C, h, w)
        feats, feats_pos = both[:len(plan.idx)], both[len(plan.idx):]  # (B, C, h, w) each

        self.head.train()
        dropped, codes = self.head(feats)  # (B, C, h, w), (B, D, h, w)
        dropped_pos, codes_pos = self.head(feats_pos)
        stego_loss, stats = self.loss_fn(dropped, dropped_pos, codes, codes_pos, generator=self.sampler)
        # The probe sees detached codes: it must not shape the head ([code:STEGO]).
        cluster_loss, _ = self.cluster(codes.detach())
        total = stego_loss + cluster_loss
        out = {"loss": stego_loss, "cluster_loss": cluster_loss}
        if self.aux is not None:
            aux_loss, aux_stats = self.aux(codes)  # undetached: OMH shapes the codes
            total = total + aux_loss
            out["aux_loss"] = aux_loss
            out.update({f"aux_{k}": v for k, v in aux_stats.items()})

        for opt in self.optimisers():
            opt.zero_grad(set_to_none=True)
        total.backward()
        for opt in self.optimisers():
            opt.step()
        out.update(stats)
        return {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in out.items()}


def train_stego(features: Sequence, knn: np.ndarray, n_classes: int, config: StegoConfig, *,
                checkpoint_path: Path | None = None, device: str = "auto", progress: bool = True,
                aux: nn.Module | None = None, on_step: Callable[[int, dict], None] | None = None) -> TrainResult:
    """Train a STEGO head, its cluster probe and an optional aux loss on cached features (fp32).

    Args:
        features: indexable of length N, ``features[i]`` -> (C, h, w) array (float16 ok); e.g. a Zarr array.
        knn: (N, k) int neighbour table, column 0 = self; positives drawn uniformly from columns
            1..config.num_neighbors (docs/methods/stego.md §3.1).
        n_classes: number of cluster-probe centroids.
        config: StegoConfig; ``shifts="auto"`` measures F^SC on the data first (heads.stego_shifts).
        checkpoint_path: resumable checkpoint, written atomically every ``config.checkpoint_every`` steps
            and at the end; if it exists, training continues from it (its config must match).
        device: "auto", "cpu", "cuda", ... Training is fp32 everywhere (OMH's Sinkhorn needs fp32).
        progress: show a tqdm bar.
        aux: optional module ``aux(codes) -> (loss, stats)`` on the *undetached* codes (OMH); its
            parameters train with Adam at ``config.probe_lr`` and its loss is added to the STEGO loss.
            Its initialisation is the caller's; its state is checkpointed.
        on_step: ``on_step(step, stats)`` after every step (step counts from 1; stats are floats).
    Returns:
        TrainResult (CPU state dicts, shifts used, correlation stats, history).
    """
    n, in_dim = _validate(features, knn, config)
    knn = np.asarray(knn)
    dev = resolve_device(device)
    ckpt = load_checkpoint(checkpoint_path, config.to_dict(), method=StegoMethod.name)

    if ckpt is not None:
        shifts, stats = tuple(ckpt["context"]["shifts"]), ckpt["context"]["correlation_stats"]
    elif config.shifts == "auto":
        stats = measure_correlations(features, knn, feature_samples=config.feature_samples,
                                     pointwise=config.pointwise, seed=config.seed,
                                     num_neighbors=config.num_neighbors, batch_size=config.batch_size)
        shifts = choose_shifts(stats, config.auto_targets)
    else:
        shifts, stats = tuple(config.shifts), None

    method = StegoMethod(features, knn, n_classes, config, shifts, dev, aux)
    if ckpt is not None and aux is not None and "aux" not in ckpt["modules"]:
        raise ConfigError("train_stego: an aux module was given but the checkpoint has none")
    loop = run_training(method, config.to_dict(), steps=config.steps, checkpoint_every=config.checkpoint_every,
                        log_every=config.log_every, checkpoint_path=checkpoint_path, checkpoint=ckpt,
                        context={"shifts": list(shifts), "correlation_stats": stats}, progress=progress,
                        on_step=on_step)
    return TrainResult(
        head_state=loop.states["head"], cluster_state=loop.states["cluster"], config=config.to_dict(),
        shifts=tuple(float(s) for s in shifts), correlation_stats=stats, history=loop.history,
        steps_done=loop.steps_done, aux_state=loop.states.get("aux"), in_dim=in_dim,
        seconds_per_step=loop.seconds_per_step,
    )
