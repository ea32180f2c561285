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
