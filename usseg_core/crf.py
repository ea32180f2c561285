"""Fully connected dense CRF refinement (Krähenbühl & Koltun), docs/methods/protocol.md S7.

STEGO refines both the cluster-probe and the linear-probe outputs with the pydensecrf mean-field
solver, with parameters borrowed from MaskContrast ([code:STEGO] ``crf.py``). This module runs it on
one image; mapping it over images/workers is the orchestration's job (fork pools deadlock inside
pydensecrf, STEGO #16 -- so no multiprocessing here).

Big images: pydensecrf costs about 200 + 20 K bytes per pixel (6.7 GB at 24 MP for K = 4), so an image of
more than :data:`CRF_MAX_PIXELS` pixels is refined on a grid of at most that many (:func:`crf_grid`, the
image shrunk by area averaging, :func:`crf_image`) and the refined marginals are upsampled back by the
caller (``tasks.evaluate.predict_labels``). [code:STEGO] runs its CRF at the evaluation crop (320 or 448 px),
so a capped grid is closer to the reference than a full-resolution CRF on a photo
(docs/methods/protocol.md S7). Images within the budget are refined at their own size, as before.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from usseg_core.config import positive_int_env


@dataclass(frozen=True)
class CRFParams:
    """Dense CRF parameters; defaults are [code:STEGO] ``crf.py`` (copied by HP, SmooSeg, DepthG, EAGLE, CAUSE)."""

    iterations: int = 10  # [code:STEGO] MAX_ITER = 10 mean-field steps
    gaussian_sxy: float = 1  # [code:STEGO] POS_XY_STD: smoothness kernel width, pixels
    gaussian_compat: float = 3  # [code:STEGO] POS_W
    bilateral_sxy: float = 67  # [code:STEGO] Bi_XY_STD: appearance kernel width, pixels
    bilateral_srgb: float = 3  # [code:STEGO] Bi_RGB_STD: colour width, 0-255 units
    bilateral_compat: float = 4  # [code:STEGO] Bi_W
    prob_floor: float = 1e-5  # [code:STEGO] via pydensecrf.utils.unary_from_softmax(clip=1e-5): caps the unary at ~11.5


# Pixels per band of the unary's float64 log-softmax and of the labels' argmax: their temporaries stay at
# K x BAND_PIXELS whatever the image size (the unary itself is K x H x W float32: pydensecrf needs it whole).
BAND_PIXELS = 1 << 20


# The most pixels the dense CRF runs on (1024 x 1024): images up to 1024 x 768 and 1280 x 800 are refined at
# their own size; a bigger one on the largest grid of its aspect within it. pydensecrf then needs at most
# about (200 + 20 K) MB (300 MB at K = 4, 740 MB at K = 27) whatever the image.
CRF_MAX_PIXELS = 1 << 20
CRF_MAX_PIXELS_ENV = "USSEG_CRF_MAX_PIXELS"


def crf_max_pixels() -> int:
    """The CRF's pixel budget in force: ``$USSEG_CRF_MAX_PIXELS`` if set, else :data:`CRF_MAX_PIXELS`."""
    return positive_int_env(CRF_MAX_PIXELS_ENV, CRF_MAX_PIXELS, "pixels")


def crf_grid(height: int, width: int, max_pixels: int = CRF_MAX_PIXELS) -> tuple[int, int]:
    """(h, w) the CRF runs at for an (height, width) image: the image's own size within ``max_pixels``,
    else both sides scaled by one factor (rounded down, at least 1) so that h * w <= max_pixels."""
    if height * width <= max_pixels:
        return height, width
    scale = math.sqrt(max_pixels / (height * width))
    return max(1, int(height * scale)), max(1, int(width * scale))


