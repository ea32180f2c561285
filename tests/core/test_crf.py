"""dense_crf cleans a noisy labelling of a two-colour image and returns normalised marginals."""
import numpy as np
import pytest

pytest.importorskip("pydensecrf.densecrf", reason="pydensecrf2 is not installed (the CRF is optional)")

from usseg_core.crf import CRFParams, dense_crf  # noqa: E402


def _two_colour_scene(rng):
    h, w = 48, 64
    gt = np.zeros((h, w), np.int64)
    gt[:, 36:] = 1
    gt[8:30, 6:20] = 1  # a blob of class 1 inside class 0
    colours = np.array([[30, 60, 200], [200, 40, 40]])
    img = colours[gt] + rng.normal(0, 4, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8), gt


def test_crf_fixes_noisy_logits():
    rng = np.random.default_rng(0)
    img, gt = _two_colour_scene(rng)
    logits = np.stack([gt == 0, gt == 1]).astype(np.float32) + rng.normal(0, 1.0, (2, *gt.shape))
    before = (logits.argmax(0) == gt).mean()
    q = dense_crf(img, logits)
    after = (q.argmax(0) == gt).mean()
    assert q.shape == (2, *gt.shape) and q.dtype == np.float32
    np.testing.assert_allclose(q.sum(0), 1.0, atol=1e-4)
    assert (q >= 0).all()
    assert before < 0.85  # the input really is noisy
    assert after > before and after > 0.95


def test_crf_zero_iterations_is_softmax_of_logits():
    rng = np.random.default_rng(1)
    img, gt = _two_colour_scene(rng)
    logits = rng.normal(0, 1, (3, *gt.shape)).astype(np.float32)
    q = dense_crf(img, logits, CRFParams(iterations=0))
    soft = np.exp(logits - logits.max(0)) / np.exp(logits - logits.max(0)).sum(0)
    np.testing.assert_allclose(q, soft, atol=1e-5)


def test_crf_rejects_mismatched_sizes():
    img = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="size"):
        dense_crf(img, np.zeros((2, 8, 9), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        dense_crf(img.astype(np.float32), np.zeros((2, 8, 8), np.float32))
