"""Deprecated: the backbones' input multiples now live in their rows (``usseg_core.backbones.specs``).

``BUILTIN_INPUT_MULTIPLES`` is derived from that table (no second table) for callers not yet switched to
``backbone_spec(name).input_multiple``; torch-free like the table. Remove once nothing imports it.
"""
from __future__ import annotations

from usseg_core.backbones.specs import BACKBONES

BUILTIN_INPUT_MULTIPLES = {name: spec.input_multiple for name, spec in BACKBONES.items()}
