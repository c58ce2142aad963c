"""polydet.coder: round trips, hand-computed targets, best-match corners, clamping."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.models.detection._utils import BoxCoder

from polydet.geometry import polybox
from polydet.geometry.coder import PolyBoxCoder, order_free_loss


def random_polyboxes(n: int, seed: int = 0) -> torch.Tensor:
    """Random convex quads (jittered rotated rectangles) as canonical polyboxes ``[n, 10]``."""
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(n, generator=g) * 150 + 5
    h = torch.rand(n, generator=g) * 150 + 5
    base = torch.stack([-w, -h, w, -h, w, h, -w, h], -1).unflatten(-1, (4, 2)) / 2
    base = base + torch.randn(n, 4, 2, generator=g) * 0.05 * torch.minimum(w, h)[:, None, None]
    a = torch.rand(n, generator=g) * 2 * math.pi
    rot = torch.stack(
        [torch.stack([a.cos(), -a.sin()], -1), torch.stack([a.sin(), a.cos()], -1)], -2
    )
    c = base @ rot.mT + torch.rand(n, 1, 2, generator=g) * 400 + 50
    return polybox.from_corners(c)


def hull_refs(p: torch.Tensor, seed: int = 1) -> torch.Tensor:
    """Reference boxes near each polybox's hull (like matched anchors)."""
    g = torch.Generator().manual_seed(seed)
    hull = polybox.hull_xyxy(p)
    size = (hull[:, 2:] - hull[:, :2]).repeat(1, 2)
    return hull + (torch.rand(hull.shape, generator=g) - 0.5) * 0.3 * size


def test_reference_box_itself_encodes_to_zero() -> None:
    refs = torch.tensor([[0.0, 0.0, 10.0, 20.0], [5.0, 7.0, 505.0, 17.0]])
    t = PolyBoxCoder().encode(polybox.from_xyxy(refs), refs)
    assert t.abs().max() == 0


def test_hand_computed_targets() -> None:
    ref = torch.tensor([[0.0, 0.0, 10.0, 20.0]])  # centre (5, 10), w 10, h 20
    # Shift by (1, 2) and widen the right side by 2 px: corners TR and BR move right by 2.
    p = polybox.from_corners(torch.tensor([[[1.0, 2.0], [13.0, 2.0], [13.0, 22.0], [1.0, 22.0]]]))
    t = PolyBoxCoder().encode(p, ref, best_match=False)
    # centre (7, 12): t_xc = 10 * 2 / 10, t_yc = 10 * 2 / 20; corners relative to the centre
    # (-6, -10), (6, -10), (6, 10), (-6, 10) against (-5, -10), (5, -10), (5, 10), (-5, 10).
    expected = torch.tensor([[2.0, 1.0, -1.0, 0.0, 1.0, 0.0, 1.0, 0.0, -1.0, 0.0]])
    assert torch.allclose(t, expected, atol=1e-6)
    w = (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0)
    assert torch.allclose(
        PolyBoxCoder(weights=w).encode(p, ref, best_match=False),
        expected / 10 * torch.tensor(w),
        atol=1e-6,
    )


def test_corner_terms_match_torchvision_scale_for_small_changes() -> None:
    """Weight 10 on a corner ~ torchvision's 5 * log(w / wa) (weights 10, 10, 5, 5)."""
    ref = torch.tensor([[100.0, 100.0, 140.0, 160.0]])
    grown = torch.tensor([[99.6, 99.4, 140.4, 160.6]])  # +1% in w and h, same centre
    t = PolyBoxCoder().encode(polybox.from_xyxy(grown), ref, best_match=False)
    tv = BoxCoder(weights=(10.0, 10.0, 5.0, 5.0)).encode_single(grown, ref)
    assert t[0, 4].item() == pytest.approx(tv[0, 2].item(), abs=1e-3)  # dx2 ~ t_w
    assert t[0, 7].item() == pytest.approx(tv[0, 3].item(), abs=1e-3)  # dy3 ~ t_h
    assert t[0, 2].item() == pytest.approx(-tv[0, 2].item(), abs=1e-3)  # dx1 ~ -t_w


def test_round_trip() -> None:
    p = random_polyboxes(500)
    refs = hull_refs(p)
    coder = PolyBoxCoder()
    t = coder.encode(p, refs, best_match=False)
    assert (coder.decode(t, refs) - p).abs().max() < 1e-4
    # best_match: the same corners, possibly starting elsewhere; canonicalize restores p.
    tb = coder.encode(p, refs, best_match=True)
    assert (polybox.to_corners(coder.decode(tb, refs)) - polybox.to_corners(p)).abs().max() > 1
    assert (polybox.canonicalize(coder.decode(tb, refs)) - p).abs().max() < 1e-4


