"""Unusual images (survey cases 4, 5, 7): 16-bit PNGs, EXIF orientation and images above
Pillow's decompression-bomb limit, in every reader (training data, tiles, prediction and
the MLflow model's input)."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from polydet.core.errors import DataError
from polydet.data.dataset import load_image
from polydet.data.images import MAX_PIXELS_ENV
from polydet.data.tiling import write_tiles
from polydet.data.validate import ImportLog, check_image
from polydet.tracking import decode_image


def _readers(path: Path) -> dict[str, np.ndarray]:
    """[H, W, 3] from each entry point: training/prediction, and the pyfunc model."""
    return {
        "load_image": load_image(path).permute(1, 2, 0).numpy(),
        "decode_image(path)": decode_image(str(path)).permute(1, 2, 0).numpy(),
        "decode_image(base64)": decode_image(base64.b64encode(path.read_bytes()).decode())
        .permute(1, 2, 0)
        .numpy(),
    }


def test_16_bit_grey_png_is_scaled_not_whitened(tmp_path: Path) -> None:
    # A dark 16-bit image: values 0..12000 of 65535 (Pillow's RGB conversion clips to 255).
    raw = (np.arange(48 * 64).reshape(48, 64) * 4).astype(np.uint16)
    path = tmp_path / "grey16.png"
    Image.fromarray(raw).save(path)
    expected = raw.astype(np.float64) / 65535.0
    for name, arr in _readers(path).items():
        assert arr.shape == (48, 64, 3), name
        for c in range(3):
            np.testing.assert_allclose(arr[:, :, c], expected, atol=1e-6, err_msg=name)
    # Tiles are written from the same reader (8-bit, rounded).
    [tile], _ = write_tiles(path, "g", [(0, 0, 32, 32)], tmp_path / "tiles", {})
    got = np.asarray(Image.open(tile))[:, :, 0].astype(np.float64)
    np.testing.assert_allclose(got, np.round(expected[:32, :32] * 255), atol=0.5)


def _png_rgb16(raw: np.ndarray) -> bytes:
    """A 16-bit RGB PNG written by hand (Pillow cannot write one)."""
    import struct
    import zlib

    h, w, _ = raw.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    rows = b"".join(b"\0" + raw[y].astype(">u2").tobytes() for y in range(h))
    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))


def test_16_bit_rgb_png_keeps_its_colours(tmp_path: Path) -> None:
    raw = np.random.default_rng(0).integers(0, 65536, (16, 24, 3)).astype(np.uint16)
    path = tmp_path / "rgb16.png"
    path.write_bytes(_png_rgb16(raw))
    for name, arr in _readers(path).items():
        np.testing.assert_allclose(arr, raw / 65535.0, atol=1 / 255 + 1e-6, err_msg=name)


def _turned_jpeg(path: Path) -> np.ndarray:
    """A JPEG stored 96 wide x 192 tall with EXIF orientation 6 (displayed turned 90 deg
    clockwise, 192 x 96); returns the stored pixels."""
    yy, xx = np.mgrid[0:192, 0:96]
    stored = np.stack([xx * 2, yy, np.full_like(xx, 128)], axis=2).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(path, exif=exif, quality=95)
    with Image.open(path) as im:  # the stored pixels as decoded, before orientation
        return np.asarray(im.convert("RGB"))


def test_exif_orientation_is_applied_in_every_reader(tmp_path: Path) -> None:
    path = tmp_path / "phone.jpg"
    stored = _turned_jpeg(path)
    displayed = np.rot90(stored, k=-1)  # orientation 6: rotate 90 degrees clockwise
    assert displayed.shape[:2] == (96, 192)
    log = ImportLog()
    assert check_image(path, log) == (192, 96)  # prepare records the displayed size
    for name, arr in _readers(path).items():
        assert arr.shape == (96, 192, 3), name
        np.testing.assert_allclose(arr, displayed / 255.0, atol=1e-6, err_msg=name)
    [tile], _ = write_tiles(path, "p", [(0, 0, 192, 96)], tmp_path / "tiles", {})
    assert (np.asarray(Image.open(tile)) == displayed).all()


def test_images_above_pillows_bomb_limit_are_read_under_polydets_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "aerial.png"
    Image.new("RGB", (80, 60), (10, 20, 30)).save(path)
    # Pillow's guard scaled down: 4,800 pixels is then more than twice its limit, which is
    # what a 14000 x 14000 DOTA image is for the real limit.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    monkeypatch.delenv(MAX_PIXELS_ENV, raising=False)
    assert load_image(path).shape == (3, 60, 80)
    assert check_image(path, ImportLog()) == (80, 60)
    assert Image.MAX_IMAGE_PIXELS == 1000  # Pillow's own setting is left alone

    # polydet's limit is stated and configurable; above it, one line naming the file.
    monkeypatch.setenv(MAX_PIXELS_ENV, "4000")
    with pytest.raises(DataError, match=rf"aerial\.png: image is 80x60 .*{MAX_PIXELS_ENV}"):
        load_image(path)
    log = ImportLog("skip")
    assert check_image(path, log) is None
    assert any("above the limit" in str(i) and "aerial.png" in str(i) for i in log.issues)
    with pytest.raises(DataError, match=MAX_PIXELS_ENV):
        decode_image(base64.b64encode(path.read_bytes()).decode())
    monkeypatch.setenv(MAX_PIXELS_ENV, "0")  # no limit
    assert decode_image(str(path)).shape == (3, 60, 80)


def test_a_text_file_is_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("not an image\n")
    with pytest.raises(DataError, match=r"notes\.png: not an image format"):
        load_image(path)
    with pytest.raises(DataError, match="image bytes: not an image format"):
        decode_image(base64.b64encode(b"hello").decode())
