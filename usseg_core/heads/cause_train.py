"""CAUSE training on the shared resumable loop: the clusterbook fit and the head (front door + probe).

Both run through ``usseg_core.trainer.run_training``: model and optimiser states, the global torch RNG
(initialisation, dropout), the CPU generator of the grid draws and bank cuts, the concept bank and the
epoch order are checkpointed, so an interrupted run resumes bit-identically. The epoch order only plans
batches (it runs ahead in the prefetcher); everything else is method state.

The head's run is one loop of ``epochs * S + probe_epochs * S`` steps (S = steps per epoch = N // batch):
the front-door steps first, then the cluster-probe fine-tuning on the frozen teacher.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from usseg_core.device import resolve_device, to_device
from usseg_core.errors import ConfigError
from usseg_core.heads.cause import (CauseConfig, CauseTrained, ClusterbookConfig, ConceptBank, Projection,
                                    build_head, check_grid, concept_index, ema_update, front_door_loss,
                                    grid_order, grid_sample, init_centres, modularity_loss, tokens)
from usseg_core.heads.registry import HeadInputs, TrainedState, config_to_dict
from usseg_core.trainer import EpochOrder, TrainingMethod, load_checkpoint, read_host_batch, run_training


class Plan(NamedTuple):
    step: int
    idx: np.ndarray  # (B,) items


def _item_shape(features: Sequence, what: str) -> tuple[int, int, int]:
    if len(features) < 2:
        raise ConfigError(f"{what}: need at least 2 feature maps, got {len(features)}")
    shape = tuple(np.asarray(features[0]).shape)
    if len(shape) != 3:
        raise ConfigError(f"{what}: features[i] must be (C, h, w), got shape {shape}")
    return shape  # type: ignore[return-value]


# --- the clusterbook ---------------------------------------------------------------------------------

class _EpochBatches(TrainingMethod):
    """Shuffled epochs of ``config.batch_size`` cached items (the clusterbook fit and the head's training):
    the plan is the epoch order, checkpointed with its generator."""

    features: Sequence
    item_shape: tuple[int, int, int]
    device: torch.device
    epochs: EpochOrder

    def plan_state(self) -> dict:
        return {"numpy_rng": self.epochs.rng.bit_generator.state, **self.epochs.state()}

    def load_plan_state(self, state: dict) -> None:
        self.epochs.rng.bit_generator.state = state["numpy_rng"]
        self.epochs.load_state(state)

    def plan(self, step: int) -> Plan:
        return Plan(step, self.epochs.next_batch(self.config.batch_size))

    def read(self, plan: Plan) -> torch.Tensor:
        return read_host_batch(self.features, plan.idx, self.item_shape, self.device)


class BookMethod(_EpochBatches):
    """Modularity maximisation of the concept clusterbook over the features ([code:CAUSE] train_mediator)."""

    name = "clusterbook"

    def __init__(self, features: Sequence, config: ClusterbookConfig, device: torch.device) -> None:
        self.features, self.config, self.device = features, config, device
        self.item_shape = _item_shape(features, "clusterbook")
        check_grid(self.item_shape[1:], config.grid, "clusterbook")
        gen = torch.Generator().manual_seed(config.codebook_seed)
        self.book = nn.ParameterDict({"c": nn.Parameter(init_centres(config.concepts, self.item_shape[0],
                                                                     gen).to(device))})
        self.opt = torch.optim.Adam(self.book.parameters(), lr=config.lr)
        self.sampler = torch.Generator().manual_seed(config.codebook_seed + 1)  # grid draws
        self.epochs = EpochOrder(len(features), np.random.default_rng(config.codebook_seed))
        self.steps_per_epoch_n = max(1, len(features) // config.batch_size)

    def modules(self) -> dict[str, nn.Module]:
        return {"book": self.book}

    def optimisers(self) -> list:
        return [self.opt]

    def state(self) -> dict:
        return {"sampler": self.sampler.get_state()}

    def load_state(self, state: dict) -> None:
        self.sampler.set_state(state["sampler"])

    def step(self, plan: Plan, batch: torch.Tensor) -> dict:
        x = to_device(batch, self.device)  # (B, C, h, w)
        hw = tuple(x.shape[-2:])
        k = self.config.grid
        t = grid_sample(tokens(x), hw, k, grid_order(len(x), hw, k, self.sampler))  # (B, P, C)
        loss = modularity_loss(self.book["c"], t, self.config.temperature)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return {"loss": loss.detach(), "modularity": -loss.detach()}


@dataclass
class BookResult:
    book: np.ndarray  # (K, C) float32
    modularity: float  # mean soft modularity of the last epoch's batches
    history: list[dict]
    steps_done: int
    seconds_per_step: float | None


def fit_clusterbook(features: Sequence, *, settings: ClusterbookConfig, checkpoint_path: Path | None = None,
                    device: str = "auto", progress: bool = True) -> BookResult:
    """Fit the concept clusterbook on ``features`` (``features[i]`` -> (C, h, w)); resumable."""
    dev = resolve_device(device)
    fit = settings.fit_params()
    ckpt = load_checkpoint(checkpoint_path, fit, method=BookMethod.name)
    torch.manual_seed(settings.codebook_seed)
    method = BookMethod(features, settings, dev)
    steps = settings.epochs * method.steps_per_epoch_n
    last: list[float] = []

    def on_step(step: int, stats: dict) -> None:
        if step > steps - method.steps_per_epoch_n:
            last.append(stats["modularity"])

    loop = run_training(method, fit, steps=steps, checkpoint_every=max(1, method.steps_per_epoch_n),
                        log_every=max(1, method.steps_per_epoch_n), checkpoint_path=checkpoint_path,
                        checkpoint=ckpt, progress=progress, on_step=on_step)
    if not last:  # resumed at the end: the history's last entry is the last step
        last = [loop.history[-1]["modularity"]] if loop.history else [float("nan")]
    return BookResult(book=loop.states["book"]["c"].numpy().astype(np.float32), modularity=float(np.mean(last)),
                      history=loop.history, steps_done=loop.steps_done, seconds_per_step=loop.seconds_per_step)


# --- the head ----------------------------------------------------------------------------------------

class CauseMethod(_EpochBatches):
    """Front-door training then cluster-probe fine-tuning of CAUSE-MLP / CAUSE-TR."""

    def __init__(self, variant: str, features: Sequence, book: np.ndarray, n_classes: int, config: CauseConfig,
                 device: torch.device) -> None:
        self.name = f"cause-{variant}"
        self.variant, self.features, self.config, self.device = variant, features, config, device
        self.item_shape = _item_shape(features, self.name)
        in_dim, hw = self.item_shape[0], tuple(self.item_shape[1:])
        self.hw = hw
        check_grid(hw, config.grid, "cause")
        book = np.asarray(book, dtype=np.float32)
        if book.ndim != 2 or book.shape[1] != in_dim:
            raise ConfigError(f"{self.name}: clusterbook of shape {book.shape} does not match features of "
                              f"{in_dim} channels")
        self.book = torch.from_numpy(book).to(device)
        torch.manual_seed(config.seed)  # initialisation and dropout draw from the global torch RNG
        self.student = nn.ModuleDict({"head": build_head(variant, in_dim, config, hw),
                                      "proj": Projection(config.dim, config.projection_dim)}).to(device)
        if variant == "tr":
            self.student["head"].set_book(self.book)
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)  # [code:CAUSE] ema_init
        self.probe = nn.ParameterDict({"c": nn.Parameter(init_centres(n_classes, config.dim).to(device))})
        self.drop = nn.Dropout(config.dropout)
        self.opt = torch.optim.Adam(self.student.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.opt_probe = torch.optim.Adam(self.probe.parameters(), lr=config.probe_lr)
        self.sampler = torch.Generator().manual_seed(config.seed)  # grid orders, bank cuts
        self.epochs = EpochOrder(len(features), np.random.default_rng(config.seed))
        self.bank = ConceptBank(config.bank_size, config.bank_keep)
        self.per_epoch = max(1, len(features) // config.batch_size)
        self.front_steps, probe = config.lengths(variant, self.per_epoch)
        self.total_steps = self.front_steps + probe

    def modules(self) -> dict[str, nn.Module]:
        return {"student": self.student, "teacher": self.teacher, "probe": self.probe}

    def optimisers(self) -> list:
        return [self.opt, self.opt_probe]

    def state(self) -> dict:
        return {"sampler": self.sampler.get_state(), **self.bank.state()}

    def load_state(self, state: dict) -> None:
        self.sampler.set_state(state["sampler"])
        self.bank.load_state(state, self.device)

    def step(self, plan: Plan, batch: torch.Tensor) -> dict:
        x = tokens(to_device(batch, self.device))  # (B, P, C)
        if plan.step < self.front_steps:
            return self.front_door(x)
        return self.fine_tune(x, (plan.step - self.front_steps) // self.per_epoch)

    def front_door(self, x: torch.Tensor) -> dict:
        """One step of [code:CAUSE] train_front_door_{mlp,tr}.py (without its linear probe)."""
        cfg, hw, k = self.config, self.hw, self.config.grid
        order = grid_order(len(x), hw, k, self.sampler)
        self.student.train()
        self.teacher.train()  # the reference's segment.train(): dropout in the teacher too
        if self.variant == "mlp":  # pointwise head: sample the tokens first ([code:CAUSE] MLP script)
            xs, shw = grid_sample(x, hw, k, order), None
            with torch.no_grad():
                proj_ema = self._project(self.teacher, xs, shw)
            proj = self._project(self.student, xs, shw)
        else:  # the decoder attends over every token; sample its outputs with one order ([code:CAUSE] TR)
            xs = grid_sample(x, hw, k, order)
            with torch.no_grad():
                proj_ema = grid_sample(self._project(self.teacher, x, hw), hw, k, order)
            proj = grid_sample(self._project(self.student, x, hw), hw, k, order)
        concepts = concept_index(xs, self.book)  # (B, P')
        bank_ids, bank_proj = self.bank.flat(cfg.projection_dim, self.device)  # before this batch is banked
        loss, stats = front_door_loss(concepts, proj, proj_ema, self.book, bank_ids, bank_proj, cfg)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.student.parameters(), cfg.clip_for(self.variant))
        self.opt.step()
        ema_update(self.student, self.teacher, cfg.ema)
        self.bank.update(concepts, proj_ema, self.sampler)
        return {"loss": loss.detach(), "grad_norm": norm.detach(), "bank": float(len(bank_ids)), **stats}

    def _project(self, net: nn.ModuleDict, x: torch.Tensor, hw) -> torch.Tensor:
        """(B, P, C) -> (B, P, E): head then projection; ``hw`` None = a grid-sampled set (pointwise MLP)."""
        grid = hw if hw is not None else (x.shape[1], 1)
        return net["proj"](net["head"](x, grid, self.drop), grid)

    def fine_tune(self, x: torch.Tensor, epoch: int) -> dict:
        """One step of [code:CAUSE] fine_tuning_{mlp,tr}.py's modularity loss on the teacher's codes; the
        probe's rate halves every 2 epochs (its StepLR)."""
        cfg = self.config
        for group in self.opt_probe.param_groups:
            group["lr"] = cfg.probe_lr * 0.5 ** (epoch // 2)
        self.teacher.train()  # the reference computes the codes in train mode (dropout on)
        with torch.no_grad():
            codes = self.teacher["head"](x, self.hw, self.drop)  # (B, P, D)
        order = grid_order(len(x), self.hw, cfg.grid, self.sampler)
        codes = grid_sample(codes, self.hw, cfg.grid, order)
        loss = modularity_loss(self.probe["c"], codes, cfg.probe_temperature)
        self.opt_probe.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_probe.step()
        return {"loss": loss.detach(), "probe_modularity": -loss.detach()}


def train_cause(variant: str, inputs: HeadInputs, config: dict, *, checkpoint_path: Path | None = None,
                device: str = "auto", progress: bool = True,
                on_step: Callable[[int, dict], None] | None = None) -> TrainedState:
    """Train CAUSE-``variant`` on the five-crop features and the clusterbook of ``inputs``."""
    cfg: CauseConfig = config["cause"]
    if inputs.clusterbook is None:
        raise ConfigError(f"cause-{variant}: no clusterbook among the head inputs")
    dev = resolve_device(device)
    flat = config_to_dict(config)
    ckpt = load_checkpoint(checkpoint_path, flat, method=f"cause-{variant}")
    method = CauseMethod(variant, inputs.features, inputs.clusterbook, inputs.n_classes, cfg, dev)
    loop = run_training(method, flat, steps=method.total_steps, checkpoint_every=cfg.checkpoint_every,
                        log_every=cfg.log_every, checkpoint_path=checkpoint_path, checkpoint=ckpt,
                        progress=progress, on_step=on_step)
    teacher = {k[len("head."):]: v for k, v in loop.states["teacher"].items() if k.startswith("head.")}
    payload = {"in_dim": method.item_shape[0], "code_dim": cfg.dim, "variant": variant,
               "grid_hw": list(method.hw), "head": teacher, "probe": loop.states["probe"]["c"]}
    return TrainedState(payload=payload,
                        meta={"front_steps": method.front_steps, "probe_steps": method.total_steps - method.front_steps},
                        steps_done=loop.steps_done, seconds_per_step=loop.seconds_per_step, history=loop.history)


def train_cause_mlp(inputs: HeadInputs, config: dict, **kw) -> TrainedState:
    return train_cause("mlp", inputs, config, **kw)


def train_cause_tr(inputs: HeadInputs, config: dict, **kw) -> TrainedState:
    return train_cause("tr", inputs, config, **kw)


def load_cause(ckpt: dict) -> CauseTrained:
    return CauseTrained.from_checkpoint(ckpt)
