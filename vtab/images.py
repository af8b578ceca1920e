"""Pixel formats: every decoded image becomes 8-bit RGB with its full range kept.

Pillow's ``convert("RGB")`` clips high-bit-depth grayscale (modes ``I;16``, ``I;16B``, ``I``: 16-bit
PNGs and TIFFs) at 255 instead of scaling it, which silently binarises a 16-bit image (every value
above 255 becomes white). :func:`to_rgb` scales those modes by ``255 / 65535`` (``I``/``I;16*`` hold
0..65535 from 16-bit files; a 32-bit ``I`` image whose values stay within 0..255 is taken as 8-bit)
and float images (mode ``F``) by 255 when they lie in [0, 1]. 16-bit RGB
PNGs are already reduced to 8 bits per channel by Pillow's decoder (the high byte), which is correct.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["to_rgb", "to_8bit"]

_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")


def to_8bit(image: Image.Image) -> Image.Image:
    """An 8-bit image (``L``, ``RGB``, ``RGBA``, ``P`` ... unchanged; 16-bit and float gray scaled to ``L``)."""
    if image.mode in _SIXTEEN_BIT or image.mode == "I":
        values = np.asarray(image, dtype=np.float64)
        if image.mode in _SIXTEEN_BIT or (values.size and values.max() > 255):
            values = values * (255.0 / 65535.0)
    elif image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if values.size and np.nanmax(values) <= 1.0:
            values = values * 255.0
    else:
        return image
    return Image.fromarray(np.clip(np.rint(np.nan_to_num(values)), 0, 255).astype(np.uint8), mode="L")


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB with the image's full range kept (see the module docstring)."""
    return to_8bit(image).convert("RGB")  # a loaded copy even for RGB: callers close the file after
