"""Reading images and label maps from disk, validated at the boundary.

Every reader here either returns a well-formed array or raises :class:`~usseg_core.errors.InputError`
naming the file and the problem (docs/contributing.md: validate early, say what is wrong). In particular a
truncated JPEG or PNG is never half-loaded: Pillow's ``LOAD_TRUNCATED_IMAGES`` is forced off and the
pixel data is fully decoded before returning, and PNGs are additionally chunk-CRC verified.

Orientation: EXIF rotation tags are deliberately *not* applied. Label maps are stored in the raw
pixel orientation of their image, so rotating the image would misalign it with its label.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from usseg_core.errors import InputError

__all__ = ["read_rgb", "read_label", "read_mat", "array_to_rgb", "image_size"]

# A truncated file must raise, not come back with grey padding (Pillow's default is already False,
# but another library in the same process may have flipped it globally).
ImageFile.LOAD_TRUNCATED_IMAGES = False

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
# Single-channel modes whose values are raw label ids ("P": palette PNGs such as PASCAL VOC store the
# class id as the palette index; the palette colours are irrelevant).
_LABEL_MODES = ("L", "P", "1", "I", *_SIXTEEN_BIT_MODES)


def _read_bytes(path: Path) -> bytes:
    """Read a whole file, mapping the usual OS failures to InputError."""
    if not path.exists():
        raise InputError(path, "file does not exist")
    if not path.is_file():
        raise InputError(path, "is not a regular file")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise InputError(path, f"cannot be read ({err.strerror or err})") from err
    if len(data) == 0:
        raise InputError(path, "file is empty (0 bytes)")
    return data


def _open_decoded(path: Path) -> Image.Image:
    """Open an image with Pillow and force a full decode; raise InputError on any failure."""
    data = _read_bytes(path)
    try:
        probe = Image.open(io.BytesIO(data))
        fmt = probe.format
        if fmt == "PNG":
            # verify() walks every chunk and checks its CRC: catches a PNG cut after the pixel data
            # or with flipped bytes that zlib alone would not notice.
            probe.verify()
        img = Image.open(io.BytesIO(data))
        img.load()  # full decode: raises "image file is truncated" for truncated JPEG/PNG
    except UnidentifiedImageError as err:
        raise InputError(path, "is not an image file Pillow can identify") from err
    except Image.DecompressionBombError as err:
        raise InputError(path, f"image is too large to decode safely ({err})") from err
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise InputError(path, f"image data is truncated or corrupt ({err})") from err
    if img.width == 0 or img.height == 0:
        raise InputError(path, f"image has zero size ({img.width}x{img.height})")
    return img


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) of an image file, read from its header only (no pixel decode)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file does not exist" if not path.exists() else "is not a regular file")
    if path.stat().st_size == 0:
        raise InputError(path, "file is empty (0 bytes)")
    try:
        with Image.open(path) as img:
            return img.height, img.width
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise InputError(path, f"is not a readable image ({err})") from err


def _integer_to_uint8(values: np.ndarray, bits: int) -> np.ndarray:
    """Scale unsigned integers of ``bits`` bit depth to [0, 255] (full range maps to full range).

    Rounds to nearest: value v -> round(v * 255 / (2**bits - 1)). Exact for multiples of 257 at 16 bit.
    """
    top = float(2**bits - 1)
    return np.rint(values.astype(np.float64) * (255.0 / top)).clip(0, 255).astype(np.uint8)


def _float_to_uint8(values: np.ndarray, path: Path) -> np.ndarray:
    """Map float pixels to uint8: [0, 1] data is scaled by 255, [0, 255] data is kept, else min-max."""
    if not np.isfinite(values).all():
        raise InputError(path, "float image contains NaN or infinite values")
    lo, hi = float(values.min()), float(values.max())
    if lo >= 0.0 and hi <= 1.0:
        scaled = values * 255.0
    elif lo >= 0.0 and hi <= 255.0:
        scaled = values
    else:  # unknown range (e.g. reflectances): stretch, so the image is at least visible
        scaled = (values - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(values)
    return np.rint(scaled).clip(0, 255).astype(np.uint8)


def _bits_for_int_mode(img: Image.Image, values: np.ndarray, path: Path) -> int:
    """Bit depth of a Pillow 32-bit integer ("I") image: from TIFF BitsPerSample, PNG = 16, else range."""
    if values.size and values.min() < 0:
        raise InputError(path, "integer image has negative pixel values; cannot map to 8-bit RGB")
    tags = getattr(img, "tag_v2", None)
    if tags is not None and 258 in tags:  # TIFF BitsPerSample
        per_sample = tags[258]
        return int(per_sample[0] if isinstance(per_sample, tuple) else per_sample)
    if img.format == "PNG":
        return 16  # older Pillow opens 16-bit grey PNGs as "I"
    return 16 if values.size == 0 or values.max() <= 65535 else 32


def _composite_on_black(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Premultiply by alpha = composite over a black background. (H, W, 3) uint8, (H, W) uint8."""
    out = np.rint(rgb.astype(np.float64) * (alpha.astype(np.float64)[..., None] / 255.0))
    return out.astype(np.uint8)


