"""Image and label reading: conversions with exact expected values, and every refusal names the file."""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from usseg_core.errors import InputError
from usseg_core.imageio import array_to_rgb, image_size, read_label, read_mat, read_rgb


def _save(arr: np.ndarray, path: Path, mode: str | None = None, **kw) -> Path:
    Image.fromarray(arr, mode=mode).save(path, **kw) if mode else Image.fromarray(arr).save(path, **kw)
    return path


def _rgb(h: int = 12, w: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _error_for(path: Path, fn=read_rgb, **kw) -> InputError:
    with pytest.raises(InputError) as info:
        fn(path, **kw)
    assert path.name in str(info.value), str(info.value)
    return info.value


# ---------------------------------------------------------------- conversions
def test_rgb_png_round_trip_exact(tmp_path):
    arr = _rgb()
    out = read_rgb(_save(arr, tmp_path / "a.png"))
    assert out.dtype == np.uint8 and out.shape == (12, 16, 3)
    np.testing.assert_array_equal(out, arr)


def test_grayscale_is_replicated(tmp_path):
    grey = np.array([[0, 7], [128, 255]], np.uint8)
    out = read_rgb(_save(grey, tmp_path / "g.png"))
    assert out.shape == (2, 2, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], grey)


def test_rgba_is_composited_on_black(tmp_path):
    arr = np.zeros((1, 3, 4), np.uint8)
    arr[0, 0] = (200, 100, 50, 128)  # half transparent: 200*128/255 = 100.39 -> 100, 50.2 -> 50, 25.1 -> 25
    arr[0, 1] = (10, 20, 30, 255)  # opaque: unchanged
    arr[0, 2] = (255, 255, 255, 0)  # fully transparent: black
    out = read_rgb(_save(arr, tmp_path / "rgba.png"))
    np.testing.assert_array_equal(out[0], [[100, 50, 25], [10, 20, 30], [0, 0, 0]])


def test_la_is_composited_on_black(tmp_path):
    arr = np.array([[[200, 128], [90, 255]]], np.uint8)  # (1, 2, 2) grey + alpha
    Image.fromarray(arr, mode="LA").save(tmp_path / "la.png")
    out = read_rgb(tmp_path / "la.png")
    np.testing.assert_array_equal(out[0], [[100, 100, 100], [90, 90, 90]])


def test_palette_image_expands_to_its_colours(tmp_path):
    img = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), mode="P")
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    img.save(tmp_path / "p.png")
    out = read_rgb(tmp_path / "p.png")
    np.testing.assert_array_equal(out[0, 0], [255, 0, 0])
    np.testing.assert_array_equal(out[0, 1], [0, 0, 255])


def test_16bit_scaled_by_bit_depth_not_clipped(tmp_path):
    values = np.array([[0, 257, 1000, 65535]], np.uint16)  # 1000 * 255 / 65535 = 3.89 -> 4 (a clip would give 255)
    path = _save(values, tmp_path / "deep.png")
    assert Image.open(path).mode.startswith("I")
    out = read_rgb(path)
    np.testing.assert_array_equal(out[0, :, 0], [0, 1, 4, 255])
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_float_tiff_in_unit_range_is_scaled(tmp_path):
    values = np.array([[0.0, 0.5, 1.0]], np.float32)  # -> 0, 127.5 -> 128 (rint of .5 goes to even: 128), 255
    Image.fromarray(values, mode="F").save(tmp_path / "f.tif")
    out = read_rgb(tmp_path / "f.tif")
    np.testing.assert_array_equal(out[0, :, 1], [0, 128, 255])


def test_cmyk_converts(tmp_path):
    cmyk = np.array([[[0, 0, 0, 0], [255, 0, 0, 0], [0, 0, 0, 255]]], np.uint8)
    Image.fromarray(cmyk, mode="CMYK").save(tmp_path / "c.tif")
    out = read_rgb(tmp_path / "c.tif")
    np.testing.assert_array_equal(out[0], [[255, 255, 255], [0, 255, 255], [0, 0, 0]])


def test_array_to_rgb_drops_extra_channels_and_scales():
    rgbi = np.zeros((2, 2, 4), np.float32)
    rgbi[..., 0], rgbi[..., 3] = 1.0, 0.7  # the 4th (IR) channel must be ignored
    out = array_to_rgb(rgbi, "x.mat")
    np.testing.assert_array_equal(out[0, 0], [255, 0, 0])
    deep = np.full((1, 1, 3), 65535, np.uint16)
    np.testing.assert_array_equal(array_to_rgb(deep, "y.mat")[0, 0], [255, 255, 255])
    with pytest.raises(InputError, match="z.mat"):
        array_to_rgb(np.full((2, 2, 3), np.nan, np.float32), "z.mat")


