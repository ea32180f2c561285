"""The frozen dense-feature backbone every stage codes against, and device resolution."""
from __future__ import annotations

import timm
import torch

from usseg_core.backbones.specs import BackboneSpec
from usseg_core.device import resolve_device  # noqa: F401  (re-exported: the one device policy)
from usseg_core.errors import ConfigError


class Backbone(torch.nn.Module):
    """A frozen feature extractor giving dense features ``(B, dim, H/stride, W/stride)``.

    Attributes:
        name: registry name (also used in configs, artifact keys and metadata).
        stride: output stride in input pixels (8 or 16 for DINO ViTs, 14 for DINOv2, 8 for the
            EfficientNet dense output).
        dim: channels of the dense output.
        input_multiple: input H and W must be multiples of this (patch size for ViTs, 32 for
            EfficientNet so that its stride-32 map lines up exactly with the stride-8 one).
        mean, std: per-channel input normalisation applied by :meth:`normalize`.
        fingerprint: sha256 hex of the loaded weights, or
            ``"random-init-seed<seed>-<sha256>"`` for randomly initialised weights.
        weights_source: file path, hub name, or ``"random-init"``.
    """

    name: str
    stride: int
    dim: int
    input_multiple: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    fingerprint: str
    weights_source: str

    def _declare(self, spec: BackboneSpec, found: dict[str, object]) -> None:
        """Take name, stride, dim, input multiple and statistics from the row; ``found`` (what the built
        model says, e.g. ``{"stride": 16, "dim": 384}``) must agree with it, or timm changed under us."""
        wrong = {k: (v, getattr(spec, k)) for k, v in found.items() if v != getattr(spec, k)}
        if wrong:
            raise RuntimeError(f"backbone {spec.name!r}: the built model disagrees with its row "
                               f"(field: (model, row)): {wrong}")
        self.name, self.stride, self.dim, self.input_multiple = spec.name, spec.stride, spec.dim, spec.input_multiple
        self.mean, self.std = spec.mean, spec.std

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Map images ``(B, 3, H, W)`` float in [0, 1] to the backbone's normalised input."""
        mean = torch.tensor(self.mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
        return (images - mean) / std

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ConfigError unless ``x`` is ``(B, 3, H, W)`` with H, W multiples of input_multiple."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ConfigError(f"backbone {self.name!r}: expected input (B, 3, H, W), got {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if h % self.input_multiple or w % self.input_multiple:
            raise ConfigError(
                f"backbone {self.name!r}: input size {h}x{w} is not a multiple of "
                f"{self.input_multiple}; resize or crop to a multiple first"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Normalised images ``(B, 3, H, W)`` -> dense features ``(B, dim, H/stride, W/stride)``."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, stride={self.stride}, dim={self.dim}, "
                f"weights_source={self.weights_source!r}, fingerprint={self.fingerprint[:24]!r}")


def create_seeded(name: str, seed: int, **timm_kwargs: object) -> torch.nn.Module:
    """``timm.create_model(name)`` with its random init drawn from ``seed``.

    The init runs inside a forked RNG, so building a backbone never changes the caller's
    random stream.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return timm.create_model(name, pretrained=False, **timm_kwargs)
