"""Loading a trained head must not move a training that runs beside it in the same process.

A head's modules are initialised (from torch's global RNG) before its checkpoint overwrites them, and the
heads' trainings draw dropout masks from that RNG. ``usseg compare`` loads the head just trained (for
k-means on its codes) while the next training runs in another thread: without the training slot around the
load, that training's draws would depend on when the load happened."""
from __future__ import annotations

import threading
import time

import torch

from tasks.heads import load_head, training_slot
from usseg_core.heads.builtin import StegoTrained
from usseg_core.heads.registry import save_head
from usseg_core.heads.stego import StegoConfig


def _save(path, seed: int) -> str:
    torch.manual_seed(seed)
    head = StegoTrained("stego", 16, 8, 5, 0.1)
    save_head(path, "stego", 5, {"stego": StegoConfig()}, {
        "in_dim": 16, "code_dim": 8, "head": head.head.state_dict(), "cluster": head.probe.state_dict()})
    return str(path)


def _training(loaded: threading.Event | None, out: list) -> None:
    """A stand-in training: seeds the global RNG, gives a loader the chance to run, then draws."""
    with training_slot():
        torch.manual_seed(7)
        first = torch.rand(3)
        if loaded is not None:
            loaded.wait(0.5)  # the loader runs now, if nothing stops it
            time.sleep(0.05)
        out.append(torch.cat([first, torch.rand(3)]))


def test_a_load_beside_a_training_leaves_its_draws_alone(tmp_path):
    path = _save(tmp_path / "head.pt", 0)
    alone: list = []
    _training(None, alone)

    load_head.cache_clear()
    beside, loaded = [], threading.Event()
    trainer = threading.Thread(target=_training, args=(loaded, beside))
    trainer.start()
    time.sleep(0.05)  # the training holds the slot and has drawn its first numbers

    def load():
        load_head(path, "cpu")
        loaded.set()

    loader = threading.Thread(target=load)
    loader.start()
    trainer.join(5)
    loader.join(5)
    assert loaded.is_set() and not trainer.is_alive()
    assert torch.equal(beside[0], alone[0])  # the load waited for the slot: the same draws as alone


def test_the_slot_is_reentrant_and_a_cached_head_is_not_built_again(tmp_path):
    path = _save(tmp_path / "head.pt", 1)
    load_head.cache_clear()
    with training_slot():  # a training loads its own head before it lets go of the slot
        first = load_head(path, "cpu")
    state = torch.get_rng_state()
    assert load_head(path, "cpu") is first  # the k-means after it: from the cache, no initialisation
    assert torch.equal(torch.get_rng_state(), state)
