"""Views: how a dataset image becomes the backbone's input (resolution and crop policy).

A *view* turns one image into one or more *items* (five-crop gives five), each a fixed-size RGB tensor.
Every item of a view has the same size, so features stack into one ``(N, C, h, w)`` array.

Policies (docs/methods/protocol.md §5 S2, S4, S8):

- ``center_crop``: resize the short side to ``resolution`` (bilinear, antialiased), centre-crop a square.
  The eval protocol of cocostuff27 / cityscapes27 / potsdam3 (320) and STEGO's training res (224).
  STEGO resizes *images* with nearest neighbour (docs/references.md §1.1, "resize quirk"); we use bilinear
  with antialiasing for images and nearest only for labels, and say so here because it moves numbers.
- ``five_crop``: the 4 corner crops and the centre crop with side ``crop_ratio`` of each image side
  (torchvision FiveCrop order), each made ``resolution`` x ``resolution`` by ``crop_resize``:

  - ``short_side`` (STEGO's training input): [code:STEGO] ``crop_datasets.py`` saves the five-crops at
    native resolution, then trains (and mines KNN, ``precompute_knns.py``) through ``get_transform(224,
    loader_crop_type="center")``, i.e. ``Resize(224)`` of the short side then ``CenterCrop(224)``: the
    model sees the central square of each crop (75 % of a 240x320 COCO crop, 50 % of a 512x1024
    Cityscapes crop), undistorted. The default of cocostuff27 / cityscapes27.
  - ``squash``: the whole crop resized anisotropically to the square (every pixel of the crop seen,
    aspect ratio changed). Ours, kept as an option; measured against ``short_side`` on CamVid val
    (docs/results.md, "Five-crop resize") to choose CamVid's default.
- ``full``: the whole frame resized to a fixed ``size`` (H, W), a multiple of the backbone's input
  multiple. Labels are not resized: codes are upsampled to the label's own size (camvid11 protocol).

``flip`` mirrors every item horizontally (flip test-time augmentation features).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from usseg_core.config import positive_int_env
from usseg_core.crops import center_crop_box, five_crop_boxes, short_side_resize_size
from usseg_core.errors import ConfigError

POLICIES = ("center_crop", "five_crop", "full")
CROP_RESIZES = ("short_side", "squash")  # five_crop: how a crop becomes the square input (above)


@dataclass(frozen=True)
class ViewSpec:
    """Resolution and crop policy of a feature extraction."""

    policy: str = "center_crop"
    resolution: int | None = 224          # output side for center_crop / five_crop (STEGO train res 224)
    size: tuple[int, int] | None = None   # full: output (H, W); None until resolved from the data
    crop_ratio: float = 0.5               # five_crop: crop side / image side ([code:STEGO] crop_ratio)
    flip: bool = False                    # mirror horizontally (flip-TTA features)
    crop_resize: str = "short_side"       # five_crop: "short_side" (STEGO) | "squash" (see the module doc)

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ConfigError(f"view policy {self.policy!r} unknown; choose one of {', '.join(POLICIES)}")
        if self.crop_resize not in CROP_RESIZES:
            raise ConfigError(f"five-crop resize {self.crop_resize!r} unknown; choose one of {', '.join(CROP_RESIZES)}")
        if self.policy != "full" and (self.resolution is None or self.resolution <= 0):
            raise ConfigError(f"view policy {self.policy!r} needs a positive resolution")
        if self.size is not None:
            object.__setattr__(self, "size", (int(self.size[0]), int(self.size[1])))

    @property
    def per_image(self) -> int:
        """Items per image: 5 for five_crop, else 1."""
        return 5 if self.policy == "five_crop" else 1

    def params(self) -> dict:
        """JSON-able description (part of every feature artifact key)."""
        d = asdict(self)
        d["size"] = list(self.size) if self.size else None
        if self.policy != "five_crop":  # read by five_crop only: other views keep their keys
            del d["crop_resize"]
        return d

    @classmethod
    def from_params(cls, params: dict) -> "ViewSpec":
        """The inverse of :meth:`params` (artifact metadata stores ``size`` as a list or None)."""
        return cls(**{**params, "size": tuple(params["size"]) if params.get("size") else None})

    def flipped(self) -> "ViewSpec":
        return replace(self, flip=not self.flip)

    def output_size(self) -> tuple[int, int]:
        if self.policy == "full":
            if self.size is None:
                raise ConfigError("full-frame view has no size yet: resolve it with resolve_full_size")
            return self.size
        return (int(self.resolution), int(self.resolution))

    def check_multiple(self, multiple: int) -> None:
        """The backbone needs input sides divisible by ``multiple`` (its patch size or 32)."""
        h, w = self.output_size()
        if h % multiple or w % multiple:
            raise ConfigError(f"view size {h}x{w} is not a multiple of the backbone's input multiple "
                              f"{multiple}; choose a resolution divisible by {multiple}")


FULL_MAX_LONG_SIDE = 1024
"""Default cap on the long side of a full-frame view whose size comes from the data (``resolution`` None).

