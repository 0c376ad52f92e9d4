"""Reading user and dataset images: `read_image(path) -> PIL RGB`, or a one-line `ImageError`.

The image is fully decoded (a truncated file fails here, not later), turned upright by its EXIF orientation, and
converted to 8-bit RGB: transparency is composited on white; 16-bit, 32-bit and float images are scaled by their
actual value range to 0..255. Files over `max_pixels` are refused before decoding (decompression bombs).

Pillow's global state is never left changed: its own bomb check (`Image.MAX_IMAGE_PIXELS`, which raises above twice
that value) still applies on top of `max_pixels`; `ImageFile.LOAD_TRUNCATED_IMAGES` is switched off only for the
duration of a decode (under a lock) when something else had switched it on.
"""
from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from music_dagster.errors import UserError

DEFAULT_MAX_PIXELS = 64_000_000
_TRUNCATED_LOCK = threading.Lock()
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_WIDE_MODES = {"I", "F", "I;16", "I;16L", "I;16B", "I;16N"}


class ImageError(UserError):
    """An image that cannot be used: missing, empty, not an image, truncated, too large; one line naming it."""


def _decode(path: Path, max_pixels: int) -> Image.Image:
    with warnings.catch_warnings():
        # The size check below is ours; Pillow's warning for sizes between its limit and twice it is noise.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise ImageError(f"{path}: {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels} "
                                 "(decompression bomb?)")
            im.load()
            return ImageOps.exif_transpose(im)


def _load_strict(path: Path, max_pixels: int) -> Image.Image:
    if not ImageFile.LOAD_TRUNCATED_IMAGES:
        return _decode(path, max_pixels)
    with _TRUNCATED_LOCK:
        previous, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
        try:
            return _decode(path, max_pixels)
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _wide_to_l(im: Image.Image) -> Image.Image:
    """16-bit / 32-bit / float -> 8-bit by the image's actual range (a flat image maps by its nominal range)."""
    a = np.asarray(im).astype(np.float64)
    finite = np.isfinite(a)
    if not finite.any():
        return Image.new("L", im.size, 0)
    lo, hi = a[finite].min(), a[finite].max()
    a = np.where(finite, a, lo)
    if hi > lo:
        a = (a - lo) / (hi - lo) * 255.0
    elif im.mode.startswith("I;16"):
        a = a / 257.0
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")


def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB of any Pillow mode; transparency composited on white."""
    if im.mode == "RGB":
        return im
    if im.mode in _WIDE_MODES:
        return _wide_to_l(im).convert("RGB")
    if im.mode in _ALPHA_MODES or (im.mode in {"P", "L", "RGB"} and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def read_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """The image at `path` as an upright 8-bit RGB PIL image, fully decoded; `ImageError` (one line) otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise ImageError(f"{path}: empty file")
    try:
        im = _load_strict(path, max_pixels)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image (unrecognised format)") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"{path}: {str(e).splitlines()[0]}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ImageError(f"{path}: truncated or corrupt image ({detail})") from None
    try:
        return to_rgb(im)
    except ValueError as e:
        raise ImageError(f"{path}: unsupported image mode {im.mode} ({e})") from None
