"""DINO / DINOv2 / DINOv3 Vision Transformers as dense backbones.

Dense features are the last block's tokens after the final LayerNorm, patch tokens only (CLS and
register tokens dropped: the row's ``prefix_tokens``), reshaped to the patch grid — STEGO's choice
(docs/methods/stego.md §3.1, [code:STEGO]). DINOv3 (timm's Eva with RoPE) gives its tokens the same way.

A weights file is brought to timm's key layout by the adapter of the row's ``weights_layout``
(``usseg_core/backbones/specs.py``); every adapter also accepts timm's own layout.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import timm
import torch
from timm.layers import resample_abs_pos_embed

from usseg_core.backbones.base import Backbone, create_seeded
from usseg_core.backbones.hub import create_pretrained
from usseg_core.backbones.specs import BackboneSpec
from usseg_core.backbones.weights import fingerprint_state_dict, load_strict, load_weights_file
from usseg_core.errors import WeightsError

# Keys a checkpoint may carry that a dense, head-less backbone has no use for: the classifier of a
# timm model saved with num_classes>0, and DINOv2's masked-image-modelling token.
_IGNORED_KEYS = ("head.weight", "head.bias", "mask_token")


class ViTBackbone(Backbone):
    """A timm VisionTransformer (or Eva) giving patch-token features ``(B, C, H/p, W/p)``."""

    def __init__(self, spec: BackboneSpec, model: torch.nn.Module, fingerprint: str, weights_source: str) -> None:
        super().__init__()
        self.model = model
        patch_h, patch_w = model.patch_embed.patch_size
        assert patch_h == patch_w, "square patches only"
        self._declare(spec, {"stride": patch_h, "input_multiple": patch_h, "dim": model.embed_dim,
                             "prefix_tokens": model.num_prefix_tokens})
        self.prefix_tokens = spec.prefix_tokens
        self.fingerprint = fingerprint
        self.weights_source = weights_source

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images ``(B, 3, H, W)`` -> ``(B, dim, H/p, W/p)``; H, W multiples of p."""
        self.check_input(x)
        b, _, h, w = x.shape
        gh, gw = h // self.stride, w // self.stride
        tokens = self.model.forward_features(x)  # (B, prefix + gh*gw, C), after the final norm
        patches = tokens[:, self.prefix_tokens:]  # (B, gh*gw, C), CLS/registers dropped
        return patches.transpose(1, 2).reshape(b, self.dim, gh, gw)  # (B, C, gh, gw)


def build_vit(
    spec: BackboneSpec, *, weights: str | Path | None, random_weights: bool, seed: int
) -> ViTBackbone:
    """Build a ViT backbone from a local file, the hub, or a seeded random init.

    Args:
        spec: the backbone's row (timm name, patch size, prefix tokens, weights layout).
        weights: local checkpoint (the row's published layout or timm's), or None.
        random_weights: build with random weights (deterministic for ``seed``).
        seed: seed of the random init.
    """
    kwargs = dict(dynamic_img_size=True, num_classes=0)
    if random_weights:
        model = create_seeded(spec.timm_name, seed, **kwargs)
        digest = fingerprint_state_dict(model.state_dict())
        return ViTBackbone(spec, model, f"random-init-seed{seed}-{digest}", "random-init")
    if weights is None:
        model = create_pretrained(spec.timm_name, **kwargs)
        source = f"hub:{spec.timm_name}"
    else:
        state_dict = load_weights_file(weights)
        # built on the meta device: every tensor comes from the file, so a random init is wasted work
        with torch.device("meta"):
            model = timm.create_model(spec.timm_name, pretrained=False, **kwargs)
        adapted = ADAPTERS[spec.weights_layout](state_dict, model, weights)
        load_strict(model, adapted, weights, spec.name)
        source = str(weights)
    return ViTBackbone(spec, model, fingerprint_state_dict(model.state_dict()), source)


def adapt_vit_state_dict(
    state_dict: Mapping[str, torch.Tensor], model: torch.nn.Module, source: str | Path = ""
) -> dict[str, torch.Tensor]:
    """Bring a DINO / DINOv2 / timm ViT state dict to ``model``'s layout (the ``"dino"`` weights layout).

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


def adapt_dinov2_registers(
    state_dict: Mapping[str, torch.Tensor], model: torch.nn.Module, source: str | Path = ""
) -> dict[str, torch.Tensor]:
    """facebookresearch/dinov2 ``*_reg4_pretrain.pth`` -> timm ``*_reg4_dinov2`` (or timm's layout as is).

    DINOv2 adds its position embedding to ``[CLS, patches]`` and inserts the registers after CLS without one;
    timm keeps positions for patches only (``no_embed_class``), so the CLS slot is folded into ``cls_token``.
    """
    if "register_tokens" not in state_dict:
        return adapt_vit_state_dict(state_dict, model)
    out = dict(state_dict)
    pos = out.pop("pos_embed")  # (1, 1 + N, C): the CLS slot, then the patch grid
    out["reg_token"] = out.pop("register_tokens")  # (1, R, C)
    out["cls_token"] = out["cls_token"] + pos[:, :1]  # (1, 1, C)
    out["pos_embed"] = pos[:, 1:]  # (1, N, C)
    return adapt_vit_state_dict(out, model)


def adapt_dinov3(
    state_dict: Mapping[str, torch.Tensor], model: torch.nn.Module, source: str | Path = ""
) -> dict[str, torch.Tensor]:
    """facebookresearch/dinov3 checkpoint -> timm ``*_dinov3`` (Eva), or timm's layout as is.

    Renames ``storage_tokens`` (the registers) and ``ls1/ls2.gamma``; drops the pretraining-only
    ``mask_token``, the constant ``bias_mask`` and ``rope_embed.periods`` (timm recomputes them). DINOv3's
    ``qkv.bias`` is applied with its key third masked to zero (LinearKMaskedBias): its query and value
    parts go to timm's ``q_bias``/``v_bias`` where the model has them; a model without (timm's default
    DINOv3, whose released S/B/L biases are zero) accepts only zeros there, so a non-zero bias is an
    error naming the file instead of weights silently dropped.
    """
    if "storage_tokens" not in state_dict:
        return {k: v for k, v in state_dict.items() if k not in _IGNORED_KEYS}
    expected = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key == "mask_token" or key.startswith("rope_embed.") or key.endswith(".bias_mask"):
            continue
        if key.endswith("attn.qkv.bias"):
            q, _, v = value.chunk(3)  # (C,) each; the key part is masked out by DINOv3
            stem = key.removesuffix("qkv.bias")
            if stem + "q_bias" in expected:
                out[stem + "q_bias"], out[stem + "v_bias"] = q, v
            elif torch.count_nonzero(q) or torch.count_nonzero(v):
                raise WeightsError(f"{source}: {key} holds non-zero query/value biases, which backbone "
                                   f"{type(model).__name__} has no parameters for (timm's *_qkvb DINOv3 has)")
            continue
        key = key.replace("storage_tokens", "reg_token")
        key = key.replace(".ls1.gamma", ".gamma_1").replace(".ls2.gamma", ".gamma_2")
        out[key] = value
    return out


# weights_layout of a row -> adapter(state_dict, model, source) -> state dict in the model's layout
ADAPTERS: dict[str, Callable[..., dict[str, torch.Tensor]]] = {
    "dino": adapt_vit_state_dict,
    "dinov2-reg": adapt_dinov2_registers,
    "dinov3": adapt_dinov3,
}
