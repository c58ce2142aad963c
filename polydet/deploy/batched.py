"""Detection over a stream of images of any size, in batches, with bounded memory.

:func:`detect_stream` takes ``(key, image)`` pairs one at a time and yields each image's
detections as soon as its last model input has run:

- An image larger than ``data.tile.size`` (tiling enabled) is cut into the tiles of
  :func:`polydet.data.tiling.tile_plan` (every scale of ``data.tile.scales``), each resized
  by its scale as ``polydet prepare`` resizes training tiles. Tiles are cut **lazily**, when
  a batch needs them: only the image itself (8-bit, as decoded: 400 MB in Pillow for
  10,000 x 10,000 RGB, against 1.2 GB as a float tensor) and one batch of float tiles are
  held, never all tiles.
- Model inputs (whole images and tiles, across images) go to ``model.predict`` in batches of
  ``batch_size`` (``evaluate.batch_size``), under ``torch.autocast`` (float16) on CUDA when
  ``train.amp`` is on.
- Tile detections are scaled back by ``1 / scale``, shifted to the image and merged by
  :func:`polydet.data.tiling.merge_detections` (polygon NMS per class, or class-agnostic).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from polydet.core.config import TileConfig
from polydet.core.errors import DataError
from polydet.data.images import open_image, rgb_float, rgb_image
from polydet.data.tiling import Tile, merge_detections, resize_tile, tile_plan
from polydet.geometry import heading, polybox

Source = Image.Image | Tensor  # a decoded 8-bit RGB image, or [3, H, W] uint8 / float32


@contextlib.contextmanager
def open_source(path: Any) -> Iterator[Source]:
    """An image file as displayed, for :func:`detect_stream`, valid inside the block: the
    decoded Pillow image itself for 8-bit RGB (no copy: 400 MB for 10,000 x 10,000), an RGB
    conversion of other 8-bit modes, a float ``[3, H, W]`` tensor (the values of
    :mod:`polydet.data.images`) for 16-bit and float images."""
    with open_image(path) as im:
        if im.mode.startswith("I;16") or im.mode in ("I", "F"):
            yield torch.from_numpy(rgb_float(im)).permute(2, 0, 1)
        elif im.mode == "RGB":
            yield im
        else:
            with rgb_image(im) as rgb:
                yield rgb


def size_of(image: Source) -> tuple[int, int]:
    """``(width, height)`` of a source image."""
    return image.size if isinstance(image, Image.Image) else (image.shape[-1], image.shape[-2])


def to_float(image: Tensor) -> Tensor:
    """``[3, H, W]`` float32 in [0, 1] (``uint8 / 255`` as ``rgb_float`` computes it)."""
    return image.float() / 255.0 if image.dtype == torch.uint8 else image.float()


def cut(image: Source, tile: Tile) -> Tensor:
    """The float tile ``(box, scale)`` of a source image (resized by the scale as ``polydet
    prepare`` resizes training tiles: the same pixels)."""
    (x0, y0, x1, y1), r = tile
    if isinstance(image, Image.Image):
        crop = np.asarray(resize_tile(image.crop((x0, y0, x1, y1)), r))
        return to_float(torch.from_numpy(crop.copy()).permute(2, 0, 1)).contiguous()
    crop = image[:, y0:y1, x0:x1]
    if r == 1.0:
        return to_float(crop).contiguous()
    if crop.dtype == torch.uint8:
        pil = Image.fromarray(crop.permute(1, 2, 0).contiguous().numpy(), "RGB")
        return cut(pil, ((0, 0, x1 - x0, y1 - y0), r))
    raise DataError("multi-scale tiles need an 8-bit image")


def autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager:
    """float16 autocast on CUDA when ``amp``; nothing elsewhere (on CPU, bfloat16 inference
    would cost accuracy for little speed)."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def _filter(det: dict[str, Tensor], score_thresh: float) -> dict[str, Tensor]:
    keep = det["scores"] >= score_thresh
    return {k: v[keep].detach().float().cpu() if v.is_floating_point() else v[keep].cpu()
            for k, v in det.items()}  # fmt: skip


def plan_of(width: int, height: int, tile: TileConfig) -> list[Tile]:
    """The model inputs of one image: the whole image, or its tiles when it is larger than
    ``tile.size`` and tiling is enabled."""
    if tile.enabled and max(width, height) > tile.size:
        return tile_plan(width, height, tile.size, tile.overlap, tile.scales)
    return [((0, 0, width, height), 1.0)]


def detect_stream(
    model: Any,
    images: Iterable[tuple[Any, Source]],
    tile: TileConfig,
    score_thresh: float,
    batch_size: int,
    iou_threshold: float,
    class_agnostic: bool = False,
    amp: bool = True,
) -> Iterator[tuple[Any, dict[str, Tensor], int]]:
    """``(key, detections in the image's pixels, number of model inputs)`` per image of
    ``images`` (:func:`open_source` images, or ``[3, H, W]`` uint8 / float tensors), in input
    order (module docstring); an image is needed only until its last tile is cut.
    Detections scoring below ``score_thresh`` are dropped before the merge."""
    pending: dict[int, list] = {}  # image number -> [key, inputs left, parts, n]
    batch: list[tuple[int, Tile, Tensor]] = []
    order: list[int] = []  # image numbers, in input order, not yet yielded

    def run() -> None:
        if not batch:
            return
        with torch.inference_mode(), autocast(_device(model), amp):
            found = model.predict([x for _, _, x in batch])
        for (n, ((x0, y0, x1, y1), r), x), det in zip(batch, found):
            det = _filter(det, score_thresh)
            if r != 1.0:
                sx, sy = (x1 - x0) / x.shape[-1], (y1 - y0) / x.shape[-2]
                old, det["polyboxes"] = det["polyboxes"], polybox.scale(det["polyboxes"], sx, sy)
                if "first_corner" in det:  # the heading (issue 15) through the scale
                    det["first_corner"] = heading.scale_first_corner(
                        old, det["polyboxes"], det["first_corner"], sx, sy
                    )
                    det["heading"] = heading.heading_degrees(det["polyboxes"], det["first_corner"])
            pending[n][2].append(((float(x0), float(y0)), det))
            pending[n][1] -= 1
        batch.clear()

    def finished() -> Iterator[tuple[Any, dict[str, Tensor], int]]:
        while order and pending[order[0]][1] == 0:
            key, _, parts, count = pending.pop(order.pop(0))
            if count == 1:
                ((_, det),) = parts
                yield key, det, 1
            else:
                yield key, merge_detections(parts, iou_threshold, class_agnostic), count

    for n, (key, image) in enumerate(images):
        w, h = size_of(image)
        plan = plan_of(w, h, tile)
        pending[n] = [key, len(plan), [], len(plan)]
        order.append(n)
        for t in plan:  # cut when the batch takes it: one batch of float tiles at a time
            batch.append((n, t, cut(image, t)))
            if len(batch) == batch_size:
                run()
                yield from finished()
        del image
    run()
    yield from finished()


def _device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return torch.device("cpu")
