"""What the heads trained on the view bank (PiCIE, HSG) share: the banks of several training splits seen as
one list of images, and a :class:`~usseg_core.trainer.TrainingMethod` base that owns that list, the numpy
generator of the batch order and their checkpointed state.

The generator and the epoch order are *planning* state (``usseg_core.trainer``): they decide which images
(and views) a step reads, ahead of the step, and are checkpointed as of the last step computed.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from usseg_core.errors import ConfigError
from usseg_core.trainer import EpochOrder, TrainingMethod


class BankIndex:
    """Several view banks (one per training split) seen as one list of images."""

    def __init__(self, banks: Sequence) -> None:
        if not banks:
            raise ConfigError("PiCIE needs a view bank (the 'views' stage) with at least one image")
        shapes = {tuple(b.shape) for b in banks}
        views = {b.n_views for b in banks}
        if len(shapes) != 1 or len(views) != 1:
            raise ConfigError(f"view banks differ in feature shape {sorted(shapes)} or views {sorted(views)}")
        self.banks = list(banks)
        self.offsets = np.cumsum([0] + [b.n_images for b in banks])
        self.n, self.n_views, self.shape = int(self.offsets[-1]), views.pop(), shapes.pop()

    def _split(self, idx: np.ndarray) -> list[tuple[int, np.ndarray, np.ndarray]]:
        which = np.searchsorted(self.offsets, idx, side="right") - 1
        return [(int(s), np.flatnonzero(which == s), idx[which == s] - self.offsets[s]) for s in np.unique(which)]

    def batch(self, kind: str, idx: np.ndarray, views: np.ndarray) -> Tensor:
        """(B, C, h, w) float32 features of image ``idx[j]``'s view ``views[j]``; kind "plain" | "warped".

        One read per bank touched (``ViewBank.read_batch``: each distinct chunk once).
        """
        parts = self._split(np.asarray(idx))
        views = np.asarray(views)
        if len(parts) == 1:  # one bank: its batch as it comes, no copy
            s, pos, local = parts[0]
            return getattr(self.banks[s], f"{kind}_batch")(local, views[pos])
        out = torch.empty((len(idx), *self.shape), dtype=torch.float32)
        for s, pos, local in parts:
            out[torch.from_numpy(pos)] = getattr(self.banks[s], f"{kind}_batch")(local, views[pos])
        return out

    def geometries(self, idx: np.ndarray, views: np.ndarray) -> list:
        out = [None] * len(idx)
        for s, pos, local in self._split(np.asarray(idx)):
            for p, i in zip(pos, local):
                out[p] = self.banks[s].geometry(int(i), int(views[p]))
        return out



class BankMethod(TrainingMethod):
    """A method over a :class:`BankIndex`: call :meth:`init_bank` first, :meth:`init_order` after the modules.

    The order matters for bit-identical runs: subclasses seed torch and build their modules between the two.
    """

    def init_bank(self, banks: Sequence, config, device: torch.device, method: str) -> None:
        self.bank = BankIndex(banks)
        if self.bank.n_views < 2:
            raise ConfigError(f"{method} needs at least 2 views per image in the view bank (views.n_views)")
        self.config, self.device = config, device

    def init_order(self) -> None:
        """Seeded numpy generator, batch size (at most the images) and the epoch's image order."""
        self.rng = np.random.default_rng(self.config.seed)
        self.batch_size = min(self.config.batch_size, self.bank.n)
        self.epochs = EpochOrder(self.bank.n, self.rng)
        self.steps_per_epoch = max(1, self.bank.n // self.batch_size)

    def plan_state(self) -> dict:
        return {"numpy_rng": self.rng.bit_generator.state, **self.epochs.state()}

    def load_plan_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state["numpy_rng"]
        self.epochs.load_state(state)

    def next_images(self) -> np.ndarray:
        """The next batch of images of the epoch order, sorted (the order within a batch is irrelevant)."""
        return np.sort(self.epochs.next_batch(self.batch_size))  # (B,)
