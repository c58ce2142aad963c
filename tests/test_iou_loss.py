"""The RoI head's IoU loss: 1 - IoU against shapely, corner-order free, and it trains."""

from __future__ import annotations

import shapely
import torch

from polydet.geometry import polybox
from polydet.geometry.coder import PolyBoxCoder
from polydet.model.roi_heads import polybox_iou_loss
from tests.test_coder import hull_refs, random_polyboxes


def shapely_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    pa = shapely.Polygon(polybox.to_corners(a).tolist())
    pb = shapely.Polygon(polybox.to_corners(b).tolist())
    return pa.intersection(pb).area / pa.union(pb).area


def test_iou_loss_is_one_minus_the_shapely_iou_of_the_decoded_quads() -> None:
    gt = random_polyboxes(40, seed=3).double()
    refs = hull_refs(gt, seed=4).double()
    coder = PolyBoxCoder([10.0] * 10)
    g = torch.Generator().manual_seed(5)
    deltas = coder.encode(gt, refs) + 0.8 * torch.randn(40, 10, generator=g, dtype=torch.float64)
    pred = coder.decode(deltas, refs)
    # Keep convex predictions (the loss scores hulls; shapely the polygon as given).
    rings = [shapely.Polygon(polybox.to_corners(p).tolist()) for p in pred]
    convex = [i for i, r in enumerate(rings) if r.is_valid and r.convex_hull.area <= r.area + 1e-9]
    assert len(convex) >= 20
    for i in convex:
        loss = polybox_iou_loss(deltas[i : i + 1], gt[i : i + 1], refs[i : i + 1], coder)
        assert abs(float(loss) - (1.0 - shapely_iou(pred[i], gt[i]))) < 1e-6


def test_iou_loss_does_not_depend_on_the_first_corner() -> None:
    gt = random_polyboxes(16, seed=6)
    refs = hull_refs(gt, seed=7)
    coder = PolyBoxCoder([10.0] * 10)
    deltas = coder.encode(gt, refs) + 0.3 * torch.randn(
        16, 10, generator=torch.Generator().manual_seed(8)
    )
    base = polybox_iou_loss(deltas, gt, refs, coder)
    assert float(base) > 0.05
    for k in (1, 2, 3):
        rolled = polybox.from_corners(polybox.to_corners(gt).roll(k, dims=-2))
        assert torch.allclose(polybox_iou_loss(deltas, rolled, refs, coder), base, atol=1e-5)


def test_iou_loss_gradient_descent_raises_the_overlap() -> None:
    gt = random_polyboxes(8, seed=9)
    refs = hull_refs(gt, seed=10)
    coder = PolyBoxCoder([10.0] * 10)
    g = torch.Generator().manual_seed(11)
    deltas = (coder.encode(gt, refs) + 0.5 * torch.randn(8, 10, generator=g)).requires_grad_()
    start = float(polybox_iou_loss(deltas, gt, refs, coder).detach())
    opt = torch.optim.SGD([deltas], lr=0.5)
    for _ in range(100):
        opt.zero_grad()
        polybox_iou_loss(deltas, gt, refs, coder).backward()
        opt.step()
    end = float(polybox_iou_loss(deltas, gt, refs, coder).detach())
    assert end < 0.5 * start
    assert torch.isfinite(deltas.grad).all()


def test_iou_loss_of_no_positives_is_a_zero_that_backpropagates() -> None:
    coder = PolyBoxCoder([10.0] * 10)
    deltas = torch.zeros(0, 10, requires_grad=True)
    loss = polybox_iou_loss(deltas, torch.zeros(0, 10), torch.zeros(0, 4), coder)
    loss.backward()
    assert float(loss) == 0.0


def test_autograd_kernel_equals_the_tensor_kernel() -> None:
    from polydet.geometry.ops import intersection_area, intersection_area_autograd
    from polydet.model.inference import hull_ring

    a = random_polyboxes(300, seed=12).double()
    b = torch.cat([a[:100], random_polyboxes(200, seed=13).double()])  # identical pairs too
    b[100:200, :2] = a[100:200, :2] + 5.0  # and overlapping ones
    ring_a, centre_a, _ = hull_ring(a)
    ring_b, centre_b, _ = hull_ring(b)
    shifted = ring_b + (centre_b - centre_a)[:, None]
    fast = intersection_area(ring_a, shifted)
    assert (fast > 0).sum() >= 150
    assert torch.allclose(intersection_area_autograd(ring_a, shifted), fast, rtol=0, atol=1e-9)