def _pil_to_rgb(img: Image.Image, path: Path) -> np.ndarray:
    mode = img.mode
    if mode == "RGB":
        return np.asarray(img, dtype=np.uint8)
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
        if mode == "RGB":
            return np.asarray(img, dtype=np.uint8)
    if mode == "RGBA":
        arr = np.asarray(img, dtype=np.uint8)
        return _composite_on_black(arr[..., :3], arr[..., 3])
    if mode == "LA":
        arr = np.asarray(img, dtype=np.uint8)
        grey = _composite_on_black(np.repeat(arr[..., :1], 3, axis=2), arr[..., 1])
        return grey
    if mode in ("L", "1"):
        grey = np.asarray(img.convert("L"), dtype=np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        values = np.asarray(img).astype(np.int64)
        bits = 16 if mode in _SIXTEEN_BIT_MODES else _bits_for_int_mode(img, values, path)
        grey = _integer_to_uint8(values, bits)
        return np.repeat(grey[..., None], 3, axis=2)
    if mode == "F":
        grey = _float_to_uint8(np.asarray(img, dtype=np.float64), path)
        return np.repeat(grey[..., None], 3, axis=2)
    # CMYK, YCbCr, LAB, HSV, RGBX, ...: Pillow's own conversion (CMYK uses the naive formula).
    try:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (ValueError, OSError) as err:
        raise InputError(path, f"image mode {mode!r} cannot be converted to RGB ({err})") from err


def read_rgb(path: str | Path) -> np.ndarray:
    """Read an image file as RGB.

    Conversions: greyscale (L, 1) is replicated to 3 channels; palette images are expanded;
    **images with alpha (RGBA, LA, palette + transparency) are composited on black**, i.e. each
    channel is multiplied by alpha / 255; CMYK/YCbCr/... use Pillow's conversion; 16-bit images are
    scaled by their bit depth (v * 255 / 65535, rounded), never clipped; float images in [0, 1] are
    scaled by 255. Only the first frame of a multi-frame file is read.

    Args:
        path: image file (any format Pillow reads: JPEG, PNG, BMP, TIFF, WebP, ...).

    Returns:
        (H, W, 3) uint8 array, C-contiguous.

    Raises:
        InputError: missing, empty, truncated or corrupt file, not an image, or zero-size image.
    """
    path = Path(path)
    img = _open_decoded(path)
    rgb = _pil_to_rgb(img, path)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise InputError(path, f"decoded to unexpected shape {rgb.shape}")
    return np.ascontiguousarray(rgb)


def read_mat(path: str | Path, key: str) -> np.ndarray:
    """Read one variable from a MATLAB (v5) .mat file.

    Raises:
        InputError: missing/empty/corrupt file, or ``key`` not in the file (the message lists the keys).
    """
    import scipy.io  # local import: scipy.io is slow to import and only .mat datasets need it

    path = Path(path)
    data = _read_bytes(path)
    try:
        content = scipy.io.loadmat(io.BytesIO(data))
    except Exception as err:  # scipy raises ValueError/TypeError/MatReadError/... on bad files
        raise InputError(path, f"is not a readable .mat file ({type(err).__name__}: {err})") from err
    if key not in content:
        keys = sorted(k for k in content if not k.startswith("__"))
        raise InputError(path, f"has no variable {key!r} (variables: {keys})")
    return np.asarray(content[key])


def array_to_rgb(arr: np.ndarray, path: str | Path) -> np.ndarray:
    """Convert an (H, W), (H, W, 1), (H, W, 3) or (H, W, C>3) array to (H, W, 3) uint8.

    Extra channels beyond the first three are dropped (e.g. Potsdam's near-infrared band). uint8 is
    kept, uint16 scaled by 65535, floats as in :func:`read_rgb`, other integers by their range.
    ``path`` is only used in error messages.
    """
    path = Path(path)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] < 3:
        raise InputError(path, f"image array has shape {arr.shape}; expected (H, W, >=3) or (H, W)")
    arr = arr[..., :3]  # (H, W, 3)
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise InputError(path, f"image has zero size ({arr.shape[1]}x{arr.shape[0]})")
    if arr.dtype == np.uint8:
        out = arr
    elif arr.dtype == np.bool_:
        out = arr.astype(np.uint8) * 255
    elif arr.dtype == np.uint16:
        out = _integer_to_uint8(arr, 16)
    elif np.issubdtype(arr.dtype, np.floating):
        out = _float_to_uint8(arr.astype(np.float64), path)
    elif np.issubdtype(arr.dtype, np.integer):
        if arr.min() < 0:
            raise InputError(path, "integer image has negative pixel values")
        bits = 8 if arr.max() <= 255 else (16 if arr.max() <= 65535 else 32)
        out = _integer_to_uint8(arr, bits)
    else:
        raise InputError(path, f"image array has unsupported dtype {arr.dtype}")
    return np.ascontiguousarray(out, dtype=np.uint8)


