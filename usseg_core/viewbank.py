"""The view bank: recorded PiCIE-style augmentations of every image, and their replay on maps.

PiCIE (docs/methods/picie.md §2.1) embeds two views of an image, ``f(G(P1(x)))`` (warp the image) and
``G(f(P2(x)))`` (warp the feature map) with the *same* geometric draw G, drawn once and kept so that
pseudo-labels and training views correspond; HSG warps segment maps the same way. A view bank holds, per
image, V recorded draws ``(P, G)`` and the backbone features of two renderings of each:

- **plain**  ``P(base(x))``: photometric only, on the *base frame* (the part of the image that the base
  view, a :class:`~usseg_core.views.ViewSpec`, shows);
- **warped** ``G(P(base(x)))``: G's crop and flip of the base frame, with the same P.

G is recorded as a box in *fractions of the base frame*, so it replays on any map that covers the base
frame, whatever its resolution (:func:`warp_maps` for feature/code maps, :func:`warp_labels` for label
and segment maps; for a ``full`` base view that includes maps at the image's own size): output pixel
``(y, x)`` of an ``(H', W')`` warp shows the base-frame point ``top + (y + 0.5) / H' * height`` (likewise
x, mirrored when flipped), fractions of the base frame.

Deliberate differences from ``[code:PiCIE]`` (which renders a 640 base image, applies P there, then
crops and resizes that tensor):

* the warped view is cut from the *original* image (integer pixels, edges within half a pixel of the
  recorded box) and resized once (bilinear, antialiased), so it is as sharp as the source allows;
* P is applied after that crop, at the output resolution; to keep it the same P as on the base frame,
  contrast blends with the mean grey of the base frame (not of the crop) and the blur sigma, recorded in
  base-frame output pixels, is scaled by the zoom of the crop (so ``G(P(x)) == P'(G(x))`` up to borders);
* the crop keeps the base frame's aspect ratio: one side factor ``r`` for both sides (PiCIE supplement:
  "random crop with crop factor r in [0.5, 1]").
"""
from __future__ import annotations

import json
import math
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from usseg_core.crops import center_crop_box
from usseg_core.errors import ConfigError, InputError
from usseg_core.features import FeatureStore, memory_budget
from usseg_core.store import atomic_write_json
from usseg_core.views import ViewSpec, _resize

PLAIN, WARPED, DRAWS_FILE = "plain.zarr", "warped.zarr", "draws.json"  # files of a view-bank artifact
PLAIN_KIND, WARPED_KIND = "plain", "warped"  # the two renderings of a view
BASE_POLICIES = ("center_crop", "full")  # one item per image: the base frame is one region
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")  # torchvision ColorJitter's op indices
_IDENTITY = {"brightness": 1.0, "contrast": 1.0, "saturation": 1.0, "hue": 0.0}


