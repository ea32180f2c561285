"""Registration of the built-in heads: STEGO, OMH (STEGO + hierarchy loss), PiCIE, HSG and CAUSE.

CAUSE is two registered heads, ``cause-mlp`` and ``cause-tr``, not one head with a variant field: the
variants are two architectures with their own reference lengths and clips, two rows in every results
table, and two deployments; they share their config sections (``cause``, ``clusterbook``), so one
``--set cause.epochs=...`` sets both, and their clusterbook (same features, same ``clusterbook.*``) is
one cached artifact.

Training modules import lazily (:func:`_lazy`): ``usseg_core.heads.stego_train`` imports this package (for the
probes), and a registry lookup must stay cheap.
"""
from __future__ import annotations

import functools
import importlib
from collections.abc import Callable

import torch

from usseg_core.head_names import BUILTIN_HEAD_CARDS as CARDS
from usseg_core.heads.cause import CauseConfig, CauseTrained, ClusterbookConfig, cause_presets
from usseg_core.heads.hsg import HsgConfig, HsgTrained, hsg_presets
from usseg_core.heads.omh import OMHConfig
from usseg_core.heads.picie import PicieConfig, PicieTrained, picie_presets
from usseg_core.heads.probes import ClusterProbe
from usseg_core.heads.registry import (HeadInputs, HeadSpec, TrainedHead, TrainedState, dataset_preset,
                                       register_head)
from usseg_core.heads.stego import STEGO_PRESETS, StegoConfig, StegoHead


class StegoTrained(TrainedHead):
    """STEGO's code head with its cluster probe (OMH adds nothing at inference: OMH §4.3)."""

    clusterer = "cluster-probe"

    def __init__(self, method: str, in_dim: int, code_dim: int, n_classes: int, dropout: float) -> None:
        super().__init__(in_dim, code_dim, n_classes)
        self.method = method
        self.head = StegoHead(in_dim, code_dim, dropout)
        self.probe = ClusterProbe(code_dim, n_classes)

    def codes(self, feats: torch.Tensor) -> torch.Tensor:
        return self.head.codes(feats)

    def cluster_logits(self, codes: torch.Tensor) -> torch.Tensor:
        return self.probe.logits(codes)  # log softmax(2 cos): the CRF unary of [code:STEGO]


def _stego_presets(dataset: str) -> dict[str, dict]:
    return {"stego": dataset_preset(STEGO_PRESETS, "stego", dataset)}  # OMH's primary section is STEGO's


def _train_stego(inputs: HeadInputs, config: dict, *, checkpoint_path=None, device: str = "auto",
                 progress: bool = True, on_step=None) -> TrainedState:
    from usseg_core.heads.stego_train import train_stego

    cfg: StegoConfig = config["stego"]
    aux = None
    if "omh" in config:
        from usseg_core.heads.omh import OMHLoss

        aux = OMHLoss(cfg.dim, inputs.n_classes, config["omh"], seed=cfg.seed)  # the run seed reaches OMH's centres
    r = train_stego(inputs.features, inputs.knn, inputs.n_classes, cfg, checkpoint_path=checkpoint_path,
                    device=device, progress=progress, aux=aux, on_step=on_step)
    return TrainedState(payload={"in_dim": r.in_dim, "code_dim": cfg.dim, "head": r.head_state,
                                 "cluster": r.cluster_state},
                        meta={"shifts": list(r.shifts), "correlation_stats": r.correlation_stats},
                        steps_done=r.steps_done, seconds_per_step=r.seconds_per_step, history=r.history)


def _loader(method: str):
    def load(ckpt: dict) -> TrainedHead:
        head = StegoTrained(method, ckpt["in_dim"], ckpt["code_dim"], ckpt["n_classes"],
                            ckpt["config"]["stego"].get("dropout", 0.1))
        head.head.load_state_dict(ckpt["head"])
        head.probe.load_state_dict(ckpt["cluster"])
        return head
    return load


def _lazy(module: str, name: str) -> Callable[..., TrainedState]:
    """A training entry point imported on its first call (training modules are heavy; lookups stay cheap)."""
    def train(*args, **kw) -> TrainedState:
        return getattr(importlib.import_module(module), name)(*args, **kw)

    train.__name__ = train.__qualname__ = name
    return train


register_head(HeadSpec(
    name="stego", summary=CARDS["stego"].summary, demo=CARDS["stego"].demo,
    sections=(("stego", StegoConfig),), presets=_stego_presets, needs=frozenset({"five_crop", "knn"}),
    train=_train_stego, load=_loader("stego"), clusterer="cluster-probe"))
register_head(HeadSpec(
    name="omh", summary=CARDS["omh"].summary, demo=CARDS["omh"].demo,
    sections=(("stego", StegoConfig), ("omh", OMHConfig)), presets=_stego_presets,
    needs=frozenset({"five_crop", "knn"}), train=_train_stego, load=_loader("omh"), clusterer="cluster-probe"))
register_head(HeadSpec(
    name="picie", summary=CARDS["picie"].summary, demo=CARDS["picie"].demo,
    sections=(("picie", PicieConfig),), presets=picie_presets, needs=frozenset({"views"}),
    train=_lazy("usseg_core.heads.picie_train", "train_picie_head"),
    load=PicieTrained.from_checkpoint, clusterer="centroids"))
register_head(HeadSpec(
    name="hsg", summary=CARDS["hsg"].summary, demo=CARDS["hsg"].demo,
    sections=(("hsg", HsgConfig),), presets=hsg_presets, needs=frozenset({"views", "oversegment"}),
    train=_lazy("usseg_core.heads.hsg_train", "train_hsg_head"),
    load=HsgTrained.from_checkpoint, clusterer=None, retrieval=True, hierarchy=True))
for _variant in ("mlp", "tr"):
    register_head(HeadSpec(
        name=f"cause-{_variant}", summary=CARDS[f"cause-{_variant}"].summary, demo=CARDS[f"cause-{_variant}"].demo,
        sections=(("cause", CauseConfig), ("clusterbook", ClusterbookConfig)), presets=functools.partial(cause_presets, variant=_variant),
        needs=frozenset({"five_crop", "clusterbook"}),
        train=_lazy("usseg_core.heads.cause_train", f"train_cause_{_variant}"),
        load=CauseTrained.from_checkpoint, clusterer="cluster-probe"))