def _label_from_pil(path: Path) -> np.ndarray:
    img = _open_decoded(path)
    if img.mode not in _LABEL_MODES:
        raise InputError(
            path,
            f"label image has mode {img.mode!r} with {len(img.getbands())} channels; expected a "
            "single-channel 8/16-bit PNG of raw class ids (colour-coded label PNGs must be converted "
            "to class ids first)",
        )
    return np.asarray(img).astype(np.int64)


def _label_from_mat(path: Path, mat_key: str) -> np.ndarray:
    arr = read_mat(path, mat_key)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise InputError(path, f"label {mat_key!r} has shape {arr.shape}; expected (H, W)")
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all() or not np.array_equal(arr, np.round(arr)):
            raise InputError(path, f"label {mat_key!r} has non-integer values")
    elif not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
        raise InputError(path, f"label {mat_key!r} has unsupported dtype {arr.dtype}")
    return arr.astype(np.int64)


def read_label(path: str | Path, *, mat_key: str | None = None) -> np.ndarray:
    """Read a label map of raw (dataset-specific, unmapped) class values.

    Args:
        path: a single-channel 8- or 16-bit image (PNG; palette PNGs give their palette indices), or
            a ``.mat`` file when ``mat_key`` is given.
        mat_key: variable name inside the .mat file (required for .mat files).

    Returns:
        (H, W) int64 raw values.

    Raises:
        InputError: unreadable/truncated file, an RGB/RGBA label image, a .mat without ``mat_key``,
            or a non-2-D / non-integer .mat label.
    """
    path = Path(path)
    if path.suffix.lower() == ".mat":
        if mat_key is None:
            raise InputError(path, "is a .mat label file but no mat_key was given")
        label = _label_from_mat(path, mat_key)
    else:
        label = _label_from_pil(path)
    if label.shape[0] == 0 or label.shape[1] == 0:
        raise InputError(path, f"label map has zero size {label.shape}")
    return np.ascontiguousarray(label)
