"""The polybox convention: a quadrilateral as its centre plus 4 corners relative to it.

A polybox tensor has shape ``[..., 10]``, float32, absolute pixels::

    (xc, yc, dx1, dy1, dx2, dy2, dx3, dy3, dx4, dy4)

Corner ``i`` is ``(xc + dxi, yc + dyi)`` and ``(xc, yc)`` is the mean of the 4 corners.

Canonical corner order (the rule every function here produces):

1. Corners run **clockwise on screen** (image ``y`` grows downward), i.e. by increasing
   ``atan2(y - yc, x - xc)`` around the centre; for a convex quadrilateral this is the
   boundary order whatever order the input listed them in.
2. The **first corner** is the one with the smallest ``x + y`` (the corner nearest the image's
   top-left along the diagonal); a tie (a corner pair on a line ``x + y = const``, e.g. a
   square rotated by 45 degrees) goes to the smaller ``y``.

The rule is a function of the *set* of corners only, so ``from_corners`` gives the same
polybox for any permutation of the same 4 points; that is what keeps polyboxes canonical
after a flip or a 90 degree rotation (which reverse or rotate the listed order): transform
the corners, then canonicalize (see :func:`hflip`, :func:`vflip`, :func:`rot90`). For an
axis-aligned rectangle the order is top-left, top-right, bottom-right, bottom-left, the
same as the corners of the reference box the coder encodes against.

Invalid quadrilaterals are never silently mis-measured: :func:`check_corners` reports, per
box and in the order the corners were *given*, whether the box is non-finite, has zero
area, is self-intersecting (a "bow tie": its convex hull still has 4 vertices) or is
non-convex (one corner inside the triangle of the other three). The rule the readers
apply (``polydet.data``): a self-intersecting quad is **repaired** by taking its corners in
hull order (what the canonical order does), a non-convex, zero-area or non-finite quad is
**rejected**. All functions are pure, batched over leading dimensions, and differentiable
where that makes sense.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Problem flags returned by check_corners (a bit mask per box).
NON_FINITE = 1
ZERO_AREA = 2
SELF_INTERSECTING = 4
NON_CONVEX = 8
PROBLEMS = {
    NON_FINITE: "non-finite coordinate",
    ZERO_AREA: "zero area",
    SELF_INTERSECTING: "self-intersecting",
    NON_CONVEX: "non-convex",
}

# Below this area (in square pixels) a quad counts as degenerate.
MIN_AREA = 1e-6


def _stable_argsort4(key: Tensor) -> Tensor:
    """``key.argsort(dim=-1, stable=True)`` for ``key [..., 4]`` (NaN last), from pairwise
    comparisons: no sort operator, so the ONNX / TorchScript export of the detector keeps
    it (ONNX has no stable sort)."""
    k = torch.where(torch.isnan(key), torch.full_like(key, float("inf")), key)
    n = k.shape[-1]
    ki, kj = k.unsqueeze(-1), k.unsqueeze(-2)  # [..., 4 (i), 1], [..., 1, 4 (j)]
    before = torch.ones(n, n, dtype=torch.bool, device=key.device).tril(-1)  # [i, j]: j < i
    rank = ((kj < ki) | ((kj == ki) & before)).sum(-1)  # [..., 4]: position of element i
    pos = torch.arange(n, device=key.device)
    # order[r] = the i whose rank is r (ranks are a permutation).
    return ((rank.unsqueeze(-2) == pos.unsqueeze(-1)).long() * pos).sum(-1)


def canonicalize_corners(corners: Tensor) -> Tensor:
    """Reorder corners ``[..., 4, 2]`` into the canonical order (module docstring)."""
    centre = corners.mean(dim=-2, keepdim=True)  # [..., 1, 2]
    rel = corners - centre
    angle = torch.atan2(rel[..., 1], rel[..., 0])  # [..., 4]; increasing = clockwise on screen
    order = _stable_argsort4(angle)
    ring = corners.gather(-2, order.unsqueeze(-1).expand(*order.shape, 2))  # [..., 4, 2]
    # First corner: smallest x + y, ties to smaller y. The tie tolerance (1e-5 of the box
    # size or of the coordinates, at least 0.01 px) covers the float32 noise of transforms:
    # a flip, W - x, rounds at the image size (~1e-3 px at 8000 px), so that noise cannot
    # move the start corner.
    s = ring.sum(-1)  # [..., 4]
    extent = (ring.amax(-2) - ring.amin(-2)).amax(-1, keepdim=True)  # [..., 1]
    scale = torch.maximum(extent, ring.abs().amax(-2).amax(-1, keepdim=True)).clamp_min(1e3)
    tol = 1e-5 * scale
    is_min = s <= s.amin(-1, keepdim=True) + tol
    y = torch.where(is_min, ring[..., 1], torch.full_like(ring[..., 1], float("inf")))
    start = y.argmin(-1)  # [...]
    idx = (start.unsqueeze(-1) + torch.arange(4, device=corners.device)) % 4  # [..., 4]
    return ring.gather(-2, idx.unsqueeze(-1).expand(*idx.shape, 2))


def from_corners(corners: Tensor) -> Tensor:
    """Corners ``[..., 4, 2]`` (any order) -> canonical polyboxes ``[..., 10]``."""
    ring = canonicalize_corners(corners)
    centre = ring.mean(dim=-2, keepdim=True)  # [..., 1, 2]
    return torch.cat([centre.squeeze(-2), (ring - centre).flatten(-2)], dim=-1)


def to_corners(polyboxes: Tensor) -> Tensor:
    """Polyboxes ``[..., 10]`` -> absolute corners ``[..., 4, 2]`` in the stored order."""
    centre = polyboxes[..., None, 0:2]  # [..., 1, 2]
    return centre + polyboxes[..., 2:].unflatten(-1, (4, 2))


def align_corners(ref: Tensor, corners: Tensor) -> Tensor:
    """``corners [..., 4, 2]`` each cyclically rolled to the order closest to ``ref [..., 4,
    2]`` (broadcast against ``corners``): the roll with the smallest summed squared corner
    distance (ties: the lowest roll). Averaging quads needs it: two canonical quads of one
    object can start at different corners near 45 degrees, and the mean of misaligned corners
    collapses towards a rhombus."""
    corners = corners.expand(torch.broadcast_shapes(ref.shape, corners.shape))
    rolls = torch.stack([corners.roll(-r, dims=-2) for r in range(4)])  # [4, ..., 4, 2]
    cost = (rolls - ref).pow(2).sum((-1, -2))  # [4, ...]
    best = cost.argmin(0)  # [...]
    index = best[None, ..., None, None].expand(1, *rolls.shape[1:])
    return rolls.gather(0, index).squeeze(0)


def canonicalize(polyboxes: Tensor) -> Tensor:
    """Re-derive centre and corner order of polyboxes ``[..., 10]``."""
    return from_corners(to_corners(polyboxes))


def from_xyxy(boxes: Tensor) -> Tensor:
    """Axis-aligned boxes ``[..., 4]`` (x1, y1, x2, y2) -> polyboxes ``[..., 10]``."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    xc, yc = (x1 + x2) / 2, (y1 + y2) / 2
    hw, hh = (x2 - x1) / 2, (y2 - y1) / 2
    return torch.stack([xc, yc, -hw, -hh, hw, -hh, hw, hh, -hw, hh], dim=-1)


