"""Crop and resize geometry as boxes, so crops can be cut from any array (image, label, feature map).

STEGO five-crops every training image before KNN mining (4 corners + centre, each side
``int(crop_ratio * side)``, ``crop_ratio = 0.5``, [code:STEGO] ``crop_datasets.py`` calling torchvision
``five_crop``); evaluation resizes the short side to 320 then centre-crops 320 x 320 (docs/methods/protocol.md S1).
The functions below reproduce torchvision's arithmetic exactly (including Python's round-half-to-even
in ``center_crop``), so a box cut with numpy slicing equals the torchvision crop pixel for pixel.

A box is ``(top, left, crop_h, crop_w)`` in pixels; cut it with ``a[..., top:top+crop_h, left:left+crop_w]``.
"""
from __future__ import annotations

from usseg_core.errors import ConfigError

Box = tuple[int, int, int, int]


def center_crop_box(height: int, width: int, size: int | tuple[int, int]) -> Box:
    """Box of torchvision ``center_crop(img, size)`` for an image of ``height`` x ``width`` (no padding)."""
    crop_h, crop_w = (size, size) if isinstance(size, int) else size
    if crop_h > height or crop_w > width:
        raise ConfigError(f"centre crop {crop_h}x{crop_w} is larger than the image {height}x{width}")
    # torchvision: int(round((H - h) / 2.0)), Python's round is half-to-even.
    return int(round((height - crop_h) / 2.0)), int(round((width - crop_w) / 2.0)), crop_h, crop_w


def five_crop_boxes(height: int, width: int, ratio: float = 0.5) -> list[Box]:
    """Boxes of torchvision ``five_crop`` with crop side ``int(ratio * side)`` per axis.

    Returns:
        [top-left, top-right, bottom-left, bottom-right, centre], torchvision's order; the crop of
        image i's box j is STEGO's cropped image ``5 * i + j``.
    """
    if not 0 < ratio <= 1:
        raise ConfigError(f"five-crop ratio must be in (0, 1], got {ratio}")
    crop_h, crop_w = int(ratio * height), int(ratio * width)
    if crop_h < 1 or crop_w < 1:
        raise ConfigError(f"five-crop ratio {ratio} of a {height}x{width} image gives an empty crop")
    bottom, right = height - crop_h, width - crop_w
    return [
        (0, 0, crop_h, crop_w),
        (0, right, crop_h, crop_w),
        (bottom, 0, crop_h, crop_w),
        (bottom, right, crop_h, crop_w),
        center_crop_box(height, width, (crop_h, crop_w)),
    ]


def short_side_resize_size(height: int, width: int, short: int) -> tuple[int, int]:
    """(new_h, new_w) of torchvision ``Resize(short)``: short side -> ``short``, long side truncated."""
    if short < 1:
        raise ConfigError(f"short side must be >= 1, got {short}")
    if width <= height:
        return int(short * height / width), short
    return short, int(short * width / height)
