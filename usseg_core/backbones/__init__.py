"""Frozen dense-feature backbones: one registry over timm models and local weight files.

Example::

    bb = get_backbone("vit_small_patch8_224.dino", weights="dino_deitsmall8_pretrain.pth")
    feats = bb(bb.normalize(images))  # images (B, 3, H, W) in [0, 1] -> (B, 384, H/8, W/8)
"""
from usseg_core.backbones.base import Backbone, resolve_device
from usseg_core.backbones.registry import get_backbone, list_backbones
from usseg_core.backbones.weights import fingerprint_state_dict, load_weights_file

__all__ = [
    "Backbone",
    "fingerprint_state_dict",
    "get_backbone",
    "list_backbones",
    "load_weights_file",
    "resolve_device",
]
