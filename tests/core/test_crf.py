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


def _direct_pydensecrf(rgbim, logits, p=CRFParams()):
    """pydensecrf called directly with ``rgbim`` as the bilateral image, [code:STEGO] crf.py's recipe."""
    import pydensecrf.densecrf as dcrf

    k, h, w = logits.shape
    z = logits.astype(np.float64) - logits.max(0)
    log_p = z - np.log(np.exp(z).sum(0))
    unary = np.ascontiguousarray(-np.maximum(log_p, np.log(p.prob_floor)).reshape(k, -1), dtype=np.float32)
    d = dcrf.DenseCRF2D(w, h, k)
    d.setUnaryEnergy(unary)
    d.addPairwiseGaussian(sxy=p.gaussian_sxy, compat=p.gaussian_compat)
    d.addPairwiseBilateral(sxy=p.bilateral_sxy, srgb=p.bilateral_srgb, rgbim=np.ascontiguousarray(rgbim),
                           compat=p.bilateral_compat)
    return np.asarray(d.inference(p.iterations), np.float32).reshape(k, h, w)


def test_crf_passes_bgr_like_the_reference():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)  # an RGB image with unequal channels
    logits = rng.normal(0, 1, (4, 40, 56)).astype(np.float32)
    got = dense_crf(img, logits).argmax(0)
    bgr = _direct_pydensecrf(img[:, :, ::-1], logits).argmax(0)
    rgb = _direct_pydensecrf(img, logits).argmax(0)
    np.testing.assert_array_equal(got, bgr)
    assert (bgr != rgb).any()  # the lattice is not channel-order invariant: RGB would give other labels


def test_crf_grid_keeps_small_images_and_caps_big_ones():
    from usseg_core.crf import CRF_MAX_PIXELS, crf_grid

    for size in [(360, 480), (768, 1024), (800, 1280), (1024, 1024)]:
        assert crf_grid(*size) == size  # within the budget: the image's own size
    for h, w in [(4000, 6000), (1025, 1024), (3, 100000), (100000, 1)]:
        gh, gw = crf_grid(h, w)
        assert 1 <= gh <= h and 1 <= gw <= w and gh * gw <= CRF_MAX_PIXELS
        assert abs(gh / gw - h / w) <= max(1 / gw, h / w / gh) + 1e-9  # the aspect, to a pixel
    assert crf_grid(4000, 6000) == (836, 1254)
    assert crf_grid(61, 83, 1200) == (29, 40)


def test_crf_budget_from_the_environment(monkeypatch):
    from usseg_core.crf import CRF_MAX_PIXELS, crf_max_pixels
    from usseg_core.errors import ConfigError

    monkeypatch.delenv("USSEG_CRF_MAX_PIXELS", raising=False)
    assert crf_max_pixels() == CRF_MAX_PIXELS == 1024 * 1024
    monkeypatch.setenv("USSEG_CRF_MAX_PIXELS", "250000")
    assert crf_max_pixels() == 250000
    for bad in ("0", "-3", "1.5e6", "many"):
        monkeypatch.setenv("USSEG_CRF_MAX_PIXELS", bad)
        with pytest.raises(ConfigError, match="USSEG_CRF_MAX_PIXELS"):
            crf_max_pixels()


def test_crf_image_is_the_box_filtered_image():
    from usseg_core.crf import crf_image

    img = np.random.default_rng(2).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    assert crf_image(img, (40, 60)) is img
    half = crf_image(img, (20, 30))  # exact halving: the box filter is the mean of each 2 x 2 block
    means = img.reshape(20, 2, 30, 2, 3).astype(np.float64).mean((1, 3))
    assert half.dtype == np.uint8 and half.shape == (20, 30, 3)
    assert np.abs(half - means).max() <= 1  # PIL rounds in fixed point: within one grey level
