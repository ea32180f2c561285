"""One resumable training loop for every head (STEGO, OMH, PiCIE, ...).

A head supplies a :class:`TrainingMethod`: its modules, optimisers, its own random generators and epoch
state, and its step (plus, for methods that alternate clustering and training such as PiCIE, a pass at
the start of every epoch). :func:`run_training` owns everything else: the step counter, the global torch
RNG (initialisation is the method's business, dropout draws from it), atomic checkpoints, history,
progress bar, and the refusal to resume a checkpoint written with another configuration.

Bit-identical resume is a contract between the two: the loop checkpoints the global torch / CUDA RNGs, the
module and optimiser states and whatever ``method.state()`` and ``method.plan_state()`` return; a method must
put every other piece of mutable state it reads into one of them: what decides the batches (the batch
order's generator, the epoch order) into ``plan_state()``, the rest (sampling generators, pseudo-labels,
centroids) into ``state()``.

Batches are read ahead of the step that uses them. A method splits its step in three: :meth:`~TrainingMethod.plan`
decides what step ``s`` reads (item indices, views) from the method's *planning* generators alone, never from
the model; :meth:`~TrainingMethod.read` does the IO for a plan (in a background thread, :class:`Prefetcher`);
:meth:`~TrainingMethod.step` computes on the plan and its batch. The loop plans up to ``prefetch`` steps ahead,
and keeps, with every plan, the planning state right after it was drawn: a checkpoint after step ``s`` stores
the planning state as of step ``s`` (the last one *consumed*), not that of the plans drawn ahead, so a resumed
run plans step ``s + 1`` exactly as the uninterrupted run did.
"""
from __future__ import annotations

import collections
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from usseg_core.device import host_batch
from usseg_core.errors import InputError
from usseg_core.features import read_items
from usseg_core.remote import written

CHECKPOINT_VERSION = 2
# Fields that may change between an interrupted run and its resumption without changing its result.
RESUMABLE_FIELDS = frozenset({"steps", "checkpoint_every", "log_every"})
PREFETCH = 3  # batches read ahead of the step being computed


class TrainingMethod:
    """What a head gives the loop. Subclasses override :meth:`step` and usually the rest."""

    name: str = "head"
    # When set, :meth:`begin_epoch` runs before the first step of every epoch (step % steps_per_epoch == 0).
    steps_per_epoch: int | None = None
    device: torch.device = torch.device("cpu")  # where the step computes (batches are pinned for CUDA)

    def modules(self) -> dict[str, nn.Module]:
        """Named trainable modules; their state dicts are checkpointed and returned."""
        return {}

    def optimisers(self) -> list[torch.optim.Optimizer]:
        return []

    def state(self) -> dict:
        """Everything else the *step* reads that must survive a resume (sampling generators, pseudo-labels)."""
        return {}

    def load_state(self, state: dict) -> None:
        """Inverse of :meth:`state` (``state`` also holds :meth:`plan_state`'s keys)."""

    def plan(self, step: int) -> Any:
        """What step ``step`` reads (indices, views), drawn from the planning state alone; runs ahead of
        the step being computed, so it must never read the model or anything :meth:`step` changes."""
        return None

    def plan_state(self) -> dict:
        """The state :meth:`plan` advances (its generator, the epoch order); keys distinct from :meth:`state`.

        Called after every plan and kept until that step is consumed: return values that later plans
        do not change in place (a generator's ``bit_generator.state`` dict, arrays that are replaced).
        """
        return {}

    def load_plan_state(self, state: dict) -> None:
        """Inverse of :meth:`plan_state`."""

    def read(self, plan: Any) -> Any:
        """The batch of ``plan`` on the host (IO only: no model, no generator); runs in the prefetch thread."""
        return None

    def begin_epoch(self, epoch: int, plan: Any) -> dict[str, float] | None:
        """A pass before epoch ``epoch`` (0-based), e.g. PiCIE's clustering; ``plan`` is the epoch's first
        step's plan. Returns stats for the history."""
        return None

    def step(self, plan: Any, batch: Any) -> dict[str, float | torch.Tensor]:
        """One optimisation step on ``plan``'s ``batch``; returns stats (``loss`` at least): floats or
        detached 0-d tensors, which the loop turns into floats only when it logs them."""
        raise NotImplementedError


