"""View bank core: seeded draws, rendering against prepare_item / torchvision, replay of G on maps."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF

from usseg_core.errors import ConfigError
from usseg_core.viewbank import (Geometry, Photometric, ViewBankConfig, ViewDraw, apply_photometric,
                                 base_region, draw_views, render_view, summarize_draws, warp_labels,
                                 warp_maps)
from usseg_core.views import ViewSpec, prepare_item

pytestmark = pytest.mark.usefixtures("one_thread")


def _smooth(h: int, w: int, grid: int = 4, seed: int = 0) -> np.ndarray:
    """Low-frequency RGB image: ``grid`` x ``grid`` noise, bicubic-upsampled -> (h, w, 3) uint8."""
    t = torch.from_numpy(np.random.default_rng(seed).random((1, 3, grid, grid))).float()
    t = F.interpolate(t, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)[0]
    return (t.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)


def _geometric_only(draw: ViewDraw) -> ViewDraw:
    return ViewDraw(Photometric(), draw.geometry)


# --- draws ---------------------------------------------------------------------------------------

def test_draws_are_seeded_per_image_and_view():
    cfg = ViewBankConfig(n_views=4)
    a = draw_views(cfg, "img_001", (64, 96))
    assert a == draw_views(cfg, "img_001", (64, 96))  # deterministic
    assert len(a) == 4 and len({json.dumps(d.to_dict()) for d in a}) == 4  # views differ
    assert draw_views(ViewBankConfig(n_views=4, seed=1), "img_001", (64, 96)) != a  # seeds differ
    assert draw_views(cfg, "img_002", (64, 96)) != a  # images differ
    # more views or other images change nothing of this image's first views
    assert draw_views(ViewBankConfig(n_views=6), "img_001", (64, 96))[:4] == a


def test_draws_follow_the_configured_probabilities_and_ranges():
    cfg = ViewBankConfig(n_views=1)
    H, W = 64, 96
    draws = [draw_views(cfg, f"im{i}", (H, W))[0] for i in range(2000)]
    s = summarize_draws([[d] for d in draws])
    assert abs(s["flipped"] - 0.5) < 0.05 and abs(s["gray"] - 0.2) < 0.04
    assert abs(s["jittered"] - 0.8) < 0.04 and abs(s["blurred"] - 0.5) < 0.05
    assert abs(s["mean_crop_side"] - 0.75) < 0.02  # r ~ U[0.5, 1]
    for d in draws:
        t, l, h, w = d.geometry.box
        assert 0 <= t and t + h <= 1 + 1e-12 and 0 <= l and l + w <= 1 + 1e-12
        for frac, side in ((t, H), (l, W), (h, H), (w, W)):  # whole pixels of the base frame
            assert abs(frac * side - round(frac * side)) < 1e-9
        assert 0.5 - 1 / H <= h <= 1 and abs(h * H / (w * W) - H / W) < 0.03  # one side factor r
        p = d.photometric
        if p.blur_sigma is not None:
            assert 0.1 <= p.blur_sigma <= 2.0
        if p.jitter is not None:
            assert all(0.7 <= p.jitter[k] <= 1.3 for k in ("brightness", "contrast", "saturation"))
            assert -0.1 <= p.jitter["hue"] <= 0.1 and sorted(p.jitter["order"]) == [0, 1, 2, 3]


def test_json_round_trips_and_config_validation():
    cfg = ViewBankConfig(n_views=3, seed=7, crop_scale=(0.6, 0.9))
    assert ViewBankConfig.from_params(json.loads(json.dumps(cfg.params()))) == cfg
    for d in draw_views(cfg, "x", (32, 48)):
        assert ViewDraw.from_dict(json.loads(json.dumps(d.to_dict()))) == d
    for bad, field in (({"n_views": 0}, "n_views"), ({"gray_p": 1.5}, "gray_p"),
                       ({"crop_scale": (0.5, 1.2)}, "crop_scale"), ({"blur_sigma": (0.0, 2.0)}, "blur_sigma"),
                       ({"jitter": (0.3, 0.3, 0.3)}, "jitter"), ({"seed": -1}, "seed")):
        with pytest.raises(ConfigError, match=field):
            ViewBankConfig(**bad)
    with pytest.raises(ConfigError, match="base view"):
        base_region((10, 10), ViewSpec("five_crop", 8))


# --- rendering -----------------------------------------------------------------------------------

def test_identity_view_is_prepare_item():
    noise = np.random.default_rng(0).integers(0, 256, (60, 90, 3), dtype=np.uint8)
    # exact where no resampling differs: full views, and centre crops whose short side is the resolution
    for view in (ViewSpec("full", None, size=(60, 90)), ViewSpec("full", None, size=(32, 48)),
                 ViewSpec("full", None, size=(32, 48), flip=True), ViewSpec("center_crop", 60)):
        for geometric in (False, True):
            assert torch.equal(render_view(noise, view, None, geometric=geometric), prepare_item(noise, view))
    # centre crop + downscale: crop-then-resize vs resize-then-crop differ only where the antialias
    # filter meets the crop border; on a smooth image that is < 0.02 (max) and < 0.002 (mean)
    for hw, res in (((64, 96), 32), ((120, 200), 64), ((96, 64), 32)):
        img, view = _smooth(*hw), ViewSpec("center_crop", res)
        diff = (render_view(img, view, None, geometric=True) - prepare_item(img, view)).abs()
        assert diff.max() < 0.02 and diff.mean() < 0.002, (hw, diff.max(), diff.mean())
    assert base_region((64, 96), ViewSpec("center_crop", 32)) == (0, 16, 64, 64)
    assert base_region((64, 96), ViewSpec("full", None, size=(32, 48))) == (0, 0, 64, 96)


def test_warped_view_cuts_the_recorded_box_of_the_image():
    img = np.random.default_rng(1).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    view = ViewSpec("full", None, size=(64, 96))  # base frame = image pixels, so the cut is exact
    geom = Geometry((16 / 64, 24 / 96, 32 / 64, 48 / 96), flip=True)
    out = render_view(img, view, ViewDraw(Photometric(), geom), geometric=True)
    crop = torch.from_numpy(img[16:48, 24:72].copy()).permute(2, 0, 1).float()[None] / 255
    ref = F.interpolate(crop, size=(64, 96), mode="bilinear", align_corners=False, antialias=True)[0]
    assert torch.allclose(out, ref.flip(-1).clamp(0, 1), atol=1e-6)
    # a mirrored base view mirrors the box: its warped view is the mirror of the unmirrored one's
    mirrored = render_view(img, ViewSpec("full", None, size=(64, 96), flip=True),
                           ViewDraw(Photometric(), Geometry((16 / 64, 1 - 24 / 96 - 48 / 96, 0.5, 0.5))),
                           geometric=True)
    assert torch.allclose(mirrored, out, atol=1e-6)


def test_photometric_ops_are_torchvision_in_the_recorded_order():
    img = torch.from_numpy(_smooth(32, 32, grid=8)).permute(2, 0, 1).float() / 255
    jit = {"brightness": 1.2, "contrast": 0.8, "saturation": 1.25, "hue": -0.05, "order": [3, 0, 2, 1]}
    ref = TF.adjust_hue(img, -0.05)  # order 3, 0, 2, 1 = hue, brightness, saturation, contrast
    ref = TF.adjust_contrast(TF.adjust_saturation(TF.adjust_brightness(ref, 1.2), 1.25), 0.8)
    ref = TF.rgb_to_grayscale(ref, num_output_channels=3)
    ref = TF.gaussian_blur(ref, kernel_size=[11, 11], sigma=[1.5, 1.5])
    out = apply_photometric(img, Photometric(jit, gray=True, blur_sigma=1.5))  # kernel 2 ceil(4.5) + 1 = 11
    assert torch.allclose(out, ref, atol=1e-5)
    # brightness f multiplies (then clamps); grayscale has three equal channels
    bright = apply_photometric(img, Photometric({**jit, "contrast": 1.0, "saturation": 1.0, "hue": 0.0}))
    assert torch.allclose(bright, (img * 1.2).clamp(0, 1), atol=1e-6)
    gray = apply_photometric(img, Photometric(gray=True))
    assert torch.equal(gray, TF.rgb_to_grayscale(img, 3)) and torch.equal(gray[0], gray[2])
    # the plain view is P of the base frame
    raw = _smooth(40, 60)
    view, draw = ViewSpec("full", None, size=(40, 60)), ViewDraw(Photometric(jit, True, 1.0), Geometry())
    assert torch.allclose(render_view(raw, view, draw, geometric=False),
                          apply_photometric(prepare_item(raw, view), draw.photometric), atol=1e-6)


def test_warped_photometry_is_the_base_frames():
    """G(P(x)) == P'(G(x)): contrast reads the base frame's mean grey, blur sigma scales with the zoom."""
    img, view = _smooth(128, 128), ViewSpec("full", None, size=(128, 128))
    geom = Geometry((0.25, 0.25, 0.5, 0.5))
    for p in (Photometric({"brightness": 1.0, "contrast": 0.6, "saturation": 1.0, "hue": 0.0,
                           "order": [0, 1, 2, 3]}), Photometric(blur_sigma=2.0)):
        warped = render_view(img, view, ViewDraw(p, geom), geometric=True)
        plain = render_view(img, view, ViewDraw(p, Geometry()), geometric=False)
        replay = warp_maps(plain[None], [geom])[0]  # G applied to P(x) on the image grid
        naive = apply_photometric(render_view(img, view, _geometric_only(ViewDraw(p, geom)), geometric=True), p)
        inner = (slice(None), slice(16, -16), slice(16, -16))  # away from the crop's border
        # measured ~1e-7 (contrast) and ~6e-5 (blur); P applied to the crop as if it were the frame: > 0.005
        assert (warped - replay)[inner].abs().max() < 0.002
        assert (naive - replay)[inner].abs().max() > 0.005


# --- replay of G on maps -------------------------------------------------------------------------

@pytest.mark.parametrize("hw,view", [((128, 128), ViewSpec("full", None, size=(128, 128))),
                                     ((128, 192), ViewSpec("center_crop", 128))])
def test_replayed_geometry_matches_the_image_space_warp(hw, view):
    """warp_maps(pool(plain)) vs pool(warped view): stride-8 average pooling as the "backbone".

    Tolerance on a smooth image (4 x 4 noise upsampled): mean abs error < 0.02 and max < 0.1 per draw
    (bilinear interpolation of pooled cells vs the pooled warp; measured ~0.009 / 0.05). The wrong
    geometry (flip toggled) is far off (mean > 0.1), so the test can tell.
    """
    img = _smooth(*hw)
    pooled_plain = F.avg_pool2d(render_view(img, view, None, geometric=False)[None], 8)  # (1, 3, 16, 16)
    cfg, flips = ViewBankConfig(n_views=1), set()
    for k in range(12):
        draw = draw_views(cfg, f"im{k}", view.output_size())[0]
        flips.add(draw.geometry.flip)
        pooled_warped = F.avg_pool2d(render_view(img, view, _geometric_only(draw), geometric=True)[None], 8)
        err = (warp_maps(pooled_plain, [draw.geometry]) - pooled_warped).abs()
        assert err.mean() < 0.02 and err.max() < 0.1, (k, draw.geometry, err.mean(), err.max())
        wrong = Geometry(draw.geometry.box, not draw.geometry.flip)
        assert (warp_maps(pooled_plain, [wrong]) - pooled_warped).abs().mean() > 0.1
    assert flips == {True, False}


def test_warp_maps_batches_and_output_size():
    maps = torch.randn(3, 5, 8, 12)
    geoms = [g.geometry for g in draw_views(ViewBankConfig(n_views=3), "a", (8, 12))]
    out = warp_maps(maps, geoms, out_size=(16, 24))
    assert out.shape == (3, 5, 16, 24)
    for b in range(3):
        assert torch.allclose(out[b], warp_maps(maps[b:b + 1], [geoms[b]], (16, 24))[0])
    assert torch.allclose(warp_maps(maps, [Geometry()] * 3), maps, atol=1e-6)  # identity
    with pytest.raises(ConfigError):
        warp_maps(maps, geoms[:2])


def test_label_maps_warp_onto_the_same_pixels():
    h, w = 24, 36
    pos = (np.arange(h)[:, None] * w + np.arange(w)[None, :]).astype(np.int64)  # label = y * w + x
    draws = draw_views(ViewBankConfig(n_views=8), "lab", (h, w))
    assert {d.geometry.flip for d in draws} == {True, False}
    for d in draws:
        g = d.geometry
        for out_hw in ((h, w), (48, 72), (7, 11)):
            out = warp_labels(pos, g, out_hw)
            assert out.shape == out_hw and out.dtype == pos.dtype
            sy, sx = np.divmod(out, w)  # source pixel of every output pixel
            H, W = out_hw
            xs = (W - 1 - np.arange(W)) if g.flip else np.arange(W)
            ty = (g.box[0] + (np.arange(H) + 0.5) / H * g.box[2]) * h - 0.5  # continuous source, pixel units
            tx = (g.box[1] + (xs + 0.5) / W * g.box[3]) * w - 0.5
            assert np.abs(sy - ty[:, None]).max() <= 0.5 + 1e-9 and np.abs(sx - tx[None, :]).max() <= 0.5 + 1e-9
        # a warp at 3x the resolution, subsampled at the centre of each 3 x 3 block, is the low-res warp
        # (same sample points: (3j + 1 + 0.5) / 3H == (j + 0.5) / H), exactly
        fine = warp_labels(pos, g, (3 * 8, 3 * 12))
        assert np.array_equal(fine[1::3, 1::3], warp_labels(pos, g, (8, 12)))
    # torch in, torch out; batched; labels never blend (only source values appear)
    seg = torch.randint(0, 5, (2, h, w), dtype=torch.int32)
    out = warp_labels(seg, [draws[0].geometry, draws[1].geometry], (30, 40))
    assert out.shape == (2, 30, 40) and out.dtype == torch.int32
    assert torch.equal(out[1], warp_labels(seg[1], draws[1].geometry, (30, 40)))
    onehot = F.one_hot(seg.long(), 5).permute(0, 3, 1, 2).float()
    nearest = warp_maps(onehot, [draws[0].geometry, draws[1].geometry], (30, 40), mode="nearest")
    assert torch.equal(nearest.argmax(1).int(), out)  # nearest warp_maps == warp_labels
