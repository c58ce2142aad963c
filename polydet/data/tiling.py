"""Large images as overlapping tiles, and per-tile detections merged back.

- :func:`tile_grid`: tiles of ``size`` px (less at the image's own size) with at least
  ``overlap`` px shared by neighbours; the last row/column is flush with the image edge, so
  every pixel is covered and no tile is padded.
- :func:`tile_plan`: the tiles of every scale of ``data.tile.scales`` (DOTA's multi-scale
  split): at scale ``r`` a tile covers ``round(size / r)`` source pixels, neighbours share
  ``round(overlap / r)``, and the tile is resized by ``r`` (:func:`resize_tile`) to about
  ``size`` pixels, so ``polydet prepare`` and ``polydet predict`` cut the same tiles.
- :func:`tile_objects`: an object fully inside a tile is kept as is (shifted to tile pixels);
  an object cut by the tile edge is kept when at least ``min_visible`` of its area is inside,
  **clipped** to the tile, reduced to a quad by :mod:`polydet.data.quads`' rule and marked
  ``truncated``; otherwise it is left to the tiles that see more of it. With ``overlap`` at
  least the largest object's size every object is whole in some tile.
- :func:`write_tiles`: tile images are written once as PNG under ``tiles/`` and reused as
  long as ``tiles/index.json`` records the same source (SHA-256 of its bytes) and box.
- :func:`merge_detections`: tile detections are shifted to full-image pixels and
  deduplicated by polygon NMS per class (``polydet.ops.batched_nms``), or over all classes
  (``class_agnostic``: one object labelled differently in two tiles is kept once); a partial detection of
  an object cut by a tile edge overlaps the whole one found in a neighbouring tile by
  ``min_visible`` or more and is suppressed by it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from polydet.core.files import file_sha256
from polydet.data.images import open_image, rgb_image
from polydet.data.quads import clip_quad, inside_share
from polydet.geometry import heading, polybox

Box = tuple[int, int, int, int]
Tile = tuple[Box, float]  # source pixels, and the scale the tile is resized by


def tile_grid(width: int, height: int, size: int, overlap: int) -> list[Box]:
    """Tiles ``(x0, y0, x1, y1)`` (pixels, end exclusive) covering a ``width`` x ``height``
    image, row by row."""
    if size < 1 or not 0 <= overlap < size:
        raise ValueError(f"need size >= 1 and 0 <= overlap < size, got {size}, {overlap}")

    def starts(n: int) -> list[int]:
        if n <= size:
            return [0]
        return [*range(0, n - size, size - overlap), n - size]

    return [
        (x, y, min(x + size, width), min(y + size, height))
        for y in starts(height)
        for x in starts(width)
    ]


def tile_plan(
    width: int, height: int, size: int, overlap: int, scales: Sequence[float] = (1.0,)
) -> list[Tile]:
    """``(box, scale)`` of every tile of a ``width`` x ``height`` image, scale by scale
    (module docstring); at scale 1 the boxes are :func:`tile_grid`'s."""
    plan: list[Tile] = []
    for r in scales:
        side = max(1, round(size / r))
        plan += [
            (b, float(r)) for b in tile_grid(width, height, side, min(round(overlap / r), side - 1))
        ]
    return plan


def scaled_size(box: Box, scale: float) -> tuple[int, int]:
    """``(width, height)`` of a tile ``box`` resized by ``scale`` (at least 1 pixel)."""
    return max(1, round((box[2] - box[0]) * scale)), max(1, round((box[3] - box[1]) * scale))


def resize_tile(tile: Image.Image, scale: float) -> Image.Image:
    """A tile cut at ``scale`` != 1 resized to :func:`scaled_size` (bilinear, antialiased)."""
    if scale == 1.0:
        return tile
    return tile.resize(scaled_size((0, 0, *tile.size), scale), Image.BILINEAR)