class EpochOrder:
    """Seeded permutation per epoch over n items; the incomplete tail of an epoch is dropped.

    Planning state (:meth:`TrainingMethod.plan_state`): its generator and :meth:`state` go there."""

    def __init__(self, n: int, rng: np.random.Generator) -> None:
        self.n, self.rng = n, rng
        self.order = np.zeros(0, dtype=np.int64)  # current epoch's order
        self.cursor = 0  # next position in self.order

    def next_batch(self, batch_size: int) -> np.ndarray:
        b = min(batch_size, self.n)
        if self.cursor + b > len(self.order):
            self.order = self.rng.permutation(self.n)
            self.cursor = 0
        idx = self.order[self.cursor:self.cursor + b]
        self.cursor += b
        return idx

    def state(self) -> dict:
        # the order array is replaced, never changed in place: the snapshot may share it
        return {"order": torch.from_numpy(np.asarray(self.order, dtype=np.int64)), "cursor": self.cursor}

    def load_state(self, state: dict) -> None:
        self.order = state["order"].numpy().copy()
        self.cursor = int(state["cursor"])


def read_host_batch(features: Sequence, indices: np.ndarray, item_shape: tuple[int, ...],
                    device: torch.device) -> torch.Tensor:
    """``features[i]`` (each ``item_shape``) for i in ``indices``: one float32 host batch, pinned for CUDA
    (a method's :meth:`TrainingMethod.read` of cached feature maps)."""
    out = host_batch((len(indices), *item_shape), device)  # (B, C, h, w)
    read_items(features, indices, out=out.numpy())
    return out


class Prefetcher:
    """Plans steps in the caller's thread and reads their batches in a background thread, ``depth`` ahead.

    :attr:`consumed_state` is the method's planning state as of the last step handed out by :meth:`next`
    (before any, as of construction): what a checkpoint stores.
    """

    def __init__(self, method: TrainingMethod, first_step: int, steps: int, depth: int = PREFETCH) -> None:
        self.method, self.next_step, self.steps, self.depth = method, first_step, steps, max(1, depth)
        self.pending: collections.deque[tuple[Any, dict, Future]] = collections.deque()
        self.consumed_state = method.plan_state()
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="usseg-prefetch")

    def _fill(self) -> None:
        while len(self.pending) < self.depth and self.next_step < self.steps:
            plan = self.method.plan(self.next_step)
            self.pending.append((plan, self.method.plan_state(), self.pool.submit(self.method.read, plan)))
            self.next_step += 1

    def peek(self) -> Any:
        """The next step's plan (its batch may still be loading)."""
        self._fill()
        return self.pending[0][0]

    def next(self) -> tuple[Any, Any]:
        """The next step's plan and batch (waits for the read; re-raises its error)."""
        self._fill()
        plan, state, future = self.pending.popleft()
        self._fill()  # keep ``depth`` reads in flight while this step computes
        batch = future.result()
        self.consumed_state = state
        return plan, batch

    def close(self) -> None:
        """Drop the reads ahead (waits for the one running)."""
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.pending.clear()


@dataclass
class LoopResult:
    """What the loop did: states are on the CPU, everything else JSON-able."""

    states: dict[str, dict]  # module name -> CPU state dict
    history: list[dict]
    steps_done: int
    seconds_per_step: float | None  # wall time per step of this call (None if no step ran)
    context: dict = field(default_factory=dict)  # what the caller stored with the first checkpoint


