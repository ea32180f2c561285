import numpy as np
import pytest

from usseg_core.errors import ConfigError
from usseg_core.crops import center_crop_box, short_side_resize_size
from usseg_core.views import ViewSpec, prepare_image_for_label, prepare_item, prepare_label, resolve_full_size


def _img(h=60, w=90):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_center_crop_geometry_matches_label():
    img = _img()
    label = np.arange(60 * 90).reshape(60, 90) % 7 - 1
    view = ViewSpec("center_crop", 32)
    t = prepare_item(img, view)
    assert t.shape == (3, 32, 32) and 0 <= float(t.min()) and float(t.max()) <= 1
    lab = prepare_label(label, view)
    assert lab.shape == (32, 32) and lab.dtype == label.dtype
    assert set(np.unique(lab)) <= set(np.unique(label))  # nearest keeps values (and -1)
    assert prepare_image_for_label(img, view).shape == (32, 32, 3)


def test_short_side_and_center_box_follow_torchvision():
    assert short_side_resize_size(360, 480, 320) == (320, 426)
    assert short_side_resize_size(480, 360, 320) == (426, 320)
    assert center_crop_box(320, 426, 320) == (0, 53, 320, 320)


def test_five_crop_items_and_flip():
    img = _img(64, 96)
    view = ViewSpec("five_crop", 16)
    assert view.per_image == 5
    crops = [prepare_item(img, view, i) for i in range(5)]
    assert all(c.shape == (3, 16, 16) for c in crops)
    flipped = prepare_item(img, view.flipped(), 2)
    assert np.array_equal(flipped.numpy(), crops[2].flip(-1).numpy())


def test_full_view_size_resolution():
    v = resolve_full_size(ViewSpec("full", None), (360, 480), 32)
    assert v.size == (352, 480)
    v8 = resolve_full_size(ViewSpec("full", None), (360, 480), 8)
    assert v8.size == (360, 480)
    label = np.zeros((360, 480), dtype=np.int64)
    assert prepare_label(label, v8).shape == (360, 480)  # labels keep their size under full views
    assert prepare_item(_img(360, 480), v).shape == (3, 352, 480)
    with pytest.raises(ConfigError):
        ViewSpec("full", None).output_size()


def test_bad_views_are_refused():
    with pytest.raises(ConfigError, match="policy"):
        ViewSpec("zoom", 224)
    with pytest.raises(ConfigError, match="multiple"):
        ViewSpec("center_crop", 100).check_multiple(8)


def test_from_params_inverts_params_through_json():
    import json

    for view in (ViewSpec("five_crop", 224), ViewSpec("full", None, size=(352, 480), flip=True),
                 ViewSpec("center_crop", 320, crop_ratio=0.25)):
        assert ViewSpec.from_params(json.loads(json.dumps(view.params()))) == view


def test_five_crop_short_side_is_the_references_resize_then_centre_crop():
    """STEGO saves each five-crop at native size, then loads it through Resize(res) + CenterCrop(res)."""
    import torch
    import torch.nn.functional as F

    from usseg_core.crops import five_crop_boxes

    img = _img(60, 90)  # crops 30 x 45: the short side (30) -> 16, the long side -> int(16 * 45 / 30) = 24
    short, squash = ViewSpec("five_crop", 16), ViewSpec("five_crop", 16, crop_resize="squash")
    assert short.crop_resize == "short_side"  # the reference's is the default
    for item in range(5):
        top, left, ch, cw = five_crop_boxes(60, 90)[item]
        crop = torch.from_numpy(img[top:top + ch, left:left + cw].copy()).permute(2, 0, 1).float() / 255
        resized = F.interpolate(crop[None], size=(16, 24), mode="bilinear", align_corners=False,
                                antialias=True)[0]
        expected = resized[:, :, 4:20]  # torchvision centre crop: round((24 - 16) / 2) = 4
        assert torch.allclose(prepare_item(img, short, item), expected.clamp(0, 1), atol=1e-6)
        squashed = F.interpolate(crop[None], size=(16, 16), mode="bilinear", align_corners=False,
                                 antialias=True)[0]
        assert torch.allclose(prepare_item(img, squash, item), squashed.clamp(0, 1), atol=1e-6)
        assert not torch.allclose(prepare_item(img, short, item), prepare_item(img, squash, item))
    label = (np.arange(60 * 90).reshape(60, 90) // 7) % 5
    lab = prepare_label(label, short, 1)  # top-right crop: rows 0..29, columns 45..89
    crop = label[0:30, 45:90]
    rows = (np.arange(16) * 30 / 16).astype(int)  # nearest neighbour, as F.interpolate(mode="nearest")
    cols = (np.arange(24) * 45 / 24).astype(int)
    assert np.array_equal(lab, crop[rows][:, cols][:, 4:20])


def test_crop_resize_is_in_five_crop_keys_only():
    assert ViewSpec("five_crop", 224).params()["crop_resize"] == "short_side"
    assert ViewSpec("five_crop", 224, crop_resize="squash").params() != ViewSpec("five_crop", 224).params()
    assert "crop_resize" not in ViewSpec("center_crop", 320).params()
    assert "crop_resize" not in ViewSpec("full", None, size=(352, 480)).params()
    with pytest.raises(ConfigError, match="resize"):
        ViewSpec("five_crop", 224, crop_resize="stretch")


def test_training_views_follow_the_reference_per_dataset():
    from usseg_core.datasets.registry import dataset_class
    from usseg_core.views import CropSettings

    default = CropSettings()
    for name in ("cocostuff27", "cityscapes27"):
        assert default.view(dataset_class(name), 224) == ViewSpec("five_crop", 224, crop_resize="short_side")
    for name in ("camvid11", "synthetic"):  # not reference datasets: chosen on CamVid val (README)
        assert default.view(dataset_class(name), 224) == ViewSpec("five_crop", 224, crop_resize="squash")
    for name in ("potsdam3", "directory"):  # the reference ignores crop_type for these
        assert default.view(dataset_class(name), 224) == ViewSpec("center_crop", 224)
    assert CropSettings(resize="squash").view(dataset_class("cocostuff27"), 224).crop_resize == "squash"
    assert CropSettings(policy="five_crop").view(dataset_class("potsdam3"), 224).policy == "five_crop"
    with pytest.raises(ConfigError, match="five_crop"):
        CropSettings(resize="squash").view(dataset_class("potsdam3"), 224)
    with pytest.raises(ConfigError, match="crops.resize"):
        CropSettings(resize="stretch")


def test_crops_settings_reach_the_run_and_fail_before_any_work():
    from usseg_core.spec import RunSpec

    run = RunSpec(head="stego", dataset="cocostuff27", overrides={"crops.resize": "squash"})
    assert run.crops_config().resize == "squash"
    assert run.head_overrides() == {}
    with pytest.raises(ConfigError, match="crops.ratio"):
        RunSpec(head="stego", dataset="cocostuff27", overrides={"crops.bogus": 1})
    with pytest.raises(ConfigError, match="five_crop"):
        RunSpec(head="stego", dataset="potsdam3", overrides={"crops.resize": "squash"})
