"""Procedural street scenes with exact per-pixel labels, and the "synthetic" dataset that reads them.

Purpose: a small, license-free, deterministic labelled set for end-to-end tests of the whole
pipeline. Scenes are painted back to front (sky, buildings, ground, trees, road, cars) with textures
(cloud noise, brick courses and windows, grass blades, asphalt grain and lane marks, car bodies with
glass and wheels) and random lighting, so that texture and context — what a pretrained CNN's features
capture — separate the classes while raw colour alone is ambiguous (grey concrete vs asphalt vs
overcast sky, blue windows vs sky, green cars vs grass).

Layout written (the same as camvid11)::

    <out>/classes.json                   # {"class_names": [...], "palette": [...], "params": {...}}
    <out>/{train,val}/images/<0000>.png  # (H, W, 3) uint8
    <out>/{train,val}/labels/<0000>.png  # (H, W) uint8 class ids 0..4 (every pixel labelled)
    <out>/.complete                      # written last; holds the parameters
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from usseg_core.datasets.camvid import PairedFolderDataset
from usseg_core.datasets.mappings import identity_mapping
from usseg_core.datasets.protocol import DatasetProtocol
from usseg_core.datasets.registry import register_dataset
from usseg_core.errors import ConfigError, InputError

CLASS_NAMES: tuple[str, ...] = ("sky", "building", "vegetation", "road", "car")
SKY, BUILDING, VEGETATION, ROAD, CAR = range(5)
PALETTE: tuple[tuple[int, int, int], ...] = ((70, 130, 180), (160, 80, 60), (60, 140, 50), (90, 90, 90), (220, 30, 30))
MARKER = ".complete"
CLASSES_FILE = "classes.json"
DEMO_RESOLUTION = 128  # the scenes' training size in `usseg demo` and the synthetic deployments
# The demo's scenes (height, width): small enough that every head x 2 seeds, evaluated with the dense CRF,
# answers in about three minutes on 2 CPU cores (bench/demo.py); the renderer's default is 192 x 256.
DEMO_SIZE = (144, 192)
GENERATOR_VERSION = 1  # bump when the rendering changes: a complete folder of another version is refused


# ---------------------------------------------------------------------- texture primitives
def _noise(rng: np.random.Generator, h: int, w: int, sigma: float | tuple[float, float]) -> np.ndarray:
    """Smooth zero-mean unit-std noise, (h, w) float32. ``sigma`` in pixels, (sigma_y, sigma_x) allowed.

    Large blurs are done at reduced resolution and upsampled (same look, a fraction of the cost).
    """
    import cv2  # here: rendering only (a cached command reads the folder and never imports OpenCV)

    if h <= 0 or w <= 0:
        return np.zeros((max(h, 0), max(w, 0)), np.float32)
    sy, sx = (sigma, sigma) if np.isscalar(sigma) else sigma
    f = max(1, int(min(sy, sx) // 3))  # downsampling factor, keeps >= 3 px of blur at low res
    lh, lw = h // f + 2, w // f + 2
    field = rng.standard_normal((lh, lw)).astype(np.float32)
    field = cv2.GaussianBlur(field, (0, 0), sigmaX=sx / f, sigmaY=sy / f, borderType=cv2.BORDER_REFLECT)
    if f > 1:
        field = cv2.resize(field, (lw * f, lh * f), interpolation=cv2.INTER_LINEAR)[:h, :w]
    field = field[:h, :w]
    return (field - field.mean()) / (field.std() + 1e-6)


def _fractal(rng: np.random.Generator, h: int, w: int, sigmas: tuple[float, ...]) -> np.ndarray:
    """Sum of octaves of smooth noise with halving amplitude, (h, w) float32, roughly unit std."""
    total = sum(_noise(rng, h, w, s) * 0.5**k for k, s in enumerate(sigmas))
    return total / np.sqrt(sum(0.25**k for k in range(len(sigmas))))


def _paint(img: np.ndarray, label: np.ndarray, mask: np.ndarray, rgb: np.ndarray, cls: int) -> None:
    """Write ``rgb`` (H, W, 3) or (3,) into ``img`` and ``cls`` into ``label`` where ``mask``."""
    img[mask] = rgb[mask] if rgb.ndim == 3 else rgb
    label[mask] = cls


# ---------------------------------------------------------------------- scene layers
def _sky(rng, yy, horizon) -> np.ndarray:
    h, w = yy.shape
    overcast = rng.random() < 0.3
    top = np.array([150, 155, 165]) if overcast else np.array([30, 80, 170]) + rng.integers(-20, 30, 3)
    bottom = np.array([200, 200, 205]) if overcast else np.array([160, 195, 230]) + rng.integers(-20, 20, 3)
    t = np.clip(yy / max(horizon, 1.0), 0, 1)[..., None]  # 0 at top, 1 at horizon
    sky = top * (1 - t) + bottom * t  # (H, W, 3)
    clouds = _fractal(rng, h, w, (24.0, 10.0, 4.0))
    cover = np.clip((clouds - rng.uniform(-0.2, 1.2)) * 1.5, 0, 1)[..., None]  # (H, W, 1)
    cloud_rgb = rng.uniform(200, 250) + 15 * _noise(rng, h, w, 2.0)[..., None]
    return sky * (1 - cover) + cloud_rgb * cover


def _buildings(rng, img, label, yy, xx, horizon) -> None:
    h, w = yy.shape
    palettes = ([150, 70, 50], [175, 150, 120], [125, 125, 128], [200, 195, 185], [110, 80, 60])
    x = int(rng.integers(-20, 10))
    while x < w:
        bw = int(rng.integers(w // 8, w // 3))
        if rng.random() < 0.2:  # a gap showing the sky behind
            x += bw // 2
            continue
        top = int(horizon - rng.uniform(0.15, 0.5) * h)
        base = int(horizon + rng.uniform(0.0, 0.04) * h)
        box = (slice(max(top, 0), min(base, h)), slice(max(x, 0), min(x + bw, w)))  # work on the facade only
        by, bx = yy[box] - top, xx[box] - x  # facade coordinates, (h_b, w_b)
        bh_, bw_ = by.shape
        colour = np.array(palettes[rng.integers(len(palettes))], np.float32) + rng.integers(-15, 15, 3)
        # brick courses: mortar every `course` rows, staggered vertical joints every `brick` columns
        course, brick = int(rng.integers(3, 6)), int(rng.integers(7, 12))
        mortar = (by % course == 0) | ((bx + ((by // course) % 2) * (brick // 2)) % brick == 0)
        facade = colour + 12 * _noise(rng, bh_, bw_, 0.7)[..., None] + 25 * mortar[..., None]
        # window grid: glass reflects the sky (blue-grey) or is dark
        px, py = int(rng.integers(10, 20)), int(rng.integers(12, 22))
        mx, my = int(rng.integers(3, px // 2)), int(rng.integers(3, py // 2))
        win = (bx % px >= mx) & (by % py >= my) & (by > 4) & (base - top - by > 6)
        glass = np.array([90, 120, 160]) if rng.random() < 0.6 else np.array([40, 45, 55])
        facade = np.where(win[..., None], glass + 20 * _noise(rng, bh_, bw_, 3.0)[..., None], facade)
        img[box] = facade
        label[box] = BUILDING
        x += bw


def _ground(rng, img, label, yy, xx, horizon) -> None:
    h, w = yy.shape
    mask = yy >= horizon
    base = np.array([70, 120, 45], np.float32) + rng.integers(-20, 25, 3)
    blades = _noise(rng, h, w, (2.5, 0.4))  # anisotropic: vertical blade streaks
    patches = _fractal(rng, h, w, (16.0, 6.0))
    grass = base + 22 * blades[..., None] + np.array([25, 15, -5]) * patches[..., None]
    _paint(img, label, mask, grass, VEGETATION)


def _trees(rng, img, label, yy, xx, horizon) -> None:
    h, w = yy.shape
    for _ in range(int(rng.integers(0, 4))):
        cx, r = rng.uniform(0, w), rng.uniform(0.06, 0.16) * h
        cy = horizon - rng.uniform(0.3, 1.4) * r
        crown = np.zeros((h, w), bool)
        for _ in range(6):  # a crown = union of offset discs, so the outline is lumpy
            ox, oy, rr = rng.normal(0, 0.5 * r), rng.normal(0, 0.4 * r), r * rng.uniform(0.5, 0.9)
            crown |= (xx - cx - ox) ** 2 + (yy - cy - oy) ** 2 < rr**2
        trunk = (np.abs(xx - cx) < max(r * 0.12, 1.5)) & (yy > cy) & (yy < horizon + 0.1 * r)
        leaves = np.array([40, 95, 35], np.float32) + rng.integers(-15, 15, 3)
        clumps = _noise(rng, h, w, 1.5)
        rgb = leaves + 28 * clumps[..., None]
        rgb = np.where(trunk[..., None] & ~crown[..., None], np.array([85, 60, 40]), rgb)
        _paint(img, label, crown | trunk, rgb, VEGETATION)


def _road(rng, img, label, yy, xx, horizon) -> tuple[float, float, float]:
    """Paint a perspective road; return (vanishing x, half width at bottom, horizon)."""
    h, w = yy.shape
    vx = rng.uniform(0.3, 0.7) * w
    half_bottom = rng.uniform(0.35, 0.8) * w
    t = np.clip((yy - horizon) / max(h - horizon, 1.0), 0, 1)  # 0 at horizon, 1 at bottom
    mask = (yy > horizon) & (np.abs(xx - vx) < t * half_bottom)
    asphalt = rng.uniform(70, 120) + np.array([0, 0, rng.uniform(-4, 6)])
    rgb = asphalt + 14 * _noise(rng, h, w, 0.6)[..., None] + 10 * _fractal(rng, h, w, (12.0, 4.0))[..., None]
    # dashed lane mark along the centre, dashes periodic in depth (1/t) so they shrink with distance
    lane = (np.abs(xx - vx) < t * half_bottom * 0.03 + 0.3) & (np.sin(6.0 / np.maximum(t, 0.05)) > 0.2)
    lane_rgb = np.array([230, 230, 225]) if rng.random() < 0.7 else np.array([225, 190, 60])
    rgb = np.where((lane & mask)[..., None], lane_rgb + 8 * _noise(rng, h, w, 0.5)[..., None], rgb)
    _paint(img, label, mask, rgb, ROAD)
    return vx, half_bottom, horizon


def _cars(rng, img, label, yy, xx, road: tuple[float, float, float]) -> None:
    h, w = yy.shape
    vx, half_bottom, horizon = road
    colours = ([200, 30, 30], [30, 60, 170], [235, 235, 235], [25, 25, 28], [160, 160, 165], [60, 130, 60], [230, 200, 40])
    placed = sorted(rng.uniform(0.15, 1.0, size=int(rng.integers(0, 5))))  # depth t, far to near
    for t in placed:
        base_y = horizon + t * (h - horizon)
        cw = 0.55 * t * half_bottom + 4  # car width in pixels, shrinking with distance
        cx = vx + rng.uniform(-0.7, 0.7) * t * half_bottom
        body_h, cabin_h, clear = 0.35 * cw, 0.25 * cw, 0.12 * cw
        body_top = base_y - clear - body_h
        cab_top = body_top - cabin_h
        box = (
            slice(max(int(cab_top) - 1, 0), min(int(base_y + 0.1 * cw) + 1, h)),
            slice(max(int(cx - 0.6 * cw) - 1, 0), min(int(cx + 0.6 * cw) + 2, w)),
        )
        y, x, lab = yy[box], xx[box], label[box]  # (h_c, w_c) views
        if y.size == 0:
            continue
        body = (np.abs(x - cx) < cw / 2) & (y < base_y - clear) & (y > body_top)
        slope = (y - cab_top) / max(cabin_h, 1.0)  # 0 at cabin top, 1 at body top
        cabin = (y >= cab_top) & (y <= body_top) & (np.abs(x - cx) < cw * (0.3 + 0.12 * slope))
        wheels = np.zeros(y.shape, bool)
        for side in (-1, 1):
            wx, wr = cx + side * 0.3 * cw, 0.12 * cw
            wheels |= (x - wx) ** 2 + (y - (base_y - wr)) ** 2 < wr**2
        shadow = (np.abs(x - cx) < cw * 0.55) & (y >= base_y - 0.05 * cw) & (y < base_y + 0.06 * cw) & (lab == ROAD)
        img[box][shadow] *= 0.55  # the shadow darkens the road but stays road
        paint = np.array(colours[rng.integers(len(colours))], np.float32)
        shade = 1.0 - 0.35 * np.clip((y - body_top) / max(body_h, 1.0), 0, 1)  # darker towards the sills
        rgb = paint * shade[..., None] + 6 * _noise(rng, *y.shape, 0.8)[..., None]
        glass = np.array([50, 65, 85]) + 30 * np.clip(1 - slope, 0, 1)[..., None]
        rgb = np.where((cabin & (np.abs(x - cx) < cw * (0.24 + 0.1 * slope)))[..., None], glass, rgb)
        rgb = np.where(wheels[..., None], np.array([20, 20, 22]), rgb)
        _paint(img[box], lab, body | cabin | wheels, rgb, CAR)


def _lighting(rng, img: np.ndarray) -> np.ndarray:
    h, w, _ = img.shape
    gain = rng.uniform(0.7, 1.2) * rng.uniform(0.9, 1.1, 3)  # exposure and colour cast, (3,)
    field = 1.0 + 0.15 * _noise(rng, h, w, 40.0)[..., None]  # soft uneven illumination
    out = img * gain * field + rng.normal(0.0, 3.0, img.shape)  # sensor noise
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def render_scene(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """One scene: image (H, W, 3) uint8 and label (H, W) uint8 in 0..4 (every pixel labelled)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)  # (H, W) each
    horizon = rng.uniform(0.35, 0.6) * height
    img = _sky(rng, yy, horizon).astype(np.float32)  # (H, W, 3)
    label = np.full((height, width), SKY, np.uint8)
    _buildings(rng, img, label, yy, xx, horizon)
    _ground(rng, img, label, yy, xx, horizon)
    _trees(rng, img, label, yy, xx, horizon)
    road = _road(rng, img, label, yy, xx, horizon)
    _cars(rng, img, label, yy, xx, road)
    return _lighting(rng, img), label


