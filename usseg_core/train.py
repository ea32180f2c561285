"""Resumable training of a STEGO head (plus its cluster probe and an optional aux loss) on cached features.

No backbone runs here: ``features[i]`` is a cached (C, h, w) map (METHODS.md §5 S2). Everything random is
seeded from ``config.seed`` and checkpointed (model and optimiser states, the global torch RNG that drives
dropout, the CPU generator that draws sample points and derangements, the numpy generator and the current
epoch order), so an interrupted run resumed from its checkpoint ends bit-identical to an uninterrupted one.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from usseg_core.errors import ConfigError, InputError
from usseg_core.heads.probes import ClusterProbe
from usseg_core.heads.stego import StegoConfig, StegoHead, StegoLoss
from usseg_core.shifts import choose_shifts, measure_correlations

CHECKPOINT_VERSION = 1
# Fields that may change between an interrupted run and its resumption without changing its result.
_RESUMABLE_CHANGES = {"steps", "checkpoint_every", "log_every"}


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


def resolve_device(device: str) -> torch.device:
    """"auto" -> cuda when available, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


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


def _stack(features: Sequence, indices: np.ndarray, device: torch.device) -> torch.Tensor:
    arr = np.stack([np.asarray(features[int(i)], dtype=np.float32) for i in indices])  # (B, C, h, w)
    return torch.from_numpy(arr).to(device)


class _Run:
    """Mutable training state: modules, optimisers and every random generator."""

    def __init__(self, in_dim: int, n_classes: int, config: StegoConfig, shifts, device: torch.device,
                 aux: nn.Module | None) -> None:
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
        self.rng = np.random.default_rng(config.seed)  # epoch orders + KNN rank picks
        self.order = np.zeros(0, dtype=np.int64)  # current epoch's image order
        self.cursor = 0  # next position in self.order
        self.step = 0
        self.history: list[dict] = []

    def optimisers(self) -> list[torch.optim.Optimizer]:
        return [o for o in (self.opt_head, self.opt_cluster, self.opt_aux) if o is not None]

    def next_batch(self, n: int, batch_size: int) -> np.ndarray:
        """A seeded permutation per epoch; the incomplete tail of an epoch is dropped."""
        b = min(batch_size, n)
        if self.cursor + b > len(self.order):
            self.order = self.rng.permutation(n)
            self.cursor = 0
        idx = self.order[self.cursor:self.cursor + b]
        self.cursor += b
        return idx

    def state(self, config: StegoConfig, shifts, stats) -> dict:
        return {
            "version": CHECKPOINT_VERSION, "step": self.step, "config": config.to_dict(),
            "shifts": list(shifts), "correlation_stats": stats, "history": self.history,
            "head": self.head.state_dict(), "cluster": self.cluster.state_dict(),
            "aux": self.aux.state_dict() if self.aux is not None else None,
            "optimisers": [o.state_dict() for o in self.optimisers()],
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "sampler": self.sampler.get_state(),
            "numpy_rng": self.rng.bit_generator.state,
            "order": torch.from_numpy(self.order.astype(np.int64)), "cursor": self.cursor,
        }

    def load(self, ckpt: dict, device: torch.device) -> None:
        self.head.load_state_dict(ckpt["head"])
        self.cluster.load_state_dict(ckpt["cluster"])
        if self.aux is not None:
            if ckpt["aux"] is None:
                raise ConfigError("train_stego: an aux module was given but the checkpoint has none")
            self.aux.load_state_dict(ckpt["aux"])
        for opt, st in zip(self.optimisers(), ckpt["optimisers"], strict=True):
            opt.load_state_dict(st)
        torch.set_rng_state(ckpt["torch_rng"])
        if ckpt["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
        self.sampler.set_state(ckpt["sampler"])
        self.rng.bit_generator.state = ckpt["numpy_rng"]
        self.order = ckpt["order"].numpy().copy()
        self.cursor, self.step = int(ckpt["cursor"]), int(ckpt["step"])
        self.history = list(ckpt["history"])


def _save_atomic(obj: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a crash mid-write never leaves a truncated checkpoint


def _load_checkpoint(path: Path, config: StegoConfig) -> dict | None:
    if not path.exists():
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 — any unreadable file is the same user problem
        raise InputError(path, f"unreadable STEGO checkpoint ({exc}); delete it to start afresh") from exc
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise InputError(path, f"checkpoint version {ckpt.get('version')} != {CHECKPOINT_VERSION}")
    saved, now = dict(ckpt["config"]), config.to_dict()
    changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k) and k not in _RESUMABLE_CHANGES)
    if changed:
        raise InputError(path, f"checkpoint was written with a different config ({changed}); "
                               "use another checkpoint path or delete it")
    return ckpt


