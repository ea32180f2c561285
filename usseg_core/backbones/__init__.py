"""Frozen dense-feature backbones: one registry over timm models and local weight files.

Example::

    bb = get_backbone("vit_small_patch8_224.dino", weights="dino_deitsmall8_pretrain.pth")
    feats = bb(bb.normalize(images))  # images (B, 3, H, W) in [0, 1] -> (B, 384, H/8, W/8)

The spec table (``usseg_core.backbones.specs``) imports without torch; the names below are loaded on first
use, so ``from usseg_core.backbones.specs import backbone_spec`` stays cheap.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "Backbone": "usseg_core.backbones.base",
    "resolve_device": "usseg_core.backbones.base",
    "get_backbone": "usseg_core.backbones.registry",
    "list_backbones": "usseg_core.backbones.specs",
    "BackboneSpec": "usseg_core.backbones.specs",
    "backbone_spec": "usseg_core.backbones.specs",
    "register_backbone": "usseg_core.backbones.specs",
    "fingerprint_state_dict": "usseg_core.backbones.weights",
    "load_weights_file": "usseg_core.backbones.weights",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
