"""polydet.polybox: the convention (round trips, canonical order, transforms, areas, checks)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import shapely
import torch

from polydet.geometry import polybox

RECT = torch.tensor([[10.0, 20.0], [50.0, 20.0], [50.0, 40.0], [10.0, 40.0]])  # TL TR BR BL


def random_convex(n: int, seed: int = 0) -> torch.Tensor:
    """``n`` random convex quads ``[n, 4, 2]`` (points at sorted angles on an ellipse)."""
    rng = np.random.default_rng(seed)
    ang = np.sort(rng.uniform(0, 2 * np.pi, (n, 4)), axis=1)
    r = rng.uniform(5, 80, (n, 1, 2))
    pts = np.stack([np.cos(ang), np.sin(ang)], -1) * r
    th = rng.uniform(0, np.pi, (n, 1))
    x = pts[..., 0] * np.cos(th) - pts[..., 1] * np.sin(th)
    y = pts[..., 0] * np.sin(th) + pts[..., 1] * np.cos(th)
    return torch.tensor(np.stack([x, y], -1) + rng.uniform(100, 400, (n, 1, 2)))


def same_corner_set(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-4) -> bool:
    """Whether corner sets ``[..., 4, 2]`` are equal up to order."""
    d = (a[..., :, None, :] - b[..., None, :, :]).norm(dim=-1)  # [..., 4, 4]
    return bool((d.amin(-1) < tol).all() and (d.amin(-2) < tol).all())


def is_canonical(corners: torch.Tensor) -> bool:
    """Independent check of the documented rule: clockwise on screen (positive shoelace
    area, every turn the same way) and first corner = min x + y, ties to smaller y."""
    c = corners.double()
    x, y = c[..., 0], c[..., 1]
    area2 = (x * y.roll(-1, -1) - x.roll(-1, -1) * y).sum(-1)
    s = x + y
    extent = (c.amax(-2) - c.amin(-2)).amax(-1)
    scale = torch.maximum(extent, c.abs().amax((-2, -1))).clamp_min(1e3)
    first_min = s[..., 0] <= s.amin(-1) + 1e-5 * scale
    tied = (s - s[..., :1]).abs() <= 1e-5 * scale[..., None]
    first_smallest_y = (torch.where(tied, y, torch.inf).amin(-1) >= y[..., 0] - 1e-9).all()
    return bool((area2 > 0).all() and first_min.all() and first_smallest_y)


# --- conversions --------------------------------------------------------------------------


def test_axis_aligned_rectangle_is_tl_tr_br_bl() -> None:
    p = polybox.from_corners(RECT[[2, 0, 3, 1]])  # any input order
    assert p.tolist() == [30.0, 30.0, -20.0, -10.0, 20.0, -10.0, 20.0, 10.0, -20.0, 10.0]
    assert torch.equal(polybox.to_corners(p), RECT)
    assert torch.equal(polybox.from_xyxy(torch.tensor([10.0, 20.0, 50.0, 40.0])), p)
    assert polybox.hull_xyxy(p).tolist() == [10.0, 20.0, 50.0, 40.0]


def test_round_trips() -> None:
    c = random_convex(200)
    p = polybox.from_corners(c)
    assert p.shape == (200, 10)
    back = polybox.to_corners(p)
    assert same_corner_set(back, c)
    assert torch.allclose(polybox.from_corners(back), p, atol=1e-9)  # idempotent
    assert torch.allclose(polybox.canonicalize(p), p, atol=1e-9)
    assert torch.allclose(p[:, 0:2], c.mean(1), atol=1e-9)  # centre = corner mean
    assert p[:, 2:].unflatten(-1, (4, 2)).sum(1).abs().max() < 1e-9
    boxes = torch.tensor([[0.0, 0.0, 4.0, 2.0], [-3.0, 5.0, 7.0, 6.5]])
    assert torch.equal(polybox.hull_xyxy(polybox.from_xyxy(boxes)), boxes)


def test_batched_leading_dims_and_empty() -> None:
    c = random_convex(12).reshape(3, 4, 4, 2)
    p = polybox.from_corners(c)
    assert p.shape == (3, 4, 10)
    assert torch.allclose(p.reshape(12, 10), polybox.from_corners(c.reshape(12, 4, 2)))
    assert polybox.from_corners(torch.zeros(0, 4, 2)).shape == (0, 10)
    assert polybox.area(torch.zeros(0, 10)).shape == (0,)


# --- canonical order ------------------------------------------------------------------------


def test_canonical_under_all_permutations() -> None:
    c = random_convex(50, seed=1)
    ref = polybox.from_corners(c)
    assert is_canonical(polybox.to_corners(ref))
    for perm in itertools.permutations(range(4)):
        assert torch.allclose(polybox.from_corners(c[:, list(perm)]), ref, atol=1e-9)


def test_tie_goes_to_smaller_y() -> None:
    # A square rotated 45 degrees: top and left corners tie on x + y; top (smaller y) wins.
    diamond = torch.tensor([[0.0, -1.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]) + 5
    for perm in itertools.permutations(range(4)):
        p = polybox.from_corners(diamond[list(perm)])
        assert polybox.to_corners(p).tolist() == (diamond).tolist()  # top, right, bottom, left


def test_flips_and_rot90_keep_canonical_corner_sets() -> None:
    c = random_convex(100, seed=2).float()
    p = polybox.from_corners(c)
    w, h = 512.0, 480.0
    for q, expected in [
        (polybox.hflip(p, w), torch.stack([w - c[..., 0], c[..., 1]], -1)),
        (polybox.vflip(p, h), torch.stack([c[..., 0], h - c[..., 1]], -1)),
        (polybox.rot90(p, w, h, 1), torch.stack([c[..., 1], w - c[..., 0]], -1)),
    ]:
        assert is_canonical(polybox.to_corners(q))
        assert same_corner_set(polybox.to_corners(q), expected, tol=1e-3)
    assert torch.allclose(polybox.hflip(polybox.hflip(p, w), w), p, atol=1e-4)
    assert torch.allclose(polybox.vflip(polybox.vflip(p, h), h), p, atol=1e-4)
    assert torch.allclose(polybox.rot90(p, w, h, 4), p, atol=1e-4)
    assert torch.allclose(polybox.rot90(polybox.rot90(p, w, h, 1), h, w, 3), p, atol=1e-4)
    # Flipped, then canonical: the same as canonicalizing the flipped corners directly.
    flipped = polybox.from_corners(torch.stack([w - c[..., 0], c[..., 1]], -1))
    assert torch.allclose(polybox.hflip(p, w), flipped, atol=1e-4)


@pytest.mark.parametrize(("offset", "size"), [(3000.0, 50.0), (4.0, 2.0)])
def test_start_corner_stable_under_double_flip(offset: float, size: float) -> None:
    """Regression: the tie tolerance was relative to the box size only, so a ~45 degree box
    far from the origin (float32 rounds x + y at ~2e-4 px there), or a tiny box flipped in
    a large image (W - x rounds at the image size), changed its start corner after
    hflip(hflip(p)). Now the tolerance also follows the coordinates, at least 0.01 px."""
    g = torch.Generator().manual_seed(0)
    n = 3000
    ang = math.pi / 4 + (torch.rand(n, generator=g) - 0.5) * 1e-5  # ties up to float noise
    half = torch.stack([torch.ones(n), 1 / (1 + 2 * torch.rand(n, generator=g))], -1) * size
    base = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]]) * half[:, None]
    rot = torch.stack(
        [torch.stack([ang.cos(), -ang.sin()], -1), torch.stack([ang.sin(), ang.cos()], -1)], -2
    )
    centre = torch.rand(n, 1, 2, generator=g) * offset + size
    p = polybox.from_corners((base @ rot.mT + centre).float())
    w = 8000.0
    assert (polybox.hflip(polybox.hflip(p, w), w) - p).abs().max() < 1e-2
    assert (polybox.vflip(polybox.vflip(p, w), w) - p).abs().max() < 1e-2
    assert (polybox.rot90(p, w, w, 4) - p).abs().max() < 1e-2


def test_rot90_follows_torch_rot90_of_the_pixels() -> None:
    """The polybox of a marked pixel block lands where torch.rot90 moves the pixels."""
    h, w = 6, 9
    img = torch.zeros(1, h, w)
    img[0, 1:3, 5:8] = 1  # rows 1-2, columns 5-7: x in [5, 8], y in [1, 3]
    p = polybox.from_xyxy(torch.tensor([[5.0, 1.0, 8.0, 3.0]]))
    for k in range(4):
        rotated = torch.rot90(img, k, dims=(-2, -1))[0]
        ys, xs = torch.nonzero(rotated, as_tuple=True)
        box = [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
        assert polybox.hull_xyxy(polybox.rot90(p, w, h, k))[0].tolist() == box
    flipped = torch.flip(img, dims=(-1,))[0]
    ys, xs = torch.nonzero(flipped, as_tuple=True)
    assert polybox.hull_xyxy(polybox.hflip(p, w))[0].tolist() == [
        xs.min().item(),
        ys.min().item(),
        xs.max().item() + 1,
        ys.max().item() + 1,
    ]


def test_scale_and_translate() -> None:
    p = polybox.from_corners(RECT)
    assert polybox.hull_xyxy(polybox.scale(p, 2.0, 0.5)).tolist() == [20.0, 10.0, 100.0, 20.0]
    t = polybox.translate(p, 3.0, -4.0)
    assert torch.equal(polybox.to_corners(t), RECT + torch.tensor([3.0, -4.0]))
    # Anisotropic scaling can move the start corner: the result is canonical again.
    c = random_convex(50, seed=3)
    s = polybox.scale(polybox.from_corners(c), 3.0, 0.2)
    assert is_canonical(polybox.to_corners(s))


# --- areas ----------------------------------------------------------------------------------


def test_hand_computed_areas() -> None:
    assert polybox.area(polybox.from_corners(RECT)).item() == 800.0
    tri_like = torch.tensor([[0.0, 0.0], [4.0, 0.0], [4.0, 3.0], [0.0, 3.0]])  # 4 x 3
    assert polybox.area(polybox.from_corners(tri_like)).item() == 12.0
    trapezoid = torch.tensor([[0.0, 0.0], [6.0, 0.0], [4.0, 2.0], [2.0, 2.0]])  # (6 + 2) / 2 * 2
    assert polybox.area(polybox.from_corners(trapezoid)).item() == 8.0
    diamond = torch.tensor([[0.0, -1.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    assert polybox.area(polybox.from_corners(diamond)).item() == 2.0
    # Far from the origin the relative-coordinate shoelace keeps float32 exact.
    far = polybox.from_corners(RECT + 1e5)
    assert polybox.area(far).item() == 800.0


def test_signed_area_is_positive_clockwise_on_screen() -> None:
    p = polybox.from_corners(RECT)
    assert polybox.signed_area(p).item() > 0
    reversed_ring = torch.cat([p[:2], p[2:].unflatten(-1, (4, 2)).flip(0).flatten()])
    assert polybox.signed_area(reversed_ring).item() == -800.0


def test_area_matches_shapely() -> None:
    c = random_convex(200, seed=4)
    ref = shapely.area(shapely.polygons(polybox.to_corners(polybox.from_corners(c)).numpy()))
    assert np.abs(polybox.area(polybox.from_corners(c)).numpy() - ref).max() < 1e-8


# --- check_corners --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("corners", "flags"),
    [
        ([[0, 0], [4, 0], [4, 3], [0, 3]], 0),  # convex, clockwise on screen
        ([[0, 3], [4, 3], [4, 0], [0, 0]], 0),  # convex, counter-clockwise: fine too
        ([[0, 0], [4, 3], [4, 0], [0, 3]], polybox.SELF_INTERSECTING),  # bow tie
        ([[0, 0], [4, 0], [1, 1], [0, 4]], polybox.NON_CONVEX),  # dart: (1, 1) inside
        ([[0, 0], [1, 1], [2, 2], [3, 3]], polybox.ZERO_AREA),  # collinear
        ([[1, 1], [1, 1], [1, 1], [1, 1]], polybox.ZERO_AREA),  # a point
        ([[0, 0], [math.nan, 0], [4, 3], [0, 3]], polybox.NON_FINITE),
        ([[0, 0], [math.inf, 0], [4, 3], [0, 3]], polybox.NON_FINITE),
    ],
)
def test_check_corners_cases(corners: list, flags: int) -> None:
    c = torch.tensor(corners, dtype=torch.float32)
    assert polybox.check_corners(c).item() == flags
    assert polybox.check_corners(c + 1e4).item() == flags  # far from the origin too
    assert polybox.check_corners(c[None, None]).shape == (1, 1)


def test_check_corners_batched_and_described() -> None:
    c = torch.tensor(
        [[[0, 0], [4, 0], [4, 3], [0, 3]], [[0, 0], [4, 3], [4, 0], [0, 3]]], dtype=torch.float64
    )
    assert polybox.check_corners(c).tolist() == [0, polybox.SELF_INTERSECTING]
    assert polybox.describe(polybox.SELF_INTERSECTING | polybox.NON_FINITE) == [
        "non-finite coordinate",
        "self-intersecting",
    ]
    # A repaired bow tie is the convex quad: its canonical order passes the check.
    repaired = polybox.to_corners(polybox.from_corners(c[1]))
    assert polybox.check_corners(repaired).item() == 0


def test_check_corners_agrees_with_shapely_validity() -> None:
    """Random 4-point rings: bow ties are exactly shapely's invalid (self-crossing) rings
    whose hull has 4 vertices; non-convex ones are those whose hull has 3."""
    rng = np.random.default_rng(5)
    c = torch.tensor(rng.uniform(0, 100, (500, 4, 2)))
    flags = polybox.check_corners(c).numpy()
    polys = shapely.polygons(c.numpy())
    hull_vertices = shapely.get_num_coordinates(shapely.convex_hull(polys)) - 1
    valid = shapely.is_valid(polys)
    assert ((flags == polybox.NON_CONVEX) == (hull_vertices == 3)).all()
    assert ((flags == polybox.SELF_INTERSECTING) == (~valid & (hull_vertices == 4))).all()
    assert ((flags == 0) == (valid & (hull_vertices == 4))).all()


def test_align_corners_broadcasts_one_reference_per_row() -> None:
    """Each of ``corners [K, M, 4, 2]`` is rolled to its row's reference ``[K, 1, 4, 2]``:
    the result is the roll with the least summed squared distance, found by brute force."""
    g = torch.Generator().manual_seed(3)
    ref = polybox.to_corners(polybox.from_corners(torch.rand(2, 1, 4, 2, generator=g) * 50))
    rolls = torch.randint(0, 4, (2, 5), generator=g)
    noise = torch.rand(2, 5, 4, 2, generator=g)
    corners = torch.stack(
        [torch.stack([(ref[k, 0] + noise[k, m]).roll(int(rolls[k, m]), 0) for m in range(5)])
         for k in range(2)]
    )  # fmt: skip
    out = polybox.align_corners(ref, corners)
    assert out.shape == corners.shape
    for k, m in itertools.product(range(2), range(5)):
        best = min(
            range(4), key=lambda r: float((corners[k, m].roll(-r, 0) - ref[k, 0]).pow(2).sum())
        )
        assert torch.equal(out[k, m], corners[k, m].roll(-best, 0))
        assert torch.allclose(out[k, m], ref[k, 0] + noise[k, m])  # the order it was made in