def _to_float(v) -> float:
    return float(v.item()) if isinstance(v, torch.Tensor) else float(v)


def train_stego(features: Sequence, knn: np.ndarray, n_classes: int, config: StegoConfig, *,
                checkpoint_path: Path | None = None, device: str = "auto", progress: bool = True,
                aux: nn.Module | None = None, on_step: Callable[[int, dict], None] | None = None) -> TrainResult:
    """Train a STEGO head, its cluster probe and an optional aux loss on cached features (fp32).

    Args:
        features: indexable of length N, ``features[i]`` -> (C, h, w) array (float16 ok); e.g. a Zarr array.
        knn: (N, k) int neighbour table, column 0 = self; positives drawn uniformly from columns
            1..config.num_neighbors (METHODS.md §3.1).
        n_classes: number of cluster-probe centroids.
        config: StegoConfig; ``shifts="auto"`` measures F^SC on the data first (usseg_core.shifts).
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
    ckpt = _load_checkpoint(Path(checkpoint_path), config) if checkpoint_path is not None else None

    if ckpt is not None:
        shifts, stats = tuple(ckpt["shifts"]), ckpt["correlation_stats"]
    elif config.shifts == "auto":
        stats = measure_correlations(features, knn, feature_samples=config.feature_samples,
                                     pointwise=config.pointwise, seed=config.seed,
                                     num_neighbors=config.num_neighbors, batch_size=config.batch_size)
        shifts = choose_shifts(stats, config.auto_targets)
    else:
        shifts, stats = tuple(config.shifts), None

    run = _Run(in_dim, n_classes, config, shifts, dev, aux)
    if ckpt is not None:
        run.load(ckpt, dev)

    first_step, t0 = run.step, time.perf_counter()
    bar = tqdm(total=config.steps, initial=run.step, disable=not progress, desc="stego", dynamic_ncols=True)
    while run.step < config.steps:
        stats_step = _train_step(run, features, knn, n, config, dev)
        run.step += 1
        bar.update(1)
        if run.step % config.log_every == 0 or run.step == config.steps:
            run.history.append({"step": run.step, **stats_step})
            bar.set_postfix(loss=f"{stats_step['loss']:.4f}")
        if checkpoint_path is not None and (run.step % config.checkpoint_every == 0 or run.step == config.steps):
            _save_atomic(run.state(config, shifts, stats), Path(checkpoint_path))
        if on_step is not None:
            on_step(run.step, stats_step)
    bar.close()
    ran = run.step - first_step
    seconds_per_step = (time.perf_counter() - t0) / ran if ran else None

    def cpu(sd: dict) -> dict:
        return {k: v.detach().cpu().clone() for k, v in sd.items()}

    return TrainResult(
        head_state=cpu(run.head.state_dict()), cluster_state=cpu(run.cluster.state_dict()),
        config=config.to_dict(), shifts=tuple(float(s) for s in shifts), correlation_stats=stats,
        history=list(run.history), steps_done=run.step,
        aux_state=cpu(run.aux.state_dict()) if run.aux is not None else None, in_dim=in_dim,
        seconds_per_step=seconds_per_step,
    )


def _train_step(run: _Run, features: Sequence, knn: np.ndarray, n: int, config: StegoConfig,
                dev: torch.device) -> dict:
    """One optimisation step of head, cluster probe and aux; returns float stats."""
    idx = run.next_batch(n, config.batch_size)  # (B,)
    ranks = run.rng.integers(1, config.num_neighbors + 1, size=len(idx))  # KNN rank 1..k, never self
    feats = _stack(features, idx, dev)  # (B, C, h, w)
    feats_pos = _stack(features, knn[idx, ranks], dev)  # (B, C, h, w)

    run.head.train()
    dropped, codes = run.head(feats)  # (B, C, h, w), (B, D, h, w)
    dropped_pos, codes_pos = run.head(feats_pos)
    stego_loss, stats = run.loss_fn(dropped, dropped_pos, codes, codes_pos, generator=run.sampler)
    # The probe sees detached codes: it must not shape the head ([code:STEGO]).
    cluster_loss, _ = run.cluster(codes.detach())
    total = stego_loss + cluster_loss
    out = {"loss": _to_float(stego_loss), "cluster_loss": _to_float(cluster_loss)}
    if run.aux is not None:
        aux_loss, aux_stats = run.aux(codes)  # undetached: OMH shapes the codes
        total = total + aux_loss
        out["aux_loss"] = _to_float(aux_loss)
        out.update({f"aux_{k}": _to_float(v) for k, v in aux_stats.items()})

    for opt in run.optimisers():
        opt.zero_grad(set_to_none=True)
    total.backward()
    for opt in run.optimisers():
        opt.step()
    out.update({k: _to_float(v) for k, v in stats.items()})
    return out
