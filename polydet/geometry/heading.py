"""An object's heading: which corner of its canonical ring the annotation started at.

DOTA lists an object's corners clockwise from its head (the top-left for symmetric classes),
ICDAR 2015 from the start of the text line; the canonical ring of :mod:`polydet.geometry.polybox`
(the geometry everything else uses) forgets that order. ``first_corner`` keeps it: an index
``k`` in 0..3 into the canonical ring, or :data:`UNKNOWN` (-1) where there is none (old
manifests, symmetric classes). The ring runs clockwise on screen, so the annotation's first
edge is ``ring[k] -> ring[k + 1]``.

**Heading convention**: the direction from the quad's centre (mean of the corners) to the
midpoint of its first edge, in degrees in ``[0, 360)``, measured in image axes (x right,
y down) as ``atan2(dy, dx)``: 0 = pointing right, 90 = down, 180 = left, 270 = up (so the angle
grows clockwise on screen, like the manifest's ``angle``).

**Under a transform** (flip, 90-degree rotation, scaling, clipping) the first *edge* is what
is kept: the new ``first_corner`` is the new ring's edge whose midpoint is nearest the
transformed midpoint of the old first edge. For a rotation that is the image of the old
first corner; a flip reverses the winding, so the clockwise ring now runs along that edge from
the image of the old *second* corner, which is how an annotator would list the mirrored object
clockwise from its head. All functions are pure and batched over leading dimensions.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from polydet.geometry.polybox import to_corners

UNKNOWN = -1


def _gather_corner(ring: Tensor, index: Tensor) -> Tensor:
    """``ring [..., 4, 2]`` at ``index [...]`` (0..3) -> ``[..., 2]``."""
    idx = index.clamp(0, 3).long()[..., None, None].expand(*index.shape, 1, 2)
    return ring.gather(-2, idx).squeeze(-2)


def nearest_corner(ring: Tensor, point: Tensor) -> Tensor:
    """Index ``[...]`` (int64) of the corner of ``ring [..., 4, 2]`` nearest ``point [..., 2]``."""
    return ((ring - point[..., None, :]) ** 2).sum(-1).argmin(-1)


def edge_midpoints(ring: Tensor) -> Tensor:
    """Midpoints ``[..., 4, 2]`` of the edges ``ring[k] -> ring[k + 1]`` of ``ring [..., 4, 2]``."""
    return 0.5 * (ring + ring.roll(-1, dims=-2))


def first_edge_midpoint(ring: Tensor, first: Tensor) -> Tensor:
    """Midpoint ``[..., 2]`` of the edge ``ring[first] -> ring[first + 1]``."""
    return _gather_corner(edge_midpoints(ring), first)


def nearest_edge(ring: Tensor, point: Tensor) -> Tensor:
    """Index ``[...]`` (int64) of the edge ``ring[k] -> ring[k + 1]`` of ``ring [..., 4, 2]``
    whose midpoint is nearest ``point [..., 2]``."""
    return ((edge_midpoints(ring) - point[..., None, :]) ** 2).sum(-1).argmin(-1)


def map_first_corner(old_ring: Tensor, new_ring: Tensor, first: Tensor) -> Tensor:
    """``first_corner [...]`` after a transform (module docstring): ``old_ring [..., 4, 2]``
    is the old canonical ring *with the transform applied to its points* (old order kept),
    ``new_ring [..., 4, 2]`` the new canonical ring, ``first [...]`` the old indices;
    :data:`UNKNOWN` stays unknown."""
    if first.numel() == 0:
        return first.clone()
    k = nearest_edge(new_ring, first_edge_midpoint(old_ring, first))
    return torch.where(first >= 0, k, torch.full_like(k, UNKNOWN)).to(first.dtype)


def heading_degrees(polyboxes: Tensor, first: Tensor) -> Tensor:
    """Heading ``[...]`` in degrees ``[0, 360)`` (module docstring) of polyboxes ``[..., 10]``
    with first corners ``first [...]``; NaN where ``first`` is unknown."""
    rel = to_corners(polyboxes) - polyboxes[..., None, 0:2]  # [..., 4, 2] around the centre
    mid = first_edge_midpoint(rel, first)
    # * (180 / pi): what torch.rad2deg computes, bit for bit, but ONNX-exportable (opset 17
    # has no rad2deg; the exported model computes the heading in its graph).
    deg = torch.atan2(mid[..., 1], mid[..., 0]) * (180.0 / math.pi) % 360.0
    return torch.where(first >= 0, deg, torch.full_like(deg, float("nan")))


def start_at_first(corners: Tensor, first: Tensor) -> Tensor:
    """Corners ``[..., 4, 2]`` rolled so that corner ``first [...]`` comes first (the order
    DOTA and ICDAR files list); unchanged where ``first`` is unknown."""
    start = first.clamp(0, 3).long()
    idx = (start[..., None] + torch.arange(4, device=corners.device)) % 4  # [..., 4]
    rolled = corners.gather(-2, idx[..., None].expand(*idx.shape, 2))
    return torch.where((first >= 0)[..., None, None], rolled, corners)


def angle_error(a: Tensor, b: Tensor) -> Tensor:
    """Absolute angular difference ``[...]`` in degrees ``[0, 180]`` of headings ``a``, ``b``."""
    d = (a - b) % 360.0
    return torch.minimum(d, 360.0 - d)


def scale_first_corner(
    old: Tensor, new: Tensor, first: Tensor, sx: float | Tensor, sy: float | Tensor
) -> Tensor:
    """``first_corner [...]`` of polyboxes ``old [..., 10]`` after ``polybox.scale(old, sx,
    sy)`` made them ``new [..., 10]`` (an anisotropic scale can move the canonical start);
    ``sx``, ``sy``: numbers, or tensors that broadcast against ``first`` (per-image scales
    of a batch, as the exported graph has)."""
    if first.numel() == 0:
        return first
    corners = to_corners(old)
    fx = torch.as_tensor(sx, dtype=corners.dtype, device=corners.device)[..., None]
    fy = torch.as_tensor(sy, dtype=corners.dtype, device=corners.device)[..., None]
    moved = torch.stack([corners[..., 0] * fx, corners[..., 1] * fy], -1)
    return map_first_corner(moved, to_corners(new), first)
