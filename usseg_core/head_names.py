"""What the CLI knows of each built-in head without importing it (torch): its one-line summary and its demo.

``usseg --help`` and a cached command start without importing the heads; they read this table. The head
registry is built from it: ``usseg_core/heads/builtin.py`` registers each built-in head with its card's
summary and demo (``HeadSpec.summary`` / ``HeadSpec.demo``), and a test pins the names to the registry.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any


@dataclass(frozen=True)
class HeadCard:
    """The torch-free facts of a built-in head.

    Attributes:
        summary: one line for ``--help`` and docs.
        demo: namespaced ``--set`` overrides of a test-sized training (``usseg demo``, the synthetic
            deployments): every head learns something on 40 synthetic images in about a minute.
        in_default_demo: whether a plain ``usseg demo`` (no ``--heads``) runs it; the demo's budget is 3 minutes
            cold on 2 cores (docs/results.md, The demo), and ``usseg demo --heads NAME`` runs any head.
    """

    summary: str
    demo: Mapping[str, Any]
    in_default_demo: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "demo", MappingProxyType(dict(self.demo)))


_CAUSE_DEMO = {"clusterbook.concepts": 32, "clusterbook.batch_size": 8, "cause.front_steps": 10, "cause.probe_steps": 10,
               "cause.batch_size": 8, "cause.projection_dim": 128, "cause.tr_hidden": 128}

BUILTIN_HEAD_CARDS: dict[str, HeadCard] = {
    "stego": HeadCard("STEGO: correspondence distillation on five-crops + KNN (Hamilton et al. 2022)",
                      {"stego.steps": 100, "stego.batch_size": 8}),
    "omh": HeadCard("OMH: STEGO + optimally matched cluster hierarchy (Sinkhorn between levels)",
                    {"stego.steps": 100, "stego.batch_size": 8}),
    "picie": HeadCard("PiCIE: clustering with photometric invariance and geometric equivariance (Cho et al. 2021)",
                      {"picie.epochs": 4}),
    "hsg": HeadCard("HSG: multiview segment grouping with clustering transformers on UCM segments (Ke et al. 2022)",
                    {"hsg.epochs": 4}),
    # CAUSE's demo (one card for both variants: they share their sections, so a comparison routes every
    # cause.* and clusterbook.* override to both): 32 concepts fitted in 1 epoch of the 200 demo five-crops
    # (batch 8: 25 steps), 10 front-door and 10 probe steps, a 128-d projection and a 128-wide TR
    # feed-forward. The TR decoder over 256 tokens of 472 channels takes ~1 s a step on 2 loaded cores.
    "cause-mlp": HeadCard("CAUSE-MLP: concept clusterbook + front-door concept-wise contrast, MLP head (Kim et al. 2024)",
                          _CAUSE_DEMO),
    # CAUSE-TR is not in the plain demo: its decoder's codes of every five-crop (k-means on codes) and its
    # trainings cost ~45 s of the 3-minute budget on 2 cores (210 s cold with it, measured), and 20 steps of
    # it teach little (docs/results.md, The demo); `usseg demo --heads cause-tr` runs it.
    "cause-tr": HeadCard("CAUSE-TR: concept clusterbook + front-door concept-wise contrast, transformer head (Kim et al. 2024)",
                         _CAUSE_DEMO, in_default_demo=False),
}

# The derived views the CLI's help reads (no second table): name -> summary; a plain `usseg demo`'s heads.
BUILTIN_HEADS: dict[str, str] = {name: card.summary for name, card in BUILTIN_HEAD_CARDS.items()}
DEFAULT_DEMO_HEADS: tuple[str, ...] = tuple(name for name, card in BUILTIN_HEAD_CARDS.items() if card.in_default_demo)