# ---------------------------------------------------------------------- writing
def _write_png_atomic(array: np.ndarray, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(array).save(tmp, format="PNG")
    os.replace(tmp, path)


def render_synthetic(
    out_dir: str | Path, *, n_train: int = 40, n_val: int = 12, height: int = 192, width: int = 256, seed: int = 0
) -> Path:
    """Render the synthetic set into ``out_dir`` unless it is already complete there.

    Deterministic: the same arguments give bit-identical files (each image has its own generator
    seeded by (seed, split, index), so one image does not depend on how many were rendered before).

    Args:
        out_dir: target folder (created).
        n_train, n_val: images per split.
        height, width: image size in pixels.
        seed: random seed.

    Returns:
        ``out_dir`` as a Path.

    Raises:
        ConfigError: ``out_dir`` holds a complete synthetic set rendered with other parameters.
    """
    out = Path(out_dir)
    params = {"version": GENERATOR_VERSION, "n_train": n_train, "n_val": n_val, "height": height, "width": width, "seed": seed}
    marker = out / MARKER
    if marker.is_file():
        found = json.loads(marker.read_text())
        if found != params:
            raise ConfigError(f"{out} already holds a synthetic set with parameters {found}, not {params}")
        return out
    if min(height, width) < 16 or n_train < 0 or n_val < 0:
        raise ConfigError(f"render_synthetic: need height, width >= 16 and non-negative counts, got {params}")
    for split_no, (split, count) in enumerate((("train", n_train), ("val", n_val))):
        (out / split / "images").mkdir(parents=True, exist_ok=True)
        (out / split / "labels").mkdir(parents=True, exist_ok=True)
        for i in range(count):
            rng = np.random.default_rng([seed, split_no, i])
            image, label = render_scene(rng, height, width)
            _write_png_atomic(image, out / split / "images" / f"{i:04d}.png")
            _write_png_atomic(label, out / split / "labels" / f"{i:04d}.png")
    meta = {"class_names": list(CLASS_NAMES), "palette": [list(c) for c in PALETTE], "params": params}
    (out / CLASSES_FILE).write_text(json.dumps(meta, indent=2))
    tmp = marker.with_name(MARKER + ".tmp")
    tmp.write_text(json.dumps(params))
    os.replace(tmp, marker)  # completion marker last
    return out


def ensure_synthetic(root: str | Path, **kw) -> Path:
    """Render the synthetic set into ``root`` if not already complete; return ``root``.

    Keyword arguments are those of :func:`render_synthetic`.
    """
    return render_synthetic(root, **kw)


@register_dataset("synthetic")
class SyntheticDataset(PairedFolderDataset):
    """Reads a folder written by :func:`render_synthetic` (camvid layout + ``classes.json``).

    Raw label 255 is ignored (-1); other values must be class ids.
    """

    protocol = DatasetProtocol(
        folder="synthetic",
        eval_policy="full", eval_size=None,  # the whole frame, like CamVid
        train_policy="five_crop", train_crop_resize="squash",  # the street-like stand-in for CamVid trains as it does
        # HSG's COCO schedule and its common 6 x 6 n0: the values these scenes have always run with (their
        # artifact keys depend on them); small synthetic frames need no Cityscapes-sized region cap
        overseg_schedule="coco",
        hsg_test_grid=(6, 6),
        retrieval_labels="valid-majority",  # ours (not a reference dataset)
    )

    def __init__(self, root: str | Path, split: str) -> None:
        super().__init__(root, split)
        classes_file = self.root / CLASSES_FILE
        if not classes_file.is_file():
            raise InputError(classes_file, "synthetic dataset class list does not exist")
        try:
            names = json.loads(classes_file.read_text(encoding="utf-8"))["class_names"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise InputError(classes_file, f"is not a valid class list ({err})") from err
        self.class_names = tuple(str(n) for n in names)
        self.mapping = identity_mapping("synthetic", len(self.class_names), ignore_values=(255,))
        self._index_splits()
