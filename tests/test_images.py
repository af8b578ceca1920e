"""High-bit-depth images keep their range: 16-bit PNGs are scaled to 8 bits, never clipped to 0/255."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from vtab.images import to_8bit, to_rgb
from vtab.layout import load_image


def _png16_rgb(path: Path, pixels: np.ndarray) -> None:
    """A real 48-bit (16 bits per channel) RGB PNG, written by hand (Pillow cannot write one)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    h, w, _ = pixels.shape
    raw = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )


def test_16bit_gray_png_is_scaled_not_binarised(tmp_path):
    values = (np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16)  # 0 .. 65472
    Image.fromarray(values).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as raw:
        assert raw.mode.startswith("I")  # a real 16-bit file
        clipped = np.asarray(raw.convert("RGB"))
    assert np.unique(clipped).size < 40  # what convert("RGB") alone does: almost everything is 255
    rgb = np.asarray(load_image(tmp_path / "g16.png"))
    assert rgb.dtype == np.uint8 and rgb.shape == (32, 32, 3)
    expected = np.rint(values * (255 / 65535)).astype(np.uint8)
    assert np.array_equal(rgb[..., 0], expected) and np.array_equal(rgb[..., 2], expected)
    assert np.unique(rgb).size == 256  # the whole 8-bit range survives


def test_16bit_rgb_png_keeps_its_high_byte(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 65536, (8, 8, 3), dtype=np.uint16)
    _png16_rgb(tmp_path / "rgb16.png", pixels)
    rgb = np.asarray(load_image(tmp_path / "rgb16.png")).astype(int)
    assert np.abs(rgb - pixels.astype(float) * 255 / 65535).max() <= 1.0


def test_8bit_and_float_modes():
    gray = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16))
    assert to_8bit(gray) is gray and np.asarray(to_rgb(gray))[..., 1].max() == 255
    small_int = Image.fromarray(np.arange(256, dtype=np.int32).reshape(16, 16))  # mode 'I' within 0..255
    assert np.array_equal(np.asarray(to_8bit(small_int)), np.asarray(gray))
    unit = Image.fromarray(np.linspace(0, 1, 256, dtype=np.float32).reshape(16, 16))
    assert np.asarray(to_8bit(unit)).max() == 255 and np.asarray(to_8bit(unit)).min() == 0