@dataclass(frozen=True)
class ViewBankConfig:
    """How many views per image and how they are drawn. Defaults: PiCIE supplement (docs/methods/picie.md §2.1)."""

    n_views: int = 4  # V recorded draws per image (ours: PiCIE draws P1, P2, G per image per epoch)
    seed: int = 0  # with the image id and view index, seeds every draw (adding images changes nothing else)
    jitter: tuple[float, float, float, float] = (0.3, 0.3, 0.3, 0.1)  # (brightness, contrast, saturation,
    #                                             hue) strengths, torchvision ColorJitter; PiCIE supplement
    jitter_p: float = 0.8  # probability of colour jitter; PiCIE supplement
    gray_p: float = 0.2  # probability of grayscale; PiCIE supplement
    blur_p: float = 0.5  # probability of Gaussian blur; PiCIE supplement
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # sigma ~ U[lo, hi], base-frame output px; PiCIE supplement
    crop_scale: tuple[float, float] = (0.5, 1.0)  # crop side factor r ~ U[lo, hi]; PiCIE "crop factor r"
    flip_p: float = 0.5  # probability of a horizontal flip; PiCIE supplement

    def __post_init__(self) -> None:
        for name in ("jitter", "blur_sigma", "crop_scale"):
            object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
        if int(self.n_views) != self.n_views or self.n_views < 1:
            raise ConfigError(f"ViewBankConfig.n_views must be a positive integer, got {self.n_views!r}")
        if int(self.seed) != self.seed or self.seed < 0:
            raise ConfigError(f"ViewBankConfig.seed must be a non-negative integer, got {self.seed!r}")
        if len(self.jitter) != 4 or min(self.jitter) < 0 or self.jitter[3] > 0.5:
            raise ConfigError("ViewBankConfig.jitter must be four strengths >= 0 (brightness, contrast, "
                              f"saturation, hue <= 0.5), got {self.jitter}")
        for name in ("jitter_p", "gray_p", "blur_p", "flip_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"ViewBankConfig.{name} is a probability in [0, 1], "
                                  f"got {getattr(self, name)}")
        lo, hi = self.blur_sigma if len(self.blur_sigma) == 2 else (0, -1)
        if not 0 < lo <= hi:
            raise ConfigError(f"ViewBankConfig.blur_sigma must be (lo, hi) with 0 < lo <= hi, "
                              f"got {self.blur_sigma}")
        lo, hi = self.crop_scale if len(self.crop_scale) == 2 else (0, -1)
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"ViewBankConfig.crop_scale must be (lo, hi) with 0 < lo <= hi <= 1, "
                              f"got {self.crop_scale}")

    def params(self) -> dict:
        """JSON-able description, every field (part of the view-bank artifact key)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_params(cls, params: dict) -> "ViewBankConfig":
        """The inverse of :meth:`params` (artifact metadata stores tuples as lists)."""
        unknown = set(params) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"ViewBankConfig has no field(s) {', '.join(sorted(unknown))}")
        return cls(**params)


@dataclass(frozen=True)
class Geometry:
    """G: a crop ``box = (top, left, height, width)`` in fractions of the base frame, then a flip."""

    box: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)
    flip: bool = False


@dataclass(frozen=True)
class Photometric:
    """P: colour jitter (factors as ColorJitter draws them, ``order`` = its permutation of
    :data:`JITTER_OPS`; None = not applied), then grayscale, then a blur of ``blur_sigma`` (or None)."""

    jitter: dict | None = None
    gray: bool = False
    blur_sigma: float | None = None


@dataclass(frozen=True)
class ViewDraw:
    """One recorded view: its photometric and geometric draws."""

    photometric: Photometric
    geometry: Geometry

    def to_dict(self) -> dict:
        return {"photometric": asdict(self.photometric),
                "geometry": {"box": list(self.geometry.box), "flip": self.geometry.flip}}

    @classmethod
    def from_dict(cls, d: dict) -> "ViewDraw":
        g, p = d["geometry"], d["photometric"]
        return cls(Photometric(p["jitter"], bool(p["gray"]), p["blur_sigma"]),
                   Geometry(tuple(float(v) for v in g["box"]), bool(g["flip"])))


IDENTITY = ViewDraw(Photometric(), Geometry())


def draw_views(config: ViewBankConfig, image_id: str, base_hw: tuple[int, int]) -> list[ViewDraw]:
    """The V draws of one image, each seeded by (seed, crc32(image_id), view index) alone.

    ``base_hw`` is the base frame's output size: crop sides are ``round(r * side)`` pixels of it (>= 1),
    top/left uniform integers, so the stored fractions are exact for that frame. Every random number is
    drawn whatever the outcomes, so changing one probability moves no other draw.
    """
    H, W = int(base_hw[0]), int(base_hw[1])
    crc = zlib.crc32(str(image_id).encode("utf-8"))
    out = []
    for v in range(config.n_views):
        rng = np.random.default_rng([config.seed, crc, v])
        r = rng.uniform(*config.crop_scale)
        h, w = max(1, min(H, round(r * H))), max(1, min(W, round(r * W)))
        top, left = int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1))
        flip = bool(rng.random() < config.flip_p)
        a_b, a_c, a_s, a_h = config.jitter
        factors = {"brightness": rng.uniform(max(0.0, 1 - a_b), 1 + a_b),
                   "contrast": rng.uniform(max(0.0, 1 - a_c), 1 + a_c),
                   "saturation": rng.uniform(max(0.0, 1 - a_s), 1 + a_s), "hue": rng.uniform(-a_h, a_h)}
        order = [int(k) for k in rng.permutation(4)]
        jitter = bool(rng.random() < config.jitter_p)
        gray = bool(rng.random() < config.gray_p)
        blur = bool(rng.random() < config.blur_p)
        sigma = float(rng.uniform(*config.blur_sigma))
        out.append(ViewDraw(
            Photometric({**{k: float(f) for k, f in factors.items()}, "order": order} if jitter else None,
                        gray, sigma if blur else None),
            Geometry((top / H, left / W, h / H, w / W), flip)))
    return out


def save_draws(path: str | Path, draws: Sequence[Sequence[ViewDraw]]) -> None:
    """Write ``draws.json``: a list over images of lists over views of :meth:`ViewDraw.to_dict`."""
    atomic_write_json(Path(path), [[d.to_dict() for d in views] for views in draws])


def load_draws(path: str | Path) -> list[list[ViewDraw]]:
    try:
        return [[ViewDraw.from_dict(d) for d in views] for views in json.loads(Path(path).read_text())]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(path, f"is not a readable view-bank draws file ({exc})") from exc


def summarize_draws(draws: Sequence[Sequence[ViewDraw]]) -> dict:
    """Fractions of views flipped / gray / blurred / jittered and the mean crop side (fraction)."""
    flat = [d for views in draws for d in views]
    n = max(1, len(flat))
    return {"views": len(flat),
            "flipped": sum(d.geometry.flip for d in flat) / n,
            "gray": sum(d.photometric.gray for d in flat) / n,
            "blurred": sum(d.photometric.blur_sigma is not None for d in flat) / n,
            "jittered": sum(d.photometric.jitter is not None for d in flat) / n,
            "mean_crop_side": sum((d.geometry.box[2] + d.geometry.box[3]) / 2 for d in flat) / n}


DRAW_COLUMNS = ("image", "view", "crop box t,l,h,w", "flip", "jitter b,c,s,h", "gray", "blur σ")


def draw_rows(draws: Sequence[Sequence[ViewDraw]]) -> list[tuple[str, ...]]:
    """One row of strings per (image, view), columns :data:`DRAW_COLUMNS` (``usseg storage show``)."""
    rows = []
    for i, views in enumerate(draws):
        for v, d in enumerate(views):
            p, g = d.photometric, d.geometry
            jit = "-" if p.jitter is None else ",".join(f"{p.jitter[k]:.2f}" for k in JITTER_OPS)
            blur = "-" if p.blur_sigma is None else f"{p.blur_sigma:.2f}"
            rows.append((str(i), str(v), ",".join(f"{b:.2f}" for b in g.box), "yes" if g.flip else "no",
                         jit, "yes" if p.gray else "no", blur))
    return rows


# --- rendering in image space ----------------------------------------------------------------------

def check_base_view(view: ViewSpec) -> None:
    if view.policy not in BASE_POLICIES:
        raise ConfigError(f"a view bank's base view must have policy {' or '.join(BASE_POLICIES)}, "
                          f"got {view.policy!r}")


def base_region(image_hw: tuple[int, int], base_view: ViewSpec) -> tuple[int, int, int, int]:
    """(top, left, h, w) in original-image pixels of what ``base_view`` shows.

    full: the whole image; center_crop: the centre square of side min(H, W) (= prepare_item's short-side
    resize + centre crop, up to rounding).
    """
    check_base_view(base_view)
    H, W = int(image_hw[0]), int(image_hw[1])
    if base_view.policy == "full":
        return 0, 0, H, W
    return center_crop_box(H, W, min(H, W))


def _cut(image: np.ndarray, base_view: ViewSpec, geom: Geometry) -> torch.Tensor:
    # (H, W, 3) uint8 -> (3, h, w) float: G's box cut from the original image, resized once, flipped
    bt, bl, bh, bw = base_region(image.shape[:2], base_view)
    t, l, h, w = geom.box
    if base_view.flip:  # the base frame is mirrored: its box lies mirrored in the image
        l = 1.0 - l - w
    y0, x0 = round(t * bh), round(l * bw)  # each edge rounded to the nearest pixel
    y1, x1 = max(y0 + 1, round((t + h) * bh)), max(x0 + 1, round((l + w) * bw))
    crop = np.array(image[bt + y0:bt + min(y1, bh), bl + x0:bl + min(x1, bw)], dtype=np.uint8, order="C")
    x = torch.from_numpy(crop).permute(2, 0, 1).float().div_(255.0)  # (3, ch, cw)
    x = _resize(x, base_view.output_size())  # (3, h, w)
    if base_view.flip != geom.flip:
        x = x.flip(-1)
    return x.clamp_(0.0, 1.0).contiguous()


def _tf():
    """torchvision's functional transforms, imported where views are rendered (importing torchvision
    costs seconds: a cached command never needs it)."""
    import torchvision.transforms.functional as TF

    return TF


def _contrast(img: torch.Tensor, factor: float, reference: torch.Tensor) -> torch.Tensor:
    # torchvision adjust_contrast, except that the mean grey comes from ``reference`` (the base frame)
    mean = _tf().rgb_to_grayscale(reference).mean()
    return (factor * img + (1.0 - factor) * mean).clamp(0.0, 1.0)


_JITTER_FN = {"brightness": "adjust_brightness", "saturation": "adjust_saturation", "hue": "adjust_hue"}


def apply_photometric(img: torch.Tensor, p: Photometric, *, reference: torch.Tensor | None = None,
                      zoom: tuple[float, float] = (1.0, 1.0)) -> torch.Tensor:
    """P on ``img`` (3, h, w) float in [0, 1] -> (3, h, w): jitter in the recorded order, gray, blur.

    For a warped view, ``reference`` is the base frame (its mean grey is contrast's) and ``zoom`` the
    box's (height, width) fractions: sigma in base-frame pixels becomes ``sigma / zoom`` view pixels.
    """
    ref, TF = reference, _tf()
    if p.jitter is not None:
        for name in (JITTER_OPS[k] for k in p.jitter["order"]):
            f = float(p.jitter[name])
            if f == _IDENTITY[name]:
                continue
            if name == "contrast":
                img = _contrast(img, f, img if ref is None else ref)
                ref = None  # later ops no longer read the base frame
            else:
                adjust = getattr(TF, _JITTER_FN[name])
                img = adjust(img, f)
                ref = None if ref is None else adjust(ref, f)
    if p.gray:
        img = TF.rgb_to_grayscale(img, num_output_channels=3)
    if p.blur_sigma is not None:
        sy, sx = p.blur_sigma / zoom[0], p.blur_sigma / zoom[1]
        # kernel 2 ceil(3 sigma) + 1, at most 2 side - 1 (reflect padding needs pad < side)
        ky, kx = (min(2 * math.ceil(3 * s) + 1, 2 * n - 1) for s, n in zip((sy, sx), img.shape[-2:]))
        img = TF.gaussian_blur(img, kernel_size=[kx, ky], sigma=[sx, sy])
    return img.clamp(0.0, 1.0).contiguous()


def render_view(image: np.ndarray, base_view: ViewSpec, draw: ViewDraw | None, *,
                geometric: bool) -> torch.Tensor:
    """A view of ``image`` (H, W, 3) uint8 -> (3, h, w) float32 in [0, 1], (h, w) = base output size.

    ``geometric=False``: ``P(base(x))`` (plain); True: ``G(P(base(x)))`` (warped). ``draw=None`` is the
    identity: prepare_item of the base view (up to the rounding of :func:`base_region`).
    """
    draw = draw or IDENTITY
    p = draw.photometric
    if not geometric:
        return apply_photometric(_cut(image, base_view, Geometry()), p)  # (3, h, w)
    view = _cut(image, base_view, draw.geometry)  # (3, h, w)
    needs_base = p.jitter is not None and p.jitter["contrast"] != _IDENTITY["contrast"]
    base = _cut(image, base_view, Geometry()) if needs_base else None  # contrast's mean grey
    _, _, zh, zw = draw.geometry.box
    return apply_photometric(view, p, reference=base, zoom=(zh, zw))


# --- replay of G on maps ---------------------------------------------------------------------------

def _as_list(geoms: Geometry | Sequence[Geometry], batch: int) -> list[Geometry]:
    geoms = [geoms] if isinstance(geoms, Geometry) else list(geoms)
    if len(geoms) != batch:
        raise ConfigError(f"{len(geoms)} geometries for a batch of {batch} maps")
    return geoms


def _sample_points(geoms: Sequence[Geometry], out_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Base-frame fractions sampled by each output row and column: ``(B, H')``, ``(B, W')`` float64."""
    H, W = out_hw
    cy = (torch.arange(H, dtype=torch.float64) + 0.5) / H  # (H',) output centres in [0, 1]
    cx = (torch.arange(W, dtype=torch.float64) + 0.5) / W  # (W',)
    ys = torch.stack([g.box[0] + cy * g.box[2] for g in geoms])  # (B, H')
    xs = torch.stack([g.box[1] + (cx.flip(0) if g.flip else cx) * g.box[3] for g in geoms])  # (B, W')
    return ys, xs


def _gather(maps: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    # (B, C, h, w) -> (B, C, H', W'): the source pixel containing each sample point, never a blend
    h, w = maps.shape[-2:]
    iy = (ys * h).floor().long().clamp_(0, h - 1).to(maps.device)  # (B, H')
    ix = (xs * w).floor().long().clamp_(0, w - 1).to(maps.device)  # (B, W')
    b = torch.arange(maps.shape[0], device=maps.device)[:, None, None]
    return maps[b, :, iy[:, :, None], ix[:, None, :]].permute(0, 3, 1, 2)  # (B, H', W', C) -> (B, C, H', W')


def warp_maps(maps: torch.Tensor, geoms: Geometry | Sequence[Geometry],
              out_size: tuple[int, int] | None = None, mode: str = "bilinear") -> torch.Tensor:
    """Replay G on base-frame maps ``(B, C, h, w)`` -> ``(B, C, H', W')`` (``out_size``, default (h, w)).

    bilinear: ``F.grid_sample(align_corners=False)`` at the sample points (features, codes); nearest:
    the source pixel ``floor(frac * side)`` (what :func:`warp_labels` uses).
    """
    out_size = tuple(out_size or maps.shape[-2:])
    ys, xs = _sample_points(_as_list(geoms, maps.shape[0]), out_size)
    if mode == "nearest":
        return _gather(maps, ys, xs)
    if mode != "bilinear":
        raise ConfigError(f"warp_maps mode {mode!r} unknown; choose bilinear or nearest")
    B, (H, W) = maps.shape[0], out_size
    # align_corners=False: -1 and 1 are the outer edges, so grid = 2 * fraction - 1
    grid = torch.stack([(2 * xs - 1)[:, None, :].expand(B, H, W),
                        (2 * ys - 1)[:, :, None].expand(B, H, W)], dim=-1)  # (B, H', W', 2) as (x, y)
    dtype = maps.dtype if maps.is_floating_point() else torch.float32
    return F.grid_sample(maps.to(dtype), grid.to(maps.device, dtype), mode="bilinear",
                         padding_mode="border", align_corners=False)


def warp_labels(labels, geoms: Geometry | Sequence[Geometry], out_size: tuple[int, int] | None = None):
    """Replay G on label / segment maps ``(B, h, w)`` or ``(h, w)`` (numpy or torch, any int dtype).

    Returns the same kind, dtype and rank, spatial size ``out_size`` (default (h, w)); labels never blend.
    """
    is_numpy = isinstance(labels, np.ndarray)
    t = torch.from_numpy(np.ascontiguousarray(labels)) if is_numpy else labels
    single = t.ndim == 2
    t = t[None] if single else t  # (B, h, w)
    out = warp_maps(t[:, None], geoms, out_size, mode="nearest")[:, 0]  # (B, H', W')
    out = out[0] if single else out
    return out.numpy() if is_numpy else out


# --- reader ----------------------------------------------------------------------------------------

class ViewBank:
    """A view-bank artifact folder: ``plain.zarr``, ``warped.zarr`` (item ``i * V + v``), ``draws.json``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.draws = load_draws(self.path / DRAWS_FILE)
        self.plain_store = FeatureStore(self.path / PLAIN)
        self.warped_store = FeatureStore(self.path / WARPED)
        meta = self.path / "meta.json"
        self.meta = json.loads(meta.read_text()) if meta.exists() else {}
        n = self.n_images * self.n_views
        if len(self.plain_store) != n or len(self.warped_store) != n:
            raise InputError(self.path, f"view bank stores hold {len(self.plain_store)} / "
                             f"{len(self.warped_store)} items, draws.json describes {self.n_images} "
                             f"images x {self.n_views} views")

    @property
    def n_images(self) -> int:
        return len(self.draws)

    @property
    def n_views(self) -> int:
        return len(self.draws[0]) if self.draws else 0

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, h, w) of one item's feature map."""
        return tuple(self.plain_store.shape[1:])  # type: ignore[return-value]

    def plain(self, i: int, v: int) -> np.ndarray:
        """Features of ``P_v(base(x_i))``: (C, h, w) float16."""
        return self.plain_store[i * self.n_views + v]

    def warped(self, i: int, v: int) -> np.ndarray:
        """Features of ``G_v(P_v(base(x_i)))``: (C, h, w) float16."""
        return self.warped_store[i * self.n_views + v]

    def read_batch(self, kind: str, idx: Sequence[int], vs: int | Sequence[int],
                   out: np.ndarray | None = None) -> np.ndarray:
        """Features of images ``idx``, views ``vs`` (one or one per image); kind "plain" | "warped".

        ``(B, C, h, w)``, float16 or into ``out`` (any float dtype): one read of each distinct
        chunk (:meth:`FeatureStore.read_batch`), or a copy when the bank is in memory.
        """
        if kind not in (PLAIN_KIND, WARPED_KIND):
            raise ConfigError(f"view-bank features are {PLAIN_KIND!r} or {WARPED_KIND!r}, not {kind!r}")
        store = self.plain_store if kind == PLAIN_KIND else self.warped_store
        vs = [vs] * len(idx) if isinstance(vs, (int, np.integer)) else list(vs)
        items = [int(i) * self.n_views + int(v) for i, v in zip(idx, vs, strict=True)]
        return store.read_batch(items, out=out)

    def _batch(self, kind: str, idx: Sequence[int], vs: int | Sequence[int]) -> torch.Tensor:
        out = np.empty((len(idx), *self.shape), dtype=np.float32)
        return torch.from_numpy(self.read_batch(kind, idx, vs, out=out))  # (B, C, h, w)

    def plain_batch(self, idx: Sequence[int], vs: int | Sequence[int]) -> torch.Tensor:
        """(B, C, h, w) float32 plain features of images ``idx``, views ``vs`` (one or one per image)."""
        return self._batch(PLAIN_KIND, idx, vs)

    def warped_batch(self, idx: Sequence[int], vs: int | Sequence[int]) -> torch.Tensor:
        """(B, C, h, w) float32 warped features of images ``idx``, views ``vs``."""
        return self._batch(WARPED_KIND, idx, vs)

    def draw(self, i: int, v: int) -> ViewDraw:
        return self.draws[i][v]

    def geometry(self, i: int, v: int) -> Geometry:
        return self.draws[i][v].geometry

    @property
    def nbytes(self) -> int:
        """Bytes of both stores' dense maps in memory (float16)."""
        return self.plain_store.nbytes + self.warped_store.nbytes

    @property
    def in_memory(self) -> bool:
        return self.plain_store.in_memory and self.warped_store.in_memory

    def load_all(self, max_bytes: int | None = None) -> bool:
        """Keep both stores in memory when together they fit ``max_bytes`` (default: the memory budget)."""
        if self.nbytes > (memory_budget() if max_bytes is None else max_bytes):
            return False
        return self.plain_store.load_all(self.nbytes) and self.warped_store.load_all(self.nbytes)

    def unload(self) -> None:
        self.plain_store.unload()
        self.warped_store.unload()
