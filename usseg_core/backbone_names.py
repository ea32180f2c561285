"""The built-in backbones' input multiples, importable without torch or timm.

A cached command resolves a full-frame view's size (a multiple of the backbone's input multiple) before
any backbone is needed; reading it here keeps that look-up from importing timm and torchvision. A test
pins this table to ``usseg_core.backbones.registry``; a backbone not listed here (a plugin) is looked up
in the registry.
"""
from __future__ import annotations

BUILTIN_INPUT_MULTIPLES = {
    "tf_efficientnet_lite0": 32,  # its stride-32 stage
    "vit_small_patch8_224.dino": 8,
    "vit_small_patch16_224.dino": 16,
    "vit_base_patch8_224.dino": 8,
    "vit_base_patch16_224.dino": 16,
    "vit_small_patch14_dinov2.lvd142m": 14,
    "vit_base_patch14_dinov2.lvd142m": 14,
}
