"""The one image reader: every image polydet reads (prepare, training, tiles, evaluation,
prediction, the MLflow model) goes through :func:`open_image` and :func:`rgb_float`.

- **Orientation**: the EXIF ``Orientation`` tag is applied, so an image is processed as it is
  displayed (a phone JPEG shown as 192x96 is 192 wide), and labels are read in those pixels.
- **Modes**: 8-bit images (``L``, ``P``, ``RGB``, ``RGBA``, ``CMYK``, ...) are converted to
  RGB (alpha dropped); 16-bit images (``I;16*``, and ``I`` as Pillow opens 16-bit PNG/TIFF)
  are scaled by 1/65535, floating-point ones (``F``) are taken as [0, 1] (or [0, 255] when
  their maximum is above 1); Pillow's own conversion to RGB would clip them all to white.
- **Size limit**: Pillow refuses images above ~179 megapixels as possible decompression bombs;
  aerial images are that big. The limit here is ``POLYDET_MAX_IMAGE_PIXELS`` (default
  :data:`DEFAULT_MAX_PIXELS`, 400 megapixels; ``0`` = none), and an image above it is a
  :class:`~polydet.core.errors.DataError` naming the file, its size and the setting.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from polydet.core.errors import DataError

MAX_PIXELS_ENV = "POLYDET_MAX_IMAGE_PIXELS"
DEFAULT_MAX_PIXELS = 400_000_000  # a 20000 x 20000 image (DOTA v2's largest)
_ORIENTATION = 0x0112
_SWAPS_AXES = (5, 6, 7, 8)  # EXIF orientations that rotate by 90 or 270 degrees


def max_image_pixels() -> int | None:
    """The pixel limit from ``POLYDET_MAX_IMAGE_PIXELS`` (``None``: no limit)."""
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(float(raw))
    except ValueError:
        raise DataError(f"{MAX_PIXELS_ENV}={raw!r} is not a number of pixels") from None
    return value if value > 0 else None


def _name(source: str | Path | bytes | IO[bytes]) -> str:
    return str(source) if isinstance(source, str | Path) else "image bytes"


@contextmanager
def open_raw(source: str | Path | bytes | IO[bytes]) -> Iterator[Image.Image]:
    """Open an image lazily (header only) under polydet's size limit, not yet oriented.

    Raises :class:`DataError` naming the file for a missing, unreadable or too large image.
    """
    name = _name(source)
    fp = io.BytesIO(source) if isinstance(source, bytes) else source
    limit = max_image_pixels()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # checked below
            try:
                im = Image.open(fp)
            finally:
                Image.MAX_IMAGE_PIXELS = saved
    except FileNotFoundError as e:
        raise DataError(f"{name}: no such image file") from e
    except UnidentifiedImageError as e:
        raise DataError(f"{name}: not an image format Pillow can read") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{name}: cannot read image: {e}") from e
    with im:
        w, h = im.size
        if limit is not None and w * h > limit:
            gb = w * h * 3 * 4 / 1e9
            raise DataError(
                f"{name}: image is {w}x{h} = {w * h:,} pixels, above the limit of {limit:,} "
                f"({MAX_PIXELS_ENV}; it needs about {gb:.2g} GB as a float tensor): set "
                f"{MAX_PIXELS_ENV}={w * h} (or 0 for no limit) to read it"
            )
        yield im


def _orientation(im: Image.Image) -> int:
    try:
        return im.getexif().get(_ORIENTATION, 1)
    except (OSError, ValueError, SyntaxError):
        return 1


def displayed_size(im: Image.Image) -> tuple[int, int]:
    """``(width, height)`` as displayed: swapped when EXIF says the image is turned 90 deg."""
    w, h = im.size
    return (h, w) if _orientation(im) in _SWAPS_AXES else (w, h)


@contextmanager
def open_image(source: str | Path | bytes | IO[bytes]) -> Iterator[Image.Image]:
    """The decoded image, EXIF orientation applied (errors as :func:`open_raw`)."""
    with open_raw(source) as im:
        try:
            im.load()
            # Upright images are yielded as decoded: exif_transpose would copy them (a 10,000
            # x 10,000 image is 400 MB in Pillow); callers use the image inside the block.
            oriented = im if _orientation(im) == 1 else ImageOps.exif_transpose(im)
        except (OSError, SyntaxError, ValueError) as e:
            raise DataError(f"{_name(source)}: cannot read image: {e}") from e
        yield oriented


def rgb_float(im: Image.Image) -> np.ndarray:
    """``[H, W, 3]`` float32 in [0, 1] from any Pillow mode (module docstring: the rules)."""
    mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(im, dtype=np.float32) / 65535.0
    elif mode == "F":
        arr = np.asarray(im, dtype=np.float32)
        peak = float(np.nanmax(arr)) if arr.size else 0.0
        arr = arr / 255.0 if peak > 1.0 else arr
    else:
        return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    arr = np.clip(np.nan_to_num(arr, nan=0.0), 0.0, 1.0)
    return np.repeat(arr[:, :, None], 3, axis=2)


def rgb_image(im: Image.Image) -> Image.Image:
    """An 8-bit RGB copy of ``im`` with the scaling of :func:`rgb_float` (for PNGs, drawing)."""
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        return Image.fromarray(np.round(rgb_float(im) * 255.0).astype(np.uint8), "RGB")
    return im.convert("RGB")


def read_rgb(source: str | Path | bytes | IO[bytes]) -> np.ndarray:
    """An image file (or its bytes) as ``[H, W, 3]`` float32 in [0, 1], as displayed."""
    with open_image(source) as im:
        return rgb_float(im)