Why 1024: the backbones are trained at 224 (DINO) to 518 (DINOv2); at 1024 a ViT-S/8 already sees
128 x 85 = 10.9k tokens per image (its attention is quadratic in that), and CamVid's 480 x 360 frames are
unaffected. A 6000 x 4000 photo uncapped would be 750 x 500 = 375k tokens. Override with the environment
variable ``USSEG_FULL_MAX_SIDE`` (an integer >= the backbone's input multiple) or the ``max_long_side``
argument; an explicit ``resolution`` (the long side asked for) is never capped.
"""
FULL_MAX_LONG_SIDE_ENV = "USSEG_FULL_MAX_SIDE"


def full_max_long_side() -> int:
    """The long-side cap in force: ``$USSEG_FULL_MAX_SIDE`` if set, else :data:`FULL_MAX_LONG_SIDE`."""
    return positive_int_env(FULL_MAX_LONG_SIDE_ENV, FULL_MAX_LONG_SIDE, "pixels")


def resolve_full_size(view: ViewSpec, image_hw: tuple[int, int], multiple: int,
                      max_long_side: int | None = None) -> ViewSpec:
    """Fix a full-frame view's size from an image size, each side rounded to the nearest ``multiple``.

    The rule:

    - ``view.resolution`` set: the long side becomes ``resolution``, aspect ratio kept (never capped).
    - ``view.resolution`` None: the image's own size, scaled down (aspect kept) so that the long side is
      at most ``max_long_side`` (default :func:`full_max_long_side`, 1024); smaller images keep their size.
      After rounding, a side never exceeds the cap by more than the rounding (it is floored when the
      nearest multiple would pass the cap).

    One view has one size for every image (features stack into one array): callers resolve it from one
    image (``tasks.extract.resolve_view``: the first id of the manifest) and every image is resized to it.
    """
    if view.policy != "full" or view.size is not None:
        return view
    h, w = image_hw
    cap = None
    if view.resolution:  # long side given: keep aspect ratio
        scale = view.resolution / max(h, w)
        image_hw = (h * scale, w * scale)
    else:
        cap = full_max_long_side() if max_long_side is None else int(max_long_side)
        if cap <= 0:
            raise ConfigError(f"resolve_full_size: max_long_side must be positive, got {cap}")
        if max(h, w) > cap:
            scale = cap / max(h, w)
            image_hw = (h * scale, w * scale)
    size = []
    for s in image_hw:
        side = int(round(s / multiple)) * multiple
        if cap is not None and side > cap:
            side = (cap // multiple) * multiple
        size.append(max(multiple, side))
    return replace(view, size=tuple(size))


def _resize(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    # (3, H, W) float -> (3, h, w); antialias so downsampling does not alias textures
    if tuple(img.shape[-2:]) == tuple(size):
        return img
    return F.interpolate(img[None], size=size, mode="bilinear", align_corners=False,
                         antialias=True)[0]


def prepare_item(image: np.ndarray, view: ViewSpec, item: int = 0) -> torch.Tensor:
    """One backbone input: ``image`` (H, W, 3) uint8 -> (3, h, w) float32 in [0, 1].

    ``item`` selects the crop for five_crop (0..4: TL, TR, BL, BR, centre).
    """
    t = torch.from_numpy(np.array(image, dtype=np.uint8, order="C")).permute(2, 0, 1).float().div_(255.0)  # (3,H,W)
    h, w = t.shape[-2:]
    if view.policy == "center_crop":
        t = _resize(t, short_side_resize_size(h, w, view.resolution))
        top, left, ch, cw = center_crop_box(*t.shape[-2:], view.resolution)
        t = t[:, top:top + ch, left:left + cw]
    elif view.policy == "five_crop":
        top, left, ch, cw = five_crop_boxes(h, w, view.crop_ratio)[item]
        t = t[:, top:top + ch, left:left + cw]
        if view.crop_resize == "short_side":
            t = _resize(t, short_side_resize_size(ch, cw, view.resolution))
            top, left, ch, cw = center_crop_box(*t.shape[-2:], view.resolution)
            t = t[:, top:top + ch, left:left + cw]
        else:
            t = _resize(t, (view.resolution, view.resolution))
    else:
        t = _resize(t, view.output_size())
    if view.flip:
        t = t.flip(-1)
    return t.clamp_(0.0, 1.0).contiguous()


def _short_side_center_label(label: np.ndarray, resolution: int) -> np.ndarray:
    # nearest-neighbour Resize(short side) then CenterCrop, the label twin of the image path
    h, w = label.shape
    nh, nw = short_side_resize_size(h, w, resolution)
    t = torch.from_numpy(label.astype(np.float32))[None, None]
    t = F.interpolate(t, size=(nh, nw), mode="nearest")[0, 0]
    top, left, ch, cw = center_crop_box(nh, nw, resolution)
    return t[top:top + ch, left:left + cw].numpy().astype(label.dtype)


def prepare_label(label: np.ndarray, view: ViewSpec, item: int = 0) -> np.ndarray:
    """The label counterpart of :func:`prepare_item` (nearest neighbour; -1 = ignore is kept).

    For ``full`` views the label keeps its own size: predictions are upsampled to it instead.
    """
    if view.policy == "full":
        out = label
    elif view.policy == "center_crop":
        out = _short_side_center_label(label, view.resolution)
    else:
        top, left, ch, cw = five_crop_boxes(*label.shape, view.crop_ratio)[item]
        crop = label[top:top + ch, left:left + cw]
        if view.crop_resize == "short_side":
            out = _short_side_center_label(crop, view.resolution)
        else:
            t = torch.from_numpy(crop.astype(np.float32))[None, None]
            out = F.interpolate(t, size=(view.resolution,) * 2, mode="nearest")[0, 0].numpy()
            out = out.astype(label.dtype)
    if view.flip:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def prepare_image_for_label(image: np.ndarray, view: ViewSpec) -> np.ndarray:
    """The RGB image on the label's grid (for CRF and overlays): uint8 (h, w, 3)."""
    if view.policy == "full":
        return image
    t = prepare_item(image, replace(view, flip=False))
    out = (t.permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)
    return out[:, ::-1] if view.flip else out


@dataclass(frozen=True)
class CropSettings:
    """The five-crop heads' training view (``--set crops.<field>=...``); None takes the dataset's choice.

    The dataset's defaults follow the reference (``usseg_core/datasets/base.py``); these overrides
    keep the other behaviour available (``crops.resize=squash``, ``crops.policy=center_crop``).
    """

    policy: str | None = None   # "five_crop" | "center_crop"; None: dataset.train_policy
    resize: str | None = None   # five_crop: "short_side" | "squash"; None: dataset.train_crop_resize
    ratio: float = 0.5          # five_crop: crop side / image side ([code:STEGO] crop_ratio)

    def __post_init__(self) -> None:
        if self.policy is not None and self.policy not in ("five_crop", "center_crop"):
            raise ConfigError(f"crops.policy={self.policy!r}: unknown; valid: five_crop, center_crop")
        if self.resize is not None and self.resize not in CROP_RESIZES:
            raise ConfigError(f"crops.resize={self.resize!r}: unknown; valid: {', '.join(CROP_RESIZES)}")
        r = self.ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 < r <= 1.0:
            raise ConfigError(f"crops.ratio must be a number in (0, 1], got {r!r}")

    def view(self, dataset, resolution: int) -> ViewSpec:
        """The training view for ``dataset`` (an object with ``train_policy`` / ``train_crop_resize``)."""
        policy = self.policy or dataset.train_policy
        if policy == "center_crop":
            if self.resize is not None or self.ratio != 0.5:
                raise ConfigError("crops.resize / crops.ratio apply to five_crop training views only "
                                  f"({dataset.name} trains on centre crops; set crops.policy=five_crop)")
            return ViewSpec("center_crop", resolution)
        return ViewSpec("five_crop", resolution, crop_ratio=float(self.ratio),
                        crop_resize=self.resize or dataset.train_crop_resize)