@pytest.mark.parametrize("aspect", [1 / 50, 50.0])
def test_round_trip_extreme_aspect_ratios(aspect: float) -> None:
    w, h = (500.0 * aspect, 500.0) if aspect < 1 else (500.0, 500.0 / aspect)
    refs = torch.tensor([[100.0, 100.0, 100.0 + w, 100.0 + h]]).repeat(50, 1)
    g = torch.Generator().manual_seed(2)
    corners = polybox.to_corners(polybox.from_xyxy(refs))
    corners = corners + torch.randn(50, 4, 2, generator=g) * min(w, h) * 0.2
    p = polybox.from_corners(corners)
    coder = PolyBoxCoder()
    t = coder.encode(p, refs, best_match=True)
    assert torch.isfinite(t).all() and t.abs().max() < 10  # targets stay near 0
    assert (polybox.canonicalize(coder.decode(t, refs)) - p).abs().max() < 1e-4


def test_best_match_minimizes_corner_terms() -> None:
    p = random_polyboxes(300, seed=3)
    refs = hull_refs(p, seed=4)
    coder = PolyBoxCoder()
    best = coder.encode(p, refs, best_match=True)[:, 2:].square().sum(-1)
    corners = p[:, 2:].unflatten(-1, (4, 2))
    for r in range(4):
        rotated = torch.cat([p[:, :2], corners.roll(-r, 1).flatten(1)], -1)
        other = coder.encode(rotated, refs, best_match=False)[:, 2:].square().sum(-1)
        assert (best <= other + 1e-4).all()
    matched = coder.match_corners(p, refs)
    assert torch.equal(matched[:, :2], p[:, :2])
    assert (polybox.canonicalize(matched) - p).abs().max() < 1e-4  # same corners, same ring
    # Axis-aligned ground truths keep their canonical order (top-left first).
    boxes = torch.tensor([[0.0, 0.0, 30.0, 10.0], [5.0, 5.0, 9.0, 50.0]])
    gt = polybox.from_xyxy(boxes)
    assert torch.equal(coder.match_corners(gt, boxes), gt)


def test_best_match_removes_the_45_degree_discontinuity() -> None:
    """A 40 x 12 rectangle whose long edges slope at 45 degrees: its two top-left corners tie
    on x + y, so the canonical first corner flips between -44.9 and -45.1 degrees. Matched to
    a wide anchor, the targets of the two nearly identical objects stay close."""
    side = torch.tensor([[-20.0, -6.0], [20.0, -6.0], [20.0, 6.0], [-20.0, 6.0]])

    def rotated(deg: float) -> torch.Tensor:
        a = math.radians(deg)
        rot = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
        return polybox.from_corners((side @ rot.T + 100)[None])

    p1, p2 = rotated(-44.9), rotated(-45.1)
    assert not torch.allclose(p1[:, 2:4], p2[:, 2:4], atol=5.0)  # canonical start flipped
    ref = torch.tensor([[70.0, 85.0, 130.0, 115.0]])  # w 60, h 30, centred on the object
    coder = PolyBoxCoder()
    canonical_jump = (coder.encode(p1, ref, False) - coder.encode(p2, ref, False)).abs().max()
    matched_jump = (coder.encode(p1, ref, True) - coder.encode(p2, ref, True)).abs().max()
    assert canonical_jump > 5.0
    assert matched_jump < 0.1


def test_decode_multiple_classes() -> None:
    p = random_polyboxes(20, seed=5)
    refs = hull_refs(p)
    coder = PolyBoxCoder()
    deltas = torch.randn(20, 30, generator=torch.Generator().manual_seed(5))
    out = coder.decode(deltas, refs)
    assert out.shape == (20, 30)
    for k in range(3):
        assert torch.equal(
            out[:, 10 * k : 10 * k + 10], coder.decode(deltas[:, 10 * k : 10 * k + 10], refs)
        )


def test_empty_inputs() -> None:
    coder = PolyBoxCoder()
    assert coder.encode(torch.zeros(0, 10), torch.zeros(0, 4)).shape == (0, 10)
    assert coder.decode(torch.zeros(0, 10), torch.zeros(0, 4)).shape == (0, 10)
    assert coder.decode(torch.zeros(0, 40), torch.zeros(0, 4)).shape == (0, 40)


def test_clamp_keeps_decoded_boxes_finite_and_bounded() -> None:
    refs = torch.tensor([[10.0, 10.0, 26.0, 42.0]] * 4)  # w 16, h 32
    deltas = torch.tensor([[1e30] * 10, [-1e30] * 10, [math.inf] * 10, [-math.inf, math.inf] * 5])
    out = PolyBoxCoder().decode(deltas, refs)
    assert torch.isfinite(out).all()
    limit = math.log(1000 / 16)
    corners = polybox.to_corners(out)
    # Centre within clamp * size of the reference centre; corners within 2 clamps + 1/2.
    assert (out[:, 0] - 18).abs().max() <= limit * 16 + 1e-3
    assert (corners[..., 0] - 18).abs().max() <= (2 * limit + 0.5) * 16 + 1e-3
    assert (corners[..., 1] - 26).abs().max() <= (2 * limit + 0.5) * 32 + 1e-3
    nan = PolyBoxCoder().decode(torch.full((1, 10), math.nan), refs[:1])
    assert torch.isnan(nan).all()  # NaN is not hidden