def hull_xyxy(polyboxes: Tensor) -> Tensor:
    """Enclosing axis-aligned box ``[..., 4]`` (x1, y1, x2, y2) of polyboxes ``[..., 10]``."""
    c = to_corners(polyboxes)
    return torch.cat([c.amin(dim=-2), c.amax(dim=-2)], dim=-1)


def signed_area(polyboxes: Tensor) -> Tensor:
    """Shoelace area ``[...]`` in the stored order: positive when clockwise on screen."""
    c = to_corners(polyboxes)
    # Relative coordinates keep the products small: exact to float32 for large images too.
    rel = c - c.mean(dim=-2, keepdim=True)
    x, y = rel[..., 0], rel[..., 1]
    return 0.5 * (x * torch.roll(y, -1, dims=-1) - torch.roll(x, -1, dims=-1) * y).sum(-1)


def area(polyboxes: Tensor) -> Tensor:
    """Area ``[...]`` of polyboxes ``[..., 10]`` (shoelace, absolute value)."""
    return signed_area(polyboxes).abs()


def _cross(o: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """z of (a - o) x (b - o) over the last dim (2)."""
    return (a[..., 0] - o[..., 0]) * (b[..., 1] - o[..., 1]) - (a[..., 1] - o[..., 1]) * (
        b[..., 0] - o[..., 0]
    )


def check_corners(corners: Tensor) -> Tensor:
    """Problems of quads ``[..., 4, 2]`` *in the given order*, as an int bit mask ``[...]``.

    Flags: :data:`NON_FINITE`, :data:`ZERO_AREA`, :data:`SELF_INTERSECTING` (edges 1-2 and
    3-4, or 2-3 and 4-1, cross; the hull still has 4 corners, so canonical order repairs it)
    and :data:`NON_CONVEX` (one corner lies inside the triangle of the other three).
    0 means a valid convex quadrilateral.
    """
    c = corners.double()
    flags = torch.zeros(c.shape[:-2], dtype=torch.int64, device=c.device)
    finite = torch.isfinite(c).all(-1).all(-1)
    flags |= (~finite).long() * NON_FINITE
    c = torch.where(finite[..., None, None], c, torch.zeros_like(c))
    c = c - c.mean(-2, keepdim=True)
    p0, p1, p2, p3 = c.unbind(-2)
    # Turn direction at each corner of the given ring.
    turns = torch.stack(
        [_cross(p3, p0, p1), _cross(p0, p1, p2), _cross(p1, p2, p3), _cross(p2, p3, p0)], -1
    )
    scale = c.abs().amax((-1, -2)).clamp_min(1e-12)
    eps = 1e-9 * scale * scale
    ring = from_corners(c)
    zero = (area(ring) <= MIN_AREA) | (turns.abs() <= eps[..., None]).all(-1)
    flags |= (zero & finite).long() * ZERO_AREA
    # In hull (canonical) order a convex quad turns the same way at every corner.
    r = to_corners(ring)
    q0, q1, q2, q3 = r.unbind(-2)
    hull_turns = torch.stack(
        [_cross(q3, q0, q1), _cross(q0, q1, q2), _cross(q1, q2, q3), _cross(q2, q3, q0)], -1
    )
    non_convex = (hull_turns < -eps[..., None]).any(-1) & (hull_turns > eps[..., None]).any(-1)
    flags |= (non_convex & finite & ~zero).long() * NON_CONVEX
    # Given order not the hull order (sign changes along the ring) on a convex hull = bow tie.
    mixed = (turns < -eps[..., None]).any(-1) & (turns > eps[..., None]).any(-1)
    flags |= (mixed & ~non_convex & finite & ~zero).long() * SELF_INTERSECTING
    return flags


def describe(flags: int) -> list[str]:
    """Human-readable names of the problems in one flag mask from :func:`check_corners`."""
    return [name for bit, name in PROBLEMS.items() if flags & bit]


def hflip(polyboxes: Tensor, width: float) -> Tensor:
    """Mirror polyboxes ``[..., 10]`` left-right in an image ``width`` pixels wide.

    Pixel-edge convention: a point at ``x`` goes to ``width - x`` (what flipping the pixel
    array does to continuous coordinates). The result is canonical again.
    """
    c = to_corners(polyboxes)
    c = torch.stack([width - c[..., 0], c[..., 1]], dim=-1)
    return from_corners(c)


def vflip(polyboxes: Tensor, height: float) -> Tensor:
    """Mirror polyboxes ``[..., 10]`` top-bottom in an image ``height`` pixels high."""
    c = to_corners(polyboxes)
    c = torch.stack([c[..., 0], height - c[..., 1]], dim=-1)
    return from_corners(c)


def rot90(polyboxes: Tensor, width: float, height: float, k: int = 1) -> Tensor:
    """Rotate polyboxes as ``torch.rot90(image, k, dims=(-2, -1))`` rotates a ``[C, H, W]``
    image of the given ``width`` and ``height`` (counter-clockwise on screen for k=1)."""
    c = to_corners(polyboxes)
    for _ in range(k % 4):
        # rot90 with k=1 on (H, W): pixel (x, y) -> (y, W - x); new image is W high, H wide.
        c = torch.stack([c[..., 1], width - c[..., 0]], dim=-1)
        width, height = height, width
    return from_corners(c)


def scale(polyboxes: Tensor, sx: float, sy: float) -> Tensor:
    """Scale polyboxes ``[..., 10]`` by ``sx`` horizontally and ``sy`` vertically."""
    f = polyboxes.new_tensor([sx, sy] * 5)
    # Anisotropic scaling can change which corner has the smallest x + y: re-canonicalize.
    return canonicalize(polyboxes * f)


def translate(polyboxes: Tensor, tx: float, ty: float) -> Tensor:
    """Shift polyboxes ``[..., 10]`` by ``(tx, ty)`` pixels (order stays canonical)."""
    out = polyboxes.clone()
    out[..., 0] += tx
    out[..., 1] += ty
    return out
