"""What every edge detector is and returns (see the package docstring for the orientation convention).

Kept apart from the package's registry so that the detectors import their base without importing the
registry that lists them.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from usseg_core.errors import ConfigError


@dataclass
class EdgeMap:
    """Boundary strength and tangent orientation of one image.

    Attributes:
        strength: (H, W) float32 in [0, 1]; 1 = surest boundary.
        orientation: (H, W) float32 radians in [0, pi), the edge tangent (see module docstring).
    """

    strength: np.ndarray
    orientation: np.ndarray

    def __post_init__(self) -> None:
        if self.strength.shape != self.orientation.shape or self.strength.ndim != 2:
            raise ConfigError(
                f"EdgeMap: strength {self.strength.shape} and orientation {self.orientation.shape} "
                "must be the same (H, W) shape"
            )


class EdgeDetector:
    """Base class of every edge detector.

    Subclasses set `name` and `fingerprint` (a short string that changes whenever the output would:
    code version, weights hash, parameters; used as a cache key by the pipeline) and implement
    `detect` on a validated image.
    """

    name: str = "base"
    fingerprint: str = "base"

    def __call__(self, image: np.ndarray) -> EdgeMap:
        """Detect edges in `image`, (H, W, 3) uint8 RGB; returns an EdgeMap of size (H, W)."""
        check_image(image)
        return self.detect(image)

    def detect(self, image: np.ndarray) -> EdgeMap:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, fingerprint={self.fingerprint!r})"


def check_image(image: np.ndarray, what: str = "image") -> None:
    """Raise ConfigError unless `image` is an (H, W, 3) uint8 array with H, W >= 2."""
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", type(image).__name__)
        raise ConfigError(f"{what}: expected an (H, W, 3) RGB array, got {shape}")
    if image.dtype != np.uint8:
        raise ConfigError(f"{what}: expected dtype uint8 (0..255 RGB), got {image.dtype}")
    if image.shape[0] < 2 or image.shape[1] < 2:
        raise ConfigError(f"{what}: image of size {image.shape[:2]} is too small (need >= 2x2)")


def resolve_weights(name: str, weights: str | Path | None, hint: str) -> Path:
    """Validate a weights argument once, at entry: it must name an existing file."""
    from usseg_core.errors import WeightsError

    if weights is None:
        raise WeightsError(f"edge detector {name!r} needs a weights file (weights=...): {hint}")
    path = Path(weights)
    if not path.is_file():
        raise WeightsError(f"edge detector {name!r}: weights file {path} does not exist ({hint})")
    return path