def test_decode_is_differentiable() -> None:
    p = random_polyboxes(8, seed=6)
    refs = hull_refs(p)
    deltas = torch.zeros(8, 10, requires_grad=True)
    PolyBoxCoder().decode(deltas, refs).sum().backward()
    assert deltas.grad is not None and torch.isfinite(deltas.grad).all()


def test_bad_input_raises() -> None:
    with pytest.raises(ValueError, match="10 positive weights"):
        PolyBoxCoder(weights=(1.0,) * 4)
    with pytest.raises(ValueError, match="10 positive weights"):
        PolyBoxCoder(weights=(0.0,) * 10)
    coder = PolyBoxCoder()
    with pytest.raises(ValueError, match="ref_boxes"):
        coder.encode(torch.zeros(3, 10), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="positive width"):
        coder.decode(torch.zeros(1, 10), torch.tensor([[5.0, 5.0, 5.0, 9.0]]))
    with pytest.raises(ValueError, match="deltas"):
        coder.decode(torch.zeros(1, 12), torch.tensor([[0.0, 0.0, 1.0, 1.0]]))


def _rotated_rect(deg: float, w: float = 40.0, h: float = 12.0) -> torch.Tensor:
    """A canonical ``w x h`` rectangle centred at (100, 100), rotated by ``deg`` degrees."""
    side = torch.tensor([[-w, -h], [w, -h], [w, h], [-w, h]], dtype=torch.float64) / 2
    a = math.radians(deg)
    rot = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]], dtype=side.dtype)
    return polybox.from_corners((side @ rot.T + 100)[None])


@pytest.mark.parametrize("weights", [(1, 1) + (2,) * 8, (10,) * 10])  # RPN's and RoI's
def test_order_free_loss_is_continuous_across_the_45_degree_switch(weights: tuple) -> None:
    """Either side of 45 degrees the canonical first corner flips, so the canonical targets
    jump; the order-free loss of a fixed prediction changes no more than the object does.
    The reference is the object's own hull: nearly square exactly there, which is where
    ``best_match`` flips at the same angle and cannot help."""
    coder = PolyBoxCoder(weights)
    g = torch.Generator().manual_seed(0)
    lo, hi = -45.3, -44.7  # the switch (found by bisection: the tie rule has a tolerance)
    start = _rotated_rect(lo)[:, 2:4]
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if torch.equal(_rotated_rect(mid)[:, 2:4] < 0, start < 0) else (lo, mid)
    for eps, bound in ((0.001, 1e-3), (0.2, 0.25)):
        p1, p2 = _rotated_rect(lo - eps), _rotated_rect(hi + eps)
        assert (p1[:, 2:4] - p2[:, 2:4]).abs().max() > 5.0  # canonical start flipped
        ref = polybox.hull_xyxy(p1)
        for _ in range(5):
            pred = coder.encode(p1, ref) + torch.randn(1, 10, generator=g, dtype=p1.dtype)
            free = [order_free_loss(pred, p, ref, coder, beta=1 / 9)[0] for p in (p1, p2)]
            canon = [
                torch.nn.functional.smooth_l1_loss(
                    pred, coder.encode(p, ref), beta=1 / 9, reduction="sum"
                )
                for p in (p1, p2)
            ]
            assert abs(float(free[0] - free[1])) < bound
            assert abs(float(canon[0] - canon[1])) > 1.0  # a whole cyclic shift


def test_order_free_loss_does_not_depend_on_the_first_corner() -> None:
    p = random_polyboxes(64).double()
    ref = hull_refs(p).double()
    coder = PolyBoxCoder()
    pred = torch.randn(64, 10, generator=torch.Generator().manual_seed(3), dtype=p.dtype) * 3
    base, chosen = order_free_loss(pred, p, ref, coder, beta=1 / 9)
    corners = p[:, 2:].unflatten(-1, (4, 2))
    for r in range(1, 4):
        rolled = torch.cat([p[:, :2], corners.roll(-r, dims=1).flatten(1)], dim=-1)
        loss, chosen_r = order_free_loss(pred, rolled, ref, coder, beta=1 / 9)
        assert torch.allclose(loss, base, rtol=0, atol=1e-9)
        assert torch.allclose(chosen_r, chosen, atol=1e-9)
    # The chosen targets are one of the 4 rolls, and the loss is the smallest of the 4.
    rolls = coder.encode_rolls(p, ref)
    per_roll = torch.nn.functional.smooth_l1_loss(
        pred[:, None].expand_as(rolls), rolls, beta=1 / 9, reduction="none"
    ).sum(-1)
    assert torch.allclose(base, per_roll.min(dim=1).values.sum())
    assert torch.allclose(rolls[:, 0], coder.encode(p, ref))  # roll 0 = the canonical order


def test_order_free_loss_gradient_reaches_the_chosen_roll_only() -> None:
    p = random_polyboxes(8).double()
    ref = hull_refs(p).double()
    coder = PolyBoxCoder()
    pred = coder.encode(p, ref).clone().requires_grad_(True)  # exactly the canonical roll
    loss, chosen = order_free_loss(pred, p, ref, coder, beta=1 / 9)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-12)
    assert torch.allclose(pred.grad, torch.zeros_like(pred))
    assert torch.allclose(chosen, pred.detach())