def save_atomic(obj: dict, path: Path) -> None:
    """torch.save through a temporary and a rename: a crash mid-write never leaves a truncated file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
    written(path)  # an object store's artifact: PUT the checkpoint too (usseg_core/remote.py)


def load_checkpoint(path: Path | None, config: dict, *, method: str,
                    resumable: Iterable[str] = RESUMABLE_FIELDS) -> dict | None:
    """The checkpoint at ``path`` if there is one and it was written with ``config`` (up to ``resumable``).

    Raises InputError naming the file when it is unreadable, of another version or head, or was written
    with a different configuration (listing the fields that differ).
    """
    if path is None or not Path(path).exists():
        return None
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 — any unreadable file is the same user problem
        raise InputError(path, f"unreadable {method} checkpoint ({exc}); delete it to start afresh") from exc
    if not isinstance(ckpt, dict) or ckpt.get("version") != CHECKPOINT_VERSION:
        version = ckpt.get("version") if isinstance(ckpt, dict) else None
        raise InputError(path, f"checkpoint version {version} != {CHECKPOINT_VERSION}; delete it to start afresh")
    if ckpt.get("method") != method:
        raise InputError(path, f"checkpoint of head {ckpt.get('method')!r}, not {method!r}")
    changed = _changed_fields(_flat(ckpt["config"]), _flat(config), set(resumable))
    if changed:
        raise InputError(path, f"checkpoint was written with a different config ({changed}); "
                               "use another checkpoint path or delete it")
    return ckpt


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _changed_fields(saved: dict, now: dict, resumable: set[str]) -> list[str]:
    return sorted(k for k in set(saved) | set(now)
                  if saved.get(k) != now.get(k) and k.rsplit(".", 1)[-1] not in resumable)


def run_training(method: TrainingMethod, config: dict, *, steps: int, checkpoint_every: int, log_every: int,
                 checkpoint_path: Path | None = None, checkpoint: dict | None = None, context: dict | None = None,
                 progress: bool = True, on_step: Callable[[int, dict], None] | None = None,
                 prefetch: int = PREFETCH) -> LoopResult:
    """Run ``method`` to ``steps`` steps, resuming from ``checkpoint`` (see :func:`load_checkpoint`).

    Args:
        method: the head's training method, freshly built (initialisation already drawn).
        config: JSON-able configuration of the run (stored, and compared on resume).
        steps / checkpoint_every / log_every: loop length, checkpoint and history periods.
        checkpoint_path: where checkpoints go (atomic writes); None trains without checkpoints.
        checkpoint: a loaded checkpoint to continue from (the caller loads it first when building the
            method needs something stored in it, e.g. STEGO's measured shifts in ``context``).
        context: JSON-able values stored with every checkpoint and returned (e.g. measured shifts).
        on_step: ``on_step(step, stats)`` after every step (step counts from 1; stats are floats).
        prefetch: batches read ahead in a background thread (:class:`Prefetcher`).
    """
    modules, opts = method.modules(), method.optimisers()
    step, history = 0, []
    context = dict(context or {})
    if checkpoint is not None:
        for name, module in modules.items():
            module.load_state_dict(checkpoint["modules"][name])
        for opt, st in zip(opts, checkpoint["optimisers"], strict=True):
            opt.load_state_dict(st)
        torch.set_rng_state(checkpoint["torch_rng"])
        if checkpoint["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(checkpoint["cuda_rng"])
        method.load_state(checkpoint["method_state"])
        method.load_plan_state(checkpoint["method_state"])
        step, history = int(checkpoint["step"]), list(checkpoint["history"])
        context = dict(checkpoint.get("context") or {})
        logging.getLogger("usseg.trainer").info("%s: resuming from checkpoint %s at step %d of %d", method.name,
                                                checkpoint_path or "(given)", step, steps)

    def snapshot() -> dict:
        return {"version": CHECKPOINT_VERSION, "method": method.name, "step": step, "config": config,
                "context": context, "history": history,
                "modules": {n: m.state_dict() for n, m in modules.items()},
                "optimisers": [o.state_dict() for o in opts],
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "method_state": _merged(method.state(), feed.consumed_state)}

    first_step, t0 = step, time.perf_counter()
    spe = method.steps_per_epoch
    has_pass = type(method).begin_epoch is not TrainingMethod.begin_epoch  # say so only when one runs
    bar = tqdm(total=steps, initial=step, disable=not progress, desc=method.name, dynamic_ncols=True)
    feed = Prefetcher(method, step, steps, prefetch)
    try:
        while step < steps:
            if spe and step % spe == 0:
                if has_pass:
                    bar.set_postfix_str(f"epoch {step // spe}: per-epoch pass (e.g. clustering)")
                epoch_stats = method.begin_epoch(step // spe, feed.peek())
                if epoch_stats:
                    history.append({"step": step, "epoch": step // spe, **epoch_stats})
            plan, batch = feed.next()
            stats = method.step(plan, batch)
            del batch
            step += 1
            bar.update(1)
            logged = step % log_every == 0 or step == steps
            if logged or on_step is not None:  # floats only when needed: each one waits for the device
                stats = {k: _number(v) for k, v in stats.items()}
            if logged:
                history.append({"step": step, **stats})
                bar.set_postfix(loss=f"{stats.get('loss', float('nan')):.4f}")
            if checkpoint_path is not None and (step % checkpoint_every == 0 or step == steps):
                save_atomic(snapshot(), Path(checkpoint_path))
            if on_step is not None:
                on_step(step, stats)
    finally:
        feed.close()
        bar.close()
    ran = step - first_step
    return LoopResult(states={n: cpu_state(m) for n, m in modules.items()}, history=list(history),
                      steps_done=step, seconds_per_step=(time.perf_counter() - t0) / ran if ran else None,
                      context=context)


def _merged(state: dict, plan_state: dict) -> dict:
    clash = set(state) & set(plan_state)
    if clash:
        raise ValueError(f"method state and plan state share keys {sorted(clash)}")
    return {**state, **plan_state}


def cpu_state(module: nn.Module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def to_float(v) -> float:
    return float(v.item()) if isinstance(v, torch.Tensor) else float(v)


def _number(v):
    # a stat for the history: tensors become floats (one device sync each), numpy scalars Python numbers
    if isinstance(v, torch.Tensor):
        return float(v.item())
    return v.item() if isinstance(v, np.generic) else v
