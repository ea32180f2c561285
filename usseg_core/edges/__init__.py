"""Edge detectors: one registry, one factory (`get_edge_detector`).

Every detector maps an RGB image to an :class:`EdgeMap`, a per-pixel boundary strength in [0, 1] and
the local *tangent* orientation of the edge through that pixel. The orientation convention is shared
by every detector and by the oriented watershed (`usseg_core.ucm`):

    angle theta in [0, pi), measured from the +x axis (image columns, to the right) towards +y
    (image rows, downwards); the edge runs along (cos theta, sin theta) in (x, y) = (col, row).

So a vertical edge (a left/right colour change) has theta = pi/2, a horizontal one theta = 0.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable

from usseg_core.edges.base import EdgeDetector, EdgeMap, check_image, resolve_weights
from usseg_core.registry import Registry

__all__ = [
    "EdgeMap",
    "EdgeDetector",
    "get_edge_detector",
    "list_edge_detectors",
    "BUILTIN_DETECTORS",
    "register_edge_detector",
    "check_image",
    "resolve_weights",
]


Factory = Callable[..., EdgeDetector]
# The built-in detectors: name -> (module of this package, factory). Each module is imported on the
# detector's first use (the learned ones import torch), so names and help texts stay torch-free.
BUILTIN_FACTORIES = {
    "classical": ("classical", "build_classical"),
    "hed": ("hed", "build_hed"),
    "pidinet": ("pidinet", "build_pidinet"),
    "pidinet-tiny": ("pidinet", "build_pidinet_tiny"),
    "sed": ("sed", "build_sed"),
}
BUILTIN_DETECTORS = tuple(BUILTIN_FACTORIES)


def _lazy(module: str, attr: str) -> Factory:
    def factory(weights=None, device="cpu") -> EdgeDetector:
        return getattr(importlib.import_module(f"{__name__}.{module}"), attr)(weights=weights, device=device)

    factory.__qualname__ = f"{module}.{attr}"
    return factory


DETECTORS: Registry[Factory] = Registry("edge detector")
for _name, (_module, _attr) in BUILTIN_FACTORIES.items():
    DETECTORS.register(_name, _lazy(_module, _attr))


def register_edge_detector(name: str) -> Callable[[Factory], Factory]:
    """Decorator: register `factory(weights=..., device=...) -> EdgeDetector` under `name` (a plugin's
    detector; the built-ins are declared in :data:`BUILTIN_FACTORIES`)."""

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
