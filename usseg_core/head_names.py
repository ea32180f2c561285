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
    """

    summary: str
    demo: Mapping[str, Any]

    def __post_init__(self) -> None:
        object.__setattr__(self, "demo", MappingProxyType(dict(self.demo)))


BUILTIN_HEAD_CARDS: dict[str, HeadCard] = {
    "stego": HeadCard("STEGO: correspondence distillation on five-crops + KNN (Hamilton et al. 2022)",
                      {"stego.steps": 100, "stego.batch_size": 8}),
    "omh": HeadCard("OMH: STEGO + optimally matched cluster hierarchy (Sinkhorn between levels)",
                    {"stego.steps": 100, "stego.batch_size": 8}),
    "picie": HeadCard("PiCIE: clustering with photometric invariance and geometric equivariance (Cho et al. 2021)",
                      {"picie.epochs": 4}),
    "hsg": HeadCard("HSG: multiview segment grouping with clustering transformers on UCM segments (Ke et al. 2022)",
                    {"hsg.epochs": 4}),
    # CAUSE's demo: 32 concepts fitted in 1 epoch, 2 front-door epochs and 1 probe epoch of the 200 demo
    # five-crops (batch 8: 25 steps an epoch), a 128-d projection (and feed-forward for TR).
    "cause-mlp": HeadCard("CAUSE-MLP: concept clusterbook + front-door concept-wise contrast, MLP head (Kim et al. 2024)",
                          {"clusterbook.concepts": 32, "clusterbook.batch_size": 8, "cause.epochs": 2,
                           "cause.probe_epochs": 1, "cause.batch_size": 8, "cause.projection_dim": 128}),
    "cause-tr": HeadCard("CAUSE-TR: concept clusterbook + front-door concept-wise contrast, transformer head (Kim et al. 2024)",
                         {"clusterbook.concepts": 32, "clusterbook.batch_size": 8, "cause.epochs": 2,
                          "cause.probe_epochs": 1, "cause.batch_size": 8, "cause.projection_dim": 128,
                          "cause.tr_hidden": 128}),
}

# The derived view the CLI's help reads (no second table): name -> summary.
BUILTIN_HEADS: dict[str, str] = {name: card.summary for name, card in BUILTIN_HEAD_CARDS.items()}
