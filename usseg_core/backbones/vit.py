"""DINO / DINOv2 Vision Transformers as dense backbones.

Dense features are the last block's tokens after the final LayerNorm, patch tokens only (CLS and
register tokens dropped), reshaped to the patch grid — STEGO's choice (METHODS.md §3.1,
[code:STEGO]).
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import timm
import torch
from timm.layers import resample_abs_pos_embed

from usseg_core.backbones.base import Backbone, create_seeded
from usseg_core.backbones.hub import create_pretrained
from usseg_core.backbones.weights import fingerprint_state_dict, load_strict, load_weights_file

# DINO and DINOv2 both normalise with the ImageNet statistics (DINO main_dino.py; timm pretrained_cfg).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Keys a checkpoint may carry that a dense, head-less backbone has no use for: the classifier of a
# timm model saved with num_classes>0, and DINOv2's masked-image-modelling token.
_IGNORED_KEYS = ("head.weight", "head.bias", "mask_token")


class ViTBackbone(Backbone):
    """A timm VisionTransformer giving patch-token features ``(B, C, H/p, W/p)``."""

    def __init__(self, name: str, model: torch.nn.Module, fingerprint: str, weights_source: str) -> None:
        super().__init__()
        self.model = model
        self.name = name
        patch_h, patch_w = model.patch_embed.patch_size
        assert patch_h == patch_w, "square patches only"
        self.stride = patch_h
        self.input_multiple = patch_h
        self.dim = model.embed_dim
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        self.fingerprint = fingerprint
        self.weights_source = weights_source

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images ``(B, 3, H, W)`` -> ``(B, dim, H/p, W/p)``; H, W multiples of p."""
        self.check_input(x)
        b, _, h, w = x.shape
        gh, gw = h // self.stride, w // self.stride
        tokens = self.model.forward_features(x)  # (B, prefix + gh*gw, C), after the final norm
        patches = tokens[:, self.model.num_prefix_tokens:]  # (B, gh*gw, C), CLS/registers dropped
        return patches.transpose(1, 2).reshape(b, self.dim, gh, gw)  # (B, C, gh, gw)


def build_vit(
    name: str, *, weights: str | Path | None, random_weights: bool, seed: int
) -> ViTBackbone:
    """Build a ViT backbone from a local file, the hub, or a seeded random init.

    Args:
        name: timm model name (e.g. ``vit_small_patch8_224.dino``).
        weights: local checkpoint (DINO or timm key layout), or None.
        random_weights: build with random weights (deterministic for ``seed``).
        seed: seed of the random init.
    """
    kwargs = dict(dynamic_img_size=True, num_classes=0)
    if random_weights:
        model = create_seeded(name, seed, **kwargs)
        digest = fingerprint_state_dict(model.state_dict())
        return ViTBackbone(name, model, f"random-init-seed{seed}-{digest}", "random-init")
    if weights is None:
        model = create_pretrained(name, **kwargs)
        source = f"hub:{name}"
    else:
        state_dict = load_weights_file(weights)
        # built on the meta device: every tensor comes from the file, so a random init is wasted work
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False, **kwargs)
        load_strict(model, adapt_vit_state_dict(state_dict, model), weights, name)
        source = str(weights)
    return ViTBackbone(name, model, fingerprint_state_dict(model.state_dict()), source)


def adapt_vit_state_dict(
    state_dict: Mapping[str, torch.Tensor], model: torch.nn.Module
) -> dict[str, torch.Tensor]:
    """Bring a DINO / DINOv2 / timm ViT state dict to ``model``'s layout.

    Drops classifier and mask tokens, and resamples a ``pos_embed`` trained on another grid (e.g.
    DINOv2's 37x37 at 518 px) to the model's grid — with ``dynamic_img_size`` timm then
    interpolates it again per input size at run time. Everything else must already match and is
    checked strictly by the caller.
    """
    out = {k: v for k, v in state_dict.items() if k not in _IGNORED_KEYS}
    pos = out.get("pos_embed")
    if pos is not None and pos.ndim == 3 and pos.shape != model.pos_embed.shape:
        prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
        side = int(round((pos.shape[1] - prefix) ** 0.5))
        # resample only a square grid with the model's width; anything else is reported as a
        # shape mismatch by the strict check instead of being silently reshaped
        if side * side == pos.shape[1] - prefix and pos.shape[2] == model.pos_embed.shape[2]:
            out["pos_embed"] = resample_abs_pos_embed(
                pos, new_size=list(model.patch_embed.grid_size), old_size=[side, side],
                num_prefix_tokens=prefix,
            )  # (1, prefix + gh*gw, C)
    return out

