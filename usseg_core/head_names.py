"""The built-in heads' names and one-line summaries, importable without torch.

The CLI's help texts read them here, so that ``usseg --help`` and a cached command start without
importing the heads (torch). ``usseg_core/heads/builtin.py`` registers each head with the summary written
here, and a test pins these names to the registry.
"""
from __future__ import annotations

BUILTIN_HEADS = {
    "stego": "STEGO: correspondence distillation on five-crops + KNN (Hamilton et al. 2022)",
    "omh": "OMH: STEGO + optimally matched cluster hierarchy (Sinkhorn between levels)",
    "picie": "PiCIE: clustering with photometric invariance and geometric equivariance (Cho et al. 2021)",
    "hsg": "HSG: multiview segment grouping with clustering transformers on UCM segments (Ke et al. 2022)",
}
