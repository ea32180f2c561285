"""five_crop_boxes / center_crop_box / short_side_resize_size against torchvision."""
import pytest
import torch
import torchvision.transforms.functional as TF

from usseg_core.crops import center_crop_box, five_crop_boxes, short_side_resize_size
from usseg_core.errors import ConfigError


@pytest.mark.parametrize("hw", [(37, 50), (224, 224), (321, 480), (480, 321), (11, 9)])
@pytest.mark.parametrize("ratio", [0.5, 0.3])
def test_five_crop_boxes_match_torchvision(hw, ratio):
    h, w = hw
    img = torch.arange(3 * h * w, dtype=torch.int32).reshape(3, h, w)
    size = [int(h * ratio), int(w * ratio)]  # STEGO's crop size per side
    expected = TF.five_crop(img, size)
    boxes = five_crop_boxes(h, w, ratio)
    assert len(boxes) == 5
    for (top, left, ch, cw), ref in zip(boxes, expected):
        assert torch.equal(img[:, top:top + ch, left:left + cw], ref)


@pytest.mark.parametrize("hw,size", [((10, 13), 4), ((320, 427), 320), ((9, 9), (4, 6))])
def test_center_crop_box_matches_torchvision(hw, size):
    h, w = hw
    img = torch.arange(h * w).reshape(1, h, w)
    top, left, ch, cw = center_crop_box(h, w, size)
    ref = TF.center_crop(img, [size, size] if isinstance(size, int) else list(size))
    assert torch.equal(img[:, top:top + ch, left:left + cw], ref)


@pytest.mark.parametrize("hw", [(480, 640), (640, 480), (333, 500), (100, 100)])
def test_short_side_resize_matches_torchvision(hw):
    img = torch.zeros(1, *hw)
    assert tuple(TF.resize(img, 320, antialias=False).shape[1:]) == short_side_resize_size(*hw, 320)


def test_bad_ratio():
    with pytest.raises(ConfigError):
        five_crop_boxes(10, 10, 0.0)
    with pytest.raises(ConfigError):
        center_crop_box(10, 10, 11)