def test_image_size_reads_header(tmp_path):
    assert image_size(_save(_rgb(7, 9), tmp_path / "s.png")) == (7, 9)


# ---------------------------------------------------------------- refusals
def test_missing_file(tmp_path):
    assert "does not exist" in str(_error_for(tmp_path / "nope.jpg"))


def test_empty_file(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    assert "0 bytes" in str(_error_for(tmp_path / "empty.png"))


def test_text_file_named_jpg(tmp_path):
    (tmp_path / "notes.jpg").write_text("this is not an image\n")
    assert "not an image" in str(_error_for(tmp_path / "notes.jpg"))


@pytest.mark.parametrize("cut", [2, 200, 0.5])
def test_truncated_jpeg(tmp_path, cut):
    buf = io.BytesIO()
    Image.fromarray(_rgb(64, 80)).save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    keep = int(len(data) * cut) if isinstance(cut, float) else len(data) - cut
    (tmp_path / "cut.jpg").write_bytes(data[:keep])
    assert "truncated" in str(_error_for(tmp_path / "cut.jpg"))


@pytest.mark.parametrize("cut", [12, 13, 0.5])
def test_truncated_png(tmp_path, cut):
    buf = io.BytesIO()
    Image.fromarray(_rgb(64, 80)).save(buf, "PNG")
    data = buf.getvalue()
    keep = int(len(data) * cut) if isinstance(cut, float) else len(data) - cut  # 12: IEND chunk gone
    (tmp_path / "cut.png").write_bytes(data[:keep])
    _error_for(tmp_path / "cut.png")


def test_corrupt_png_byte(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(_rgb(64, 80)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "flip.png").write_bytes(bytes(data))
    _error_for(tmp_path / "flip.png")


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def test_zero_size_image(tmp_path):
    ihdr = struct.pack(">IIBBBBB", 0, 4, 8, 2, 0, 0, 0)  # width 0, height 4, RGB 8-bit
    data = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 4))
    data += _png_chunk(b"IEND", b"")
    (tmp_path / "zero.png").write_bytes(data)
    _error_for(tmp_path / "zero.png")


# ---------------------------------------------------------------- labels
def test_label_png_8_and_16_bit_raw_values(tmp_path):
    eight = np.array([[0, 5], [254, 255]], np.uint8)
    out = read_label(_save(eight, tmp_path / "l8.png"))
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out, eight)
    sixteen = np.array([[0, 300], [1000, 65535]], np.uint16)
    np.testing.assert_array_equal(read_label(_save(sixteen, tmp_path / "l16.png")), sixteen)


def test_palette_label_gives_indices(tmp_path):
    img = Image.fromarray(np.array([[0, 3], [2, 1]], np.uint8), mode="P")
    img.putpalette([v % 256 for v in range(256 * 3)])
    img.save(tmp_path / "pal.png")
    np.testing.assert_array_equal(read_label(tmp_path / "pal.png"), [[0, 3], [2, 1]])


def test_rgb_label_refused(tmp_path):
    err = _error_for(_save(_rgb(4, 4), tmp_path / "colour_label.png"), fn=read_label)
    assert "single-channel" in err.problem


def test_truncated_label_refused(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 20, (64, 64), dtype=np.uint8)).save(buf, "PNG")
    (tmp_path / "lab.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    _error_for(tmp_path / "lab.png", fn=read_label)


def test_mat_label_and_missing_key(tmp_path):
    gt = np.array([[0, 1], [255, 5]], np.uint8)
    scipy.io.savemat(tmp_path / "gt.mat", {"gt": gt})
    np.testing.assert_array_equal(read_label(tmp_path / "gt.mat", mat_key="gt"), gt)
    err = _error_for(tmp_path / "gt.mat", fn=read_label, mat_key="labels")
    assert "'gt'" in err.problem  # lists the variables that do exist
    _error_for(tmp_path / "gt.mat", fn=read_label)  # no key given
    scipy.io.savemat(tmp_path / "frac.mat", {"gt": np.array([[0.5, 1.0]])})
    _error_for(tmp_path / "frac.mat", fn=read_label, mat_key="gt")


def test_read_mat_refuses_non_mat(tmp_path):
    (tmp_path / "bad.mat").write_text("hello")
    _error_for(tmp_path / "bad.mat", fn=read_mat, key="img")
