"""The one backbone registry and its factory, :func:`get_backbone` (docs/contributing.md: one registry, one factory)."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from usseg_core.backbones.base import Backbone, resolve_device
from usseg_core.backbones.efficientnet import build_efficientnet
from usseg_core.backbones.specs import BackboneSpec, backbone_spec, list_backbones
from usseg_core.backbones.vit import build_vit
from usseg_core.errors import ConfigError

__all__ = ["get_backbone", "list_backbones"]

# A row's family -> builder(spec, *, weights, random_weights, seed) -> Backbone (on CPU, before freezing)
Builder = Callable[..., Backbone]
BUILDERS: dict[str, Builder] = {"vit": build_vit, "efficientnet": build_efficientnet}


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
    spec: BackboneSpec = backbone_spec(name)
    if random_weights and weights is not None:
        raise ConfigError(
            f"backbone {name!r}: give either weights={str(weights)!r} or random_weights, not both"
        )
    target = resolve_device(device)
    backbone = BUILDERS[spec.family](spec, weights=weights, random_weights=random_weights, seed=seed)
    backbone.eval()
    backbone.requires_grad_(False)
    return backbone.to(target)
