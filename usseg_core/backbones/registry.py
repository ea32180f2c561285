"""The one backbone registry and its factory, :func:`get_backbone` (STYLE.md: one registry, one factory)."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from usseg_core.backbones.base import Backbone, resolve_device
from usseg_core.backbones.efficientnet import build_efficientnet
from usseg_core.backbones.vit import build_vit
from usseg_core.errors import ConfigError
from usseg_core.registry import Registry

# builder(name, *, weights, random_weights, seed) -> Backbone (on CPU, before freezing)
Builder = Callable[..., Backbone]

_BUILTIN: dict[str, Builder] = {
    # DINO ViTs (Caron et al. 2021); STEGO's main runs use ViT-S/8 and ViT-B/8 (METHODS.md §3.1)
    "vit_small_patch8_224.dino": build_vit,
    "vit_small_patch16_224.dino": build_vit,
    "vit_base_patch8_224.dino": build_vit,
    "vit_base_patch16_224.dino": build_vit,
    # DINOv2 (Oquab et al. 2023), patch 14
    "vit_small_patch14_dinov2.lvd142m": build_vit,
    "vit_base_patch14_dinov2.lvd142m": build_vit,
    # ImageNet EfficientNet-Lite0: the one pretrained backbone available offline here
    "tf_efficientnet_lite0": build_efficientnet,
}
BACKBONES: Registry[Builder] = Registry("backbone")
for _name, _builder in _BUILTIN.items():
    BACKBONES.register(_name, _builder)


def list_backbones() -> list[str]:
    """Registry names accepted by :func:`get_backbone`, sorted."""
    return sorted(BACKBONES.names())


def get_backbone(
    name: str,
    *,
    weights: str | Path | None = None,
    random_weights: bool = False,
    device: str = "auto",
    seed: int = 0,
) -> Backbone:
    """Build a frozen backbone by registry name.

    Args:
        name: a name from :func:`list_backbones`.
        weights: local checkpoint file (.pth/.pt/.bin/.ckpt/.safetensors). When None: the hub for
            ViTs (failing with a WeightsError offline), the bundled package weights for
            ``tf_efficientnet_lite0``.
        random_weights: randomly initialised weights, deterministic for ``seed``; the fingerprint
            then starts with ``random-init``.
        device: ``"auto"`` (cuda if available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        seed: seed of the random init (ignored otherwise).

    Returns:
        The backbone in eval mode, every parameter with ``requires_grad=False``, on ``device``.

    Raises:
        ConfigError: unknown name, bad device, or both ``weights`` and ``random_weights``.
        WeightsError: weights missing, unreadable or not fitting the architecture.
    """
    builder = BACKBONES.get(name)
    if random_weights and weights is not None:
        raise ConfigError(
            f"backbone {name!r}: give either weights={str(weights)!r} or random_weights, not both"
        )
    target = resolve_device(device)
    backbone = builder(name, weights=weights, random_weights=random_weights, seed=seed)
    backbone.eval()
    backbone.requires_grad_(False)
    return backbone.to(target)


def backbone_input_multiple(name: str) -> int:
    """Input-size multiple of a registry backbone, known without building it (cache look-ups stay cheap).

    ViTs need sides divisible by their patch size; EfficientNet-Lite0's stride-32 stage needs 32.
    """
    import re

    if BACKBONES.get(name) is build_efficientnet:
        return 32
    return int(re.search(r"patch(\d+)", name).group(1))  # type: ignore[union-attr]
