"""Structured Edges (Dollar & Zitnick, 2015) through OpenCV's ximgproc, the detector HSG uses for COCO.

Optional: the user supplies the trained forest `model.yml.gz` (OpenCV extra test data /
pdollar/edges converted model); nothing is downloaded. Strength is SE's edge probability; orientation
is recomputed from it with the shared ridge-tangent rule so every detector uses one convention.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from usseg_core.edges.base import EdgeDetector, EdgeMap, resolve_weights
from usseg_core.edges.orientation import ridge_tangent
from usseg_core.errors import ConfigError, WeightsError
from usseg_core.store import file_sha256

_HINT = "the Structured Edges forest model.yml.gz (opencv_extra testdata/cv/ximgproc/model.yml.gz)"


class StructuredEdgeDetector(EdgeDetector):
    name = "sed"

    def __init__(self, model_path: Path, orient_sigma: float = 2.0) -> None:
        try:
            import cv2

            self._se = cv2.ximgproc.createStructuredEdgeDetection(str(model_path))
        except AttributeError as exc:
            raise ConfigError("edge detector 'sed' needs opencv-contrib (cv2.ximgproc)") from exc
        except Exception as exc:  # noqa: BLE001 - cv2.error on a bad model file
            raise WeightsError(f"{model_path}: not a Structured Edges model ({exc})") from exc
        self.orient_sigma = orient_sigma
        self.fingerprint = f"sed-v1-{file_sha256(model_path)[:16]}-os{orient_sigma:g}"

    def detect(self, image: np.ndarray) -> EdgeMap:
        s = self._se.detectEdges(image.astype(np.float32) / 255.0)  # expects RGB float in [0, 1]
        s = np.clip(s, 0.0, 1.0).astype(np.float32)
        return EdgeMap(strength=s, orientation=ridge_tangent(s, self.orient_sigma))


def build_sed(weights=None, device="cpu") -> EdgeDetector:
    return StructuredEdgeDetector(resolve_weights("sed", weights, _HINT))
