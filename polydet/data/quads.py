"""Polygon -> quadrilateral reduction and clipping, shared by every reader, tiling and synth.

**The reduction rule** (used for COCO polygons with more than 4 points, for a quad clipped by
the image border and for a quad clipped by a tile edge): take the convex hull of the points,
then

- hull with 4 vertices: that quad;
- hull with more than 4 vertices: the **largest-area quadrilateral whose corners are hull
  vertices** (exact search, O(n^3) vectorized; it keeps the real corners of the object and
  only cuts off the smallest slivers, so its IoU with the polygon is the best a quad made of
  the polygon's own vertices can reach);
- hull with 3 vertices (a corner clipped off a thin quad): the triangle plus the midpoint of
  its longest edge, a convex quad with one straight corner and the triangle's exact area;
- fewer (points on a line): no quad, the caller drops the object as zero area.

All coordinates are float64 numpy arrays in pixels; corners are returned in hull order (one
winding), to be canonicalized by :func:`polydet.polybox.from_corners`.
"""

from __future__ import annotations

import numpy as np
import shapely

# Points closer than this (pixels) are the same hull vertex.
_EPS = 1e-9


def convex_hull(points: np.ndarray) -> np.ndarray:
    """Convex hull ``[K, 2]`` (in ring order, not closed) of points ``[P, 2]``; K may be < 3."""
    hull = shapely.convex_hull(shapely.multipoints(np.asarray(points, dtype=np.float64)))
    if isinstance(hull, shapely.Polygon):
        return np.asarray(hull.exterior.coords, dtype=np.float64)[:-1]
    return np.asarray(shapely.get_coordinates(hull), dtype=np.float64)


def max_area_quad(hull: np.ndarray) -> np.ndarray:
    """The largest-area quad ``[4, 2]`` with corners among the vertices of convex ``hull [n, 2]``
    (n >= 4, in ring order).

    For a convex polygon the quad ``(i, j, k, l)`` (in ring order) has area
    ``tri(i, j, k) + tri(i, k, l)``; with ``i`` and the diagonal end ``k`` fixed the two
    triangles are maximized independently, so trying every ``i`` is exact.
    """
    n = len(hull)
    best_area, best = -1.0, (0, 1, 2, 3)
    idx = np.arange(n)
    for i in range(n):
        q = np.roll(hull, -i, axis=0) - hull[i]  # q[0] is vertex i, at the origin
        # tri[a, b] = area of triangle (vertex i, q[a], q[b]) for a < b, in ring order.
        tri = 0.5 * np.abs(np.outer(q[:, 0], q[:, 1]) - np.outer(q[:, 1], q[:, 0]))  # [n, n]
        upper = idx[:, None] < idx[None, :]
        left = np.where(upper & (idx[:, None] > 0), tri, -1.0)  # j in (0, k)
        right = np.where(upper, tri, -1.0)  # l in (k, n)
        j = left.argmax(axis=0)  # [n] best j for each k
        lval = left[j, idx]
        l_ = right.argmax(axis=1)  # [n] best l for each k
        rval = right[idx, l_]
        total = np.where((lval >= 0) & (rval >= 0), lval + rval, -1.0)
        k = int(total.argmax())
        if total[k] > best_area + _EPS:
            best_area = float(total[k])
            best = tuple((i + int(v)) % n for v in (0, j[k], k, l_[k]))
    return hull[list(best)]


def polygon_to_quad(points: np.ndarray) -> np.ndarray | None:
    """Reduce a polygon ``[P, 2]`` (any P, any order) to a quad ``[4, 2]`` by the module's rule;
    ``None`` when its hull has no area."""
    hull = convex_hull(points)
    if len(hull) < 3:
        return None
    if len(hull) == 3:
        edges = np.roll(hull, -1, axis=0) - hull
        e = int(np.argmax((edges**2).sum(1)))
        mid = hull[e] + 0.5 * edges[e]
        return np.insert(hull, e + 1, mid, axis=0)
    if len(hull) == 4:
        return hull
    return max_area_quad(hull)


def inside_share(corners: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    """Share ``[N]`` of each convex quad's area ``corners [N, 4, 2]`` inside ``box`` (x0, y0,
    x1, y1); 0 for quads without area."""
    polys = shapely.polygons(np.asarray(corners, dtype=np.float64))
    inter = shapely.intersection(polys, shapely.box(*box))
    area = shapely.area(polys)
    return np.where(area > 0, shapely.area(inter) / np.where(area > 0, area, 1.0), 0.0)


def clip_quad(corners: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray | None:
    """The part of convex quad ``corners [4, 2]`` inside ``box`` (x0, y0, x1, y1) reduced to a
    quad ``[4, 2]`` by the module's rule; ``None`` when nothing with area is left."""
    inter = shapely.intersection(shapely.Polygon(corners), shapely.box(*box))
    if inter.is_empty or inter.area <= 0:
        return None
    return polygon_to_quad(shapely.get_coordinates(inter))
