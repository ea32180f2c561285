"""Edge detectors: one registry, one factory (`get_edge_detector`).

Every detector maps an RGB image to an :class:`EdgeMap`, a per-pixel boundary strength in [0, 1] and
the local *tangent* orientation of the edge through that pixel. The orientation convention is shared
by every detector and by the oriented watershed (`usseg_core.ucm`):

    angle theta in [0, pi), measured from the +x axis (image columns, to the right) towards +y
    (image rows, downwards); the edge runs along (cos theta, sin theta) in (x, y) = (col, row).

So a vertical edge (a left/right colour change) has theta = pi/2, a horizontal one theta = 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from usseg_core.errors import ConfigError
from usseg_core.registry import Registry
from usseg_core.store import file_sha256  # noqa: F401  (detectors fingerprint weights with it)

__all__ = [
    "EdgeMap",
    "EdgeDetector",
    "get_edge_detector",
    "list_edge_detectors",
    "BUILTIN_DETECTORS",
    "register_edge_detector",
    "check_image",
]


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


Factory = Callable[..., EdgeDetector]
# The built-in detectors' names, known without importing them (help texts stay torch-free); a test pins
# them to the registry.
BUILTIN_DETECTORS = ("classical", "hed", "pidinet", "pidinet-tiny", "sed")


def _load_builtin() -> None:
    # Imported on the registry's first read so that `import usseg_core.edges` stays cheap (no torch).
    from usseg_core.edges import classical, hed, pidinet, sed  # noqa: F401


DETECTORS: Registry[Factory] = Registry("edge detector", load=_load_builtin)


def register_edge_detector(name: str) -> Callable[[Factory], Factory]:
    """Decorator: register `factory(weights=..., device=...) -> EdgeDetector` under `name`."""

    def deco(factory: Factory) -> Factory:
        return DETECTORS.register(name, factory)

    return deco


def list_edge_detectors() -> list[str]:
    """Names accepted by `get_edge_detector`, sorted."""
    return sorted(DETECTORS.names())


def get_edge_detector(
    name: str, *, weights: str | Path | None = None, device: str = "cpu"
) -> EdgeDetector:
    """Build the edge detector registered as `name`.

    Args:
        name: one of `list_edge_detectors()` ("pidinet", "pidinet-tiny", "classical", "hed", "sed").
        weights: model file for learned detectors (PiDiNet .pth, HED .pth/.caffemodel, SE .yml.gz);
            ignored by "classical".
        device: torch device string for learned detectors ("cpu", "cuda", ...).

    Raises:
        ConfigError: unknown name (the message lists the known ones).
        WeightsError: a learned detector without a usable weights file.
    """
    return DETECTORS.get(name)(weights=weights, device=device)