def crf_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 image shrunk to ``size`` (h, w) by area averaging (PIL's box filter); unchanged
    when it already has that size."""
    if image.shape[:2] == tuple(size):
        return image
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BOX))


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    """Stable log-softmax over axis 0 (float64 to keep tiny probabilities exact)."""
    z = logits.astype(np.float64) - logits.max(axis=0, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=0, keepdims=True))


def _unary(logits: np.ndarray, prob_floor: float) -> np.ndarray:
    """(K, H*W) float32 ``-log p``, p floored like pydensecrf's ``unary_from_softmax``, one band of rows
    at a time (the log-softmax is per pixel: the same values as on the whole map)."""
    n_labels, height, width = logits.shape
    unary = np.empty((n_labels, height, width), np.float32)
    step = max(1, BAND_PIXELS // max(1, width))
    floor = np.log(prob_floor)
    for r0 in range(0, height, step):
        unary[:, r0:r0 + step] = -np.maximum(_log_softmax(logits[:, r0:r0 + step]), floor)
    return unary.reshape(n_labels, -1)


def _marginals(image: np.ndarray, logits: np.ndarray, params: CRFParams) -> np.ndarray:
    """pydensecrf's (K, H*W) float32 marginals (a view of its own buffer)."""
    import pydensecrf.densecrf as dcrf  # imported here: the CRF is optional for everything else

    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    n_labels, height, width = logits.shape
    if (height, width) != image.shape[:2]:
        raise ValueError(f"logits spatial size {(height, width)} != image size {image.shape[:2]}")

    # -log p with p floored exactly like pydensecrf's unary_from_softmax (what [code:STEGO] calls):
    # without the floor a confident probe gives unaries of hundreds that the pairwise terms never move.
    unary = _unary(logits, params.prob_floor)  # (K, H*W)

    crf = dcrf.DenseCRF2D(width, height, n_labels)
    crf.setUnaryEnergy(unary)
    del unary  # pydensecrf keeps its own copy
    crf.addPairwiseGaussian(sxy=params.gaussian_sxy, compat=params.gaussian_compat)
    # [code:STEGO] crf.py passes BGR (``np.array(to_pil_image(unnorm(img)))[:, :, ::-1]``), and so do we.
    # It matters: the bilateral kernel's widths are the same for all channels, but pydensecrf's
    # permutohedral lattice is an approximation that is not invariant to the order of the feature
    # dimensions -- RGB instead of BGR changes 0.7-2.5 % of the refined labels.
    bgr = np.ascontiguousarray(image[:, :, ::-1])  # a fresh, writeable C-contiguous copy (pydensecrf needs it)
    crf.addPairwiseBilateral(
        sxy=params.bilateral_sxy,
        srgb=params.bilateral_srgb,
        rgbim=bgr,
        compat=params.bilateral_compat,
    )
    return np.asarray(crf.inference(params.iterations), dtype=np.float32)  # (K, H*W), no copy


def dense_crf(image: np.ndarray, logits: np.ndarray, params: CRFParams = CRFParams()) -> np.ndarray:
    """Refine per-pixel class scores with a dense CRF.

    Args:
        image: (H, W, 3) uint8 RGB image (the un-normalised pixels the kernels compare); it is handed
            to pydensecrf as BGR, like [code:STEGO].
        logits: (K, H, W) float unnormalised scores, already at image size (e.g. 2 * cosine for the
            cluster probe, STEGO's convention).
        params: CRF parameters.

    Returns:
        (K, H, W) float32 marginals; each pixel sums to 1. Take ``argmax(0)`` for the labelling
        (:func:`crf_labels` does, without an int64 map).
    """
    n_labels, height, width = logits.shape
    return _marginals(image, logits, params).reshape(n_labels, height, width)  # (K, H, W)


def crf_labels(image: np.ndarray, logits: np.ndarray, params: CRFParams = CRFParams()) -> np.ndarray:
    """``dense_crf(image, logits, params).argmax(0)`` as (H, W) int16 (int32 past 32767 labels), the
    argmax taken one band of pixels at a time."""
    n_labels, height, width = logits.shape
    q = _marginals(image, logits, params)  # (K, H*W)
    labels = np.empty(height * width, np.int16 if n_labels < 2 ** 15 else np.int32)
    for a in range(0, labels.size, BAND_PIXELS):
        labels[a:a + BAND_PIXELS] = q[:, a:a + BAND_PIXELS].argmax(0)
    return labels.reshape(height, width)
