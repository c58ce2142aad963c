"""The polygon -> quad rule and clipping, against brute force and shapely."""

from itertools import combinations

import numpy as np
import pytest
import shapely

from polydet.data.quads import clip_quad, convex_hull, inside_share, max_area_quad, polygon_to_quad


def _area(p: np.ndarray) -> float:
    return float(shapely.Polygon(p).area)


def _brute_force_best(hull: np.ndarray) -> float:
    # Corners taken in ring order (combinations keep index order) form a convex quad.
    return max(_area(hull[list(c)]) for c in combinations(range(len(hull)), 4))


@pytest.mark.parametrize("seed", range(25))
def test_max_area_quad_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    # Points on an ellipse (all hull vertices) plus interior points the hull must ignore.
    a = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(5, 14))))
    rim = np.stack([np.cos(a), rng.uniform(0.2, 1) * np.sin(a)], 1) * rng.uniform(1, 100)
    pts = np.concatenate([rim, (rim[:3] + rim[1:4] + rim[2:5]) / 3])
    hull = convex_hull(pts)
    assert len(hull) == len(rim)
    quad = max_area_quad(hull)
    assert _area(quad) == pytest.approx(_brute_force_best(hull), rel=1e-9)
    # Its corners are hull vertices.
    assert all(np.isclose(hull, q).all(1).any() for q in quad)


def test_regular_octagon_keeps_the_inscribed_square() -> None:
    a = np.arange(8) * np.pi / 4
    octagon = np.stack([np.cos(a), np.sin(a)], 1) * 10
    quad = polygon_to_quad(octagon)
    assert quad is not None
    assert _area(quad) == pytest.approx(200.0)  # square with diagonal 20: 20^2 / 2


def test_four_points_any_order_give_their_hull() -> None:
    sq = np.array([[0, 0], [4, 4], [4, 0], [0, 4]], float)  # bow-tie order
    quad = polygon_to_quad(sq)
    assert quad is not None and _area(quad) == pytest.approx(16.0)


def test_triangle_becomes_quad_with_same_area_and_collinear_points_give_none() -> None:
    tri = np.array([[0, 0], [10, 0], [0, 6]], float)
    quad = polygon_to_quad(tri)
    assert quad is not None and quad.shape == (4, 2)
    assert _area(quad) == pytest.approx(30.0)
    # The added corner is the midpoint of the longest edge (the hypotenuse).
    assert any(np.allclose(q, [5, 3]) for q in quad)
    assert polygon_to_quad(np.array([[0, 0], [1, 1], [2, 2], [3, 3]], float)) is None


def test_clip_and_share_agree_with_shapely() -> None:
    quad = np.array([[-10, 5], [20, 0], [25, 30], [-5, 25]], float)
    box = (0.0, 0.0, 40.0, 40.0)
    ref = shapely.Polygon(quad).intersection(shapely.box(*box))
    share = inside_share(quad[None], box)[0]
    assert share == pytest.approx(ref.area / shapely.Polygon(quad).area)
    clipped = clip_quad(quad, box)
    assert clipped is not None
    # The clipped polygon is a pentagon; its quad lies inside it and keeps most of it.
    assert shapely.Polygon(clipped).difference(ref).area < 1e-9
    assert _area(clipped) >= 0.9 * ref.area
    assert clip_quad(quad, (100.0, 100.0, 200.0, 200.0)) is None
