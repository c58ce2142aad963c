"""Augmentations that keep polyboxes exact and canonical.

Images are ``[3, H, W]`` float tensors in [0, 1]; targets are dicts with ``"polyboxes"``
``[N, 10]`` (image pixels, pixel-edge convention: the image spans ``[0, W] x [0, H]``) and
per-object tensors (``"labels"``, ``"difficult"``) that geometric transforms leave alone, except
``"first_corner"`` (the heading, :mod:`polydet.geometry.heading`), which each transform maps
exactly: the annotation's first edge stays the first edge.
Flips and 90-degree rotations move every pixel centre exactly onto another pixel centre, so
the transformed polyboxes cover exactly the transformed object pixels; corners are
re-canonicalized (a flip reverses the winding). Photometric jitter leaves geometry alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from polydet.geometry import heading, polybox
from polydet.core.config import AugmentConfig

Target = dict[str, Tensor | str]


def _with_boxes(target: Target, boxes: Tensor, moved_ring: Tensor | None = None) -> Target:
    """``target`` with new ``boxes``; ``moved_ring [N, 4, 2]`` = the old canonical rings with
    the transform applied to their points (old order), to carry ``first_corner`` over."""
    out = dict(target)
    out["polyboxes"] = boxes
    if moved_ring is not None and "first_corner" in target:
        first = target["first_corner"]
        out["first_corner"] = heading.map_first_corner(moved_ring, polybox.to_corners(boxes), first)
    return out


def hflip(image: Tensor, target: Target) -> tuple[Tensor, Target]:
    """Mirror left-right: image ``[3, H, W]`` and its polyboxes."""
    w = image.shape[-1]
    c = polybox.to_corners(target["polyboxes"])
    moved = torch.stack([w - c[..., 0], c[..., 1]], dim=-1)
    return image.flip(-1), _with_boxes(target, polybox.hflip(target["polyboxes"], w), moved)


def vflip(image: Tensor, target: Target) -> tuple[Tensor, Target]:
    """Mirror top-bottom: image ``[3, H, W]`` and its polyboxes."""
    h = image.shape[-2]
    c = polybox.to_corners(target["polyboxes"])
    moved = torch.stack([c[..., 0], h - c[..., 1]], dim=-1)
    return image.flip(-2), _with_boxes(target, polybox.vflip(target["polyboxes"], h), moved)


def rot90(image: Tensor, target: Target, k: int = 1) -> tuple[Tensor, Target]:
    """Rotate by ``k`` quarter turns counter-clockwise on screen (``torch.rot90`` on H, W);
    the result is ``[3, W, H]`` for odd ``k``."""
    h, w = image.shape[-2:]
    boxes = polybox.rot90(target["polyboxes"], w, h, k)
    moved, width = polybox.to_corners(target["polyboxes"]), w
    for _ in range(k % 4):  # as polybox.rot90: (x, y) -> (y, W - x), then W and H swap
        moved = torch.stack([moved[..., 1], width - moved[..., 0]], dim=-1)
        width = h if width == w else w
    return torch.rot90(image, k, dims=(-2, -1)), _with_boxes(target, boxes, moved)


def resize(image: Tensor, target: Target, size: tuple[int, int]) -> tuple[Tensor, Target]:
    """Resize to ``size = (height, width)`` (bilinear, pixel-edge aligned); polyboxes scale by
    ``width / W`` and ``height / H`` exactly (a pixel-edge point ``x`` goes to ``x * sx``)."""
    h, w = image.shape[-2:]
    out = F.interpolate(
        image[None], size=size, mode="bilinear", align_corners=False, antialias=True
    )[0]
    sx, sy = size[1] / w, size[0] / h
    boxes = polybox.scale(target["polyboxes"], sx, sy)
    moved = polybox.to_corners(target["polyboxes"]) * target["polyboxes"].new_tensor([sx, sy])
    return out.clamp(0.0, 1.0), _with_boxes(target, boxes, moved)


def _gray(image: Tensor) -> Tensor:
    """Luma ``[1, H, W]`` of an RGB image ``[3, H, W]`` (ITU-R 601 weights)."""
    return (0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2])[None]


def color_jitter(
    image: Tensor, strength: float, generator: torch.Generator | None = None
) -> Tensor:
    """Brightness, contrast, then saturation, each scaled by a random factor in
    ``[1 - strength, 1 + strength]``; values clamped to [0, 1]. Geometry is unchanged."""
    if strength <= 0:
        return image
    b, c, s = (1.0 + strength * (2.0 * torch.rand(3, generator=generator) - 1.0)).tolist()
    image = (image * b).clamp(0.0, 1.0)
    mean = _gray(image).mean()
    image = ((image - mean) * c + mean).clamp(0.0, 1.0)
    gray = _gray(image)
    return ((image - gray) * s + gray).clamp(0.0, 1.0)


class Augment:
    """Random training augmentation from :class:`~polydet.config.AugmentConfig`: flips,
    a rotation by 90/180/270 degrees, photometric jitter. Uses ``generator`` when given,
    else torch's global RNG (which ``DataLoader`` seeds per worker)."""

    def __init__(self, cfg: AugmentConfig) -> None:
        self.cfg = cfg

    def __call__(
        self, image: Tensor, target: Target, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Target]:
        u = torch.rand(3, generator=generator).tolist()
        if u[0] < self.cfg.hflip:
            image, target = hflip(image, target)
        if u[1] < self.cfg.vflip:
            image, target = vflip(image, target)
        if u[2] < self.cfg.rot90:
            k = int(torch.randint(1, 4, (1,), generator=generator))
            image, target = rot90(image, target, k)
        if self.cfg.color_jitter > 0:
            image = color_jitter(image, self.cfg.color_jitter, generator)
        return image, target
