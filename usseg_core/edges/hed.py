"""HED (Xie & Tu, 2015) through OpenCV's DNN module (optional; HSG itself does not use HED).

The user supplies the original Caffe release: `hed_pretrained_bsds.caffemodel` with its
`deploy.prototxt` next to it (same folder). Nothing is downloaded. The fused output is the strength;
orientation comes from the shared ridge-tangent rule.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from usseg_core.edges.base import EdgeDetector, EdgeMap, resolve_weights
from usseg_core.edges.orientation import ridge_tangent
from usseg_core.errors import WeightsError
from usseg_core.store import file_sha256

_HINT = "hed_pretrained_bsds.caffemodel with deploy.prototxt in the same folder"
_MEAN_BGR = (104.00698793, 116.66876762, 122.67891434)  # HED's Caffe training mean (BGR)


class _CropLayer:
    """HED's Caffe 'Crop' layer (centre crop to the reference blob), which OpenCV does not provide."""

    def __init__(self, params, blobs):
        self.box = (0, 0, 0, 0)

    def getMemoryShapes(self, inputs):
        (n, c, h, w), (_, _, th, tw) = inputs[0], inputs[1]
        y0, x0 = (h - th) // 2, (w - tw) // 2
        self.box = (y0, x0, y0 + th, x0 + tw)
        return [[n, c, th, tw]]

    def forward(self, inputs):
        y0, x0, y1, x1 = self.box
        return [inputs[0][:, :, y0:y1, x0:x1]]


class HEDDetector(EdgeDetector):
    name = "hed"

    def __init__(self, model_path: Path, orient_sigma: float = 2.0) -> None:
        import cv2

        proto = model_path.with_name("deploy.prototxt")
        if not proto.is_file():
            raise WeightsError(f"{model_path}: HED needs {proto} next to the caffemodel")
        try:
            cv2.dnn_registerLayer("Crop", _CropLayer)
        except Exception:  # noqa: BLE001 - already registered
            pass
        try:
            self._net = cv2.dnn.readNetFromCaffe(str(proto), str(model_path))
        except Exception as exc:  # noqa: BLE001
            raise WeightsError(f"{model_path}: cannot load HED Caffe model ({exc})") from exc
        self.orient_sigma = orient_sigma
        self.fingerprint = f"hed-v1-{file_sha256(model_path)[:16]}-os{orient_sigma:g}"

    def detect(self, image: np.ndarray) -> EdgeMap:
        import cv2

        h, w = image.shape[:2]
        blob = cv2.dnn.blobFromImage(image[:, :, ::-1].copy(), 1.0, (w, h), _MEAN_BGR, swapRB=False)
        self._net.setInput(blob)
        s = np.clip(self._net.forward()[0, 0], 0.0, 1.0).astype(np.float32)  # (H, W)
        return EdgeMap(strength=s, orientation=ridge_tangent(s, self.orient_sigma))


def build_hed(weights=None, device="cpu") -> EdgeDetector:
    return HEDDetector(resolve_weights("hed", weights, _HINT))
