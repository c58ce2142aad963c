"""The prepared dataset as training data: records, a ``torch`` ``Dataset`` and its collate.

Reads ``images.csv`` / ``objects.csv`` written by :func:`polydet.data.prepare.prepare`
(``docs/CONTRACTS.md``). Images are decoded on access (a 256x256 PNG takes ~1 ms, far below
a training step); labels are held in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from polydet.core.config import AugmentConfig
from polydet.data.augment import Augment
from polydet.data.images import read_rgb
from polydet.data.manifest import BOX_COLUMNS, SPLITS, read_tables
from polydet.core.errors import DataError


@dataclass(frozen=True)
class Record:
    """One image of the prepared dataset with its N objects."""

    image_id: str
    path: str  # as written in images.csv (relative to the working directory, or absolute)
    width: int
    height: int
    polyboxes: Tensor  # [N, 10] float32, canonical, image pixels
    labels: Tensor  # [N] int64, 1-based (0 is background)
    difficult: Tensor  # [N] bool
    first_corner: Tensor  # [N] int64, 0..3 or -1 unknown (polydet.geometry.heading)


def load_records(prepared_dir: str | Path, split: str | None) -> list[Record]:
    """Records of one split (``"train" | "val" | "test"``; ``None`` = all), in images.csv order."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
    d = Path(prepared_dir)
    if not (d / "images.csv").is_file() or not (d / "objects.csv").is_file():
        raise DataError(
            f"{d}: no prepared dataset here (images.csv/objects.csv); run `polydet prepare`"
        )
    images, objects = read_tables(d)
    if split is not None:
        images = images[images["split"] == split]
        objects = objects[objects["split"] == split]
    groups = {k: g for k, g in objects.groupby("image_id", sort=False)}
    records = []
    for row in images.itertuples(index=False):
        g = groups.get(row.image_id)
        if g is None:
            boxes, labels, difficult = np.zeros((0, 10)), np.zeros(0, np.int64), np.zeros(0, bool)
            first = np.zeros(0, np.int64)
        else:
            # Copies: pandas' copy-on-write hands out read-only views torch would warn about.
            boxes = g[BOX_COLUMNS].to_numpy(np.float64, copy=True)
            labels = g["label"].to_numpy(np.int64, copy=True)
            difficult = g["difficult"].to_numpy(bool, copy=True)
            first = g["first_corner"].to_numpy(np.int64, copy=True)
        records.append(
            Record(
                image_id=row.image_id,
                path=row.path,
                width=int(row.width),
                height=int(row.height),
                polyboxes=torch.from_numpy(boxes).float().reshape(-1, 10),
                labels=torch.from_numpy(labels),
                difficult=torch.from_numpy(difficult),
                first_corner=torch.from_numpy(first),
            )
        )
    return records


def load_image(path: str | Path, size: tuple[int, int] | None = None) -> Tensor:
    """RGB image ``[3, H, W]`` float32 in [0, 1], as displayed (EXIF orientation applied;
    16-bit and other modes scaled: :mod:`polydet.data.images`); ``size = (width, height)``
    is checked."""
    arr = read_rgb(path)
    if size is not None and (arr.shape[1], arr.shape[0]) != tuple(size):
        raise DataError(
            f"{path}: image is {arr.shape[1]}x{arr.shape[0]}, the prepared dataset says "
            f"{size[0]}x{size[1]}; run `polydet prepare` again"
        )
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


class PolyDataset(Dataset):
    """Item ``i``: ``(image [3, H, W] float32 in [0, 1], {"polyboxes": [N, 10] float32,
    "labels": [N] int64, "difficult": [N] bool, "first_corner": [N] int64, "image_id": str})``, augmented by
    :class:`~polydet.data.augment.Augment` when ``augment`` is given."""

    def __init__(
        self, prepared_dir: str | Path, split: str | None, augment: AugmentConfig | None = None
    ) -> None:
        self.records = load_records(prepared_dir, split)
        self.augment = Augment(augment) if augment is not None else None

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[Tensor, dict]:
        r = self.records[i]
        image = load_image(r.path, (r.width, r.height))
        target = {
            "polyboxes": r.polyboxes.clone(),
            "labels": r.labels.clone(),
            "difficult": r.difficult.clone(),
            "first_corner": r.first_corner.clone(),
            "image_id": r.image_id,
        }
        if self.augment is not None:
            image, target = self.augment(image, target)
        return image, target


def collate(batch: list[tuple[Tensor, dict]]) -> tuple[list[Tensor], list[dict]]:
    """Keep images and targets as lists (images may differ in size, e.g. after rot90)."""
    images, targets = zip(*batch) if batch else ((), ())
    return list(images), list(targets)