def tile_objects(
    polyboxes: np.ndarray, tile: Box, min_visible: float, scale: float = 1.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Objects of one tile from full-image polyboxes ``[N, 10]``: ``(polyboxes [M, 10] in tile
    pixels, index [M] into the input, clipped [M] bool)``; at ``scale`` != 1, in the pixels
    of the tile resized to :func:`scaled_size`."""
    boxes = torch.as_tensor(np.asarray(polyboxes, dtype=np.float64)).reshape(-1, 10)
    x0, y0, x1, y1 = (float(t) for t in tile)
    hull = polybox.hull_xyxy(boxes).numpy()
    near = np.flatnonzero(
        (hull[:, 0] < x1) & (hull[:, 2] > x0) & (hull[:, 1] < y1) & (hull[:, 3] > y0)
    )
    out, index, clipped = [], [], []
    if len(near):
        corners = polybox.to_corners(boxes[near]).numpy()  # [K, 4, 2]
        inside = (
            (hull[near, 0] >= x0)
            & (hull[near, 1] >= y0)
            & (hull[near, 2] <= x1)
            & (hull[near, 3] <= y1)
        )
        share = inside_share(corners, (x0, y0, x1, y1))
        for k, i in enumerate(near):
            if inside[k]:
                out.append(boxes[i].numpy())
                clipped.append(False)
            elif share[k] >= min_visible:
                quad = clip_quad(corners[k], (x0, y0, x1, y1))
                if quad is None:
                    continue
                out.append(polybox.from_corners(torch.from_numpy(quad)).numpy())
                clipped.append(True)
            else:
                continue
            index.append(i)
    res = np.array(out, dtype=np.float64).reshape(-1, 10)
    res[:, 0] -= x0
    res[:, 1] -= y0
    if scale != 1.0:  # exactly the resized tile's size over the box's, per axis
        w, h = scaled_size(tile, scale)
        res = polybox.scale(torch.from_numpy(res), w / (x1 - x0), h / (y1 - y0)).numpy()
    return res, np.array(index, dtype=np.int64), np.array(clipped, dtype=bool)


def tile_first_corner(
    polyboxes: np.ndarray,
    first_corner: np.ndarray,
    tile: Box,
    scale: float,
    tile_boxes: np.ndarray,
    index: np.ndarray,
) -> np.ndarray:
    """``first_corner [M]`` of the objects :func:`tile_objects` returned (``tile_boxes [M, 10]``,
    ``index [M]``) from the full-image ``polyboxes [N, 10]`` and ``first_corner [N]``: the first
    edge is carried through the shift, scale and clipping (:mod:`polydet.geometry.heading`)."""
    x0, y0, x1, y1 = (float(t) for t in tile)
    w, h = scaled_size(tile, scale) if scale != 1.0 else (x1 - x0, y1 - y0)
    old = torch.as_tensor(np.asarray(polyboxes, dtype=np.float64)).reshape(-1, 10)[index]
    ring = polybox.to_corners(old) - old.new_tensor([x0, y0])
    ring = ring * ring.new_tensor([w / (x1 - x0), h / (y1 - y0)])
    new = polybox.to_corners(torch.as_tensor(np.asarray(tile_boxes, dtype=np.float64)))
    first = torch.as_tensor(np.asarray(first_corner, dtype=np.int64))[index]
    return heading.map_first_corner(ring, new.reshape(-1, 4, 2), first).numpy()


def tile_name(image_id: str, tile: Box, scale: float = 1.0) -> str:
    """Image id of a tile: ``<image_id>__<x0>_<y0>``, plus ``_s<scale>`` at scale != 1."""
    return f"{image_id}__{tile[0]}_{tile[1]}" + (f"_s{scale:g}" if scale != 1.0 else "")


def write_tiles(
    source: Path, image_id: str, tiles: Sequence[Box | Tile], tiles_dir: Path, index: dict
) -> tuple[list[Path], int]:
    """Write the tiles (boxes, or ``(box, scale)`` of :func:`tile_plan`) of ``source`` as
    ``tiles_dir/<tile_name>.png`` unless ``index`` (the loaded ``tiles/index.json`` mapping,
    updated in place) shows they are current; returns the tile paths and how many were
    (re)written."""
    digest = file_sha256(source)
    paths, written, image = [], 0, None
    try:
        for item in tiles:
            t, r = item if isinstance(item[1], float) else (item, 1.0)  # type: ignore[misc]
            name = tile_name(image_id, t, r)
            path = tiles_dir / f"{name}.png"
            entry = {"source": str(source), "sha256": digest, "box": list(t)}
            if r != 1.0:
                entry["scale"] = r
            if not (path.is_file() and index.get(name) == entry):
                if image is None:  # as displayed, 8-bit RGB (polydet.data.images)
                    with open_image(source) as im:
                        image = rgb_image(im)
                path.parent.mkdir(parents=True, exist_ok=True)
                resize_tile(image.crop(t), r).save(path, format="PNG", compress_level=1)
                index[name] = entry
                written += 1
            paths.append(path)
    finally:
        if image is not None:
            image.close()
    return paths, written


def load_index(tiles_dir: Path) -> dict:
    """``tiles/index.json`` as a dict (empty when missing or unreadable: tiles get rewritten)."""
    try:
        return json.loads((tiles_dir / "index.json").read_text())
    except (OSError, ValueError):
        return {}


def save_index(tiles_dir: Path, index: dict) -> None:
    """Write ``tiles/index.json`` (sorted, stable)."""
    tiles_dir.mkdir(parents=True, exist_ok=True)
    (tiles_dir / "index.json").write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")


def merge_detections(
    tiles: Sequence[tuple[tuple[float, float], Mapping[str, Tensor]]],
    iou_threshold: float,
    class_agnostic: bool = False,
) -> dict[str, Tensor]:
    """Full-image detections from per-tile ones: ``tiles`` holds ``((x0, y0), {"polyboxes"
    [K, 10], "scores" [K], "labels" [K]})`` per tile, in that tile's (unscaled) pixels.
    Shifted by the tile offset, then polygon NMS per label (or over all labels with
    ``class_agnostic``); result sorted by descending score."""
    from polydet.geometry.ops import batched_nms

    boxes, scores, labels, firsts = [], [], [], []
    for (x0, y0), d in tiles:
        if "first_corner" in d:  # the heading (issue 15): a shift keeps the canonical ring
            firsts.append(torch.as_tensor(d["first_corner"], dtype=torch.int64).reshape(-1))
        b = torch.as_tensor(d["polyboxes"], dtype=torch.float32).reshape(-1, 10)
        boxes.append(polybox.translate(b, float(x0), float(y0)))
        scores.append(torch.as_tensor(d["scores"], dtype=torch.float32).reshape(-1))
        labels.append(torch.as_tensor(d["labels"], dtype=torch.int64).reshape(-1))
    if not boxes:
        return {
            "polyboxes": torch.zeros(0, 10),
            "scores": torch.zeros(0),
            "labels": torch.zeros(0, dtype=torch.int64),
        }
    b, s, lab = torch.cat(boxes), torch.cat(scores), torch.cat(labels)
    keep = batched_nms(b, s, torch.zeros_like(lab) if class_agnostic else lab, iou_threshold)
    keep = keep[s[keep].argsort(descending=True, stable=True)]
    out = {"polyboxes": b[keep], "scores": s[keep], "labels": lab[keep]}
    if len(firsts) == len(boxes):
        out["first_corner"] = torch.cat(firsts)[keep]
        out["heading"] = heading.heading_degrees(out["polyboxes"], out["first_corner"])
    return out
