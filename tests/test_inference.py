"""The fixed-shape inference code (polydet.model.inference): its polygon IoU against ops and
shapely, its greedy polygon NMS against ops.batched_nms, its proposal NMS against
torchvision's per-image batched_nms, and the sort-free canonical corner order."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from helpers import quad
from shapely.geometry import Polygon
from torchvision.ops import batched_nms as box_batched_nms

from polydet.geometry import ops
from polydet.geometry.polybox import _stable_argsort4, from_corners, to_corners
from polydet.model.inference import (
    greedy_select,
    quad_iou,
    select_proposals,
    suppression_matrix,
)


def test_sort_free_argsort_is_the_stable_argsort() -> None:
    g = torch.Generator().manual_seed(0)
    ties = torch.randint(0, 3, (5000, 4), generator=g).float()  # many ties
    ties[torch.rand(5000, 4, generator=g) < 0.1] = float("nan")  # NaN goes last
    for key in (ties, torch.rand(2000, 4, generator=g)):
        assert torch.equal(_stable_argsort4(key), key.argsort(dim=-1, stable=True))


def random_quads(n: int, g: torch.Generator, convex: bool = True) -> torch.Tensor:
    """Canonical polyboxes ``[n, 10]``: rotated rectangles and jittered convex quads around
    (50, 50), or arbitrary 4-point quads (hull IoU applies) when not ``convex``."""
    if convex:
        angles = torch.rand(n, generator=g) * 180
        sizes = 5 + 40 * torch.rand(n, 2, generator=g)
        centres = 35 + 30 * torch.rand(n, 2, generator=g)
        rects = torch.stack(
            [quad(float(c[0]), float(c[1]), float(s[0]), float(s[1]), float(a))
             for c, s, a in zip(centres, sizes, angles)]
        )  # fmt: skip
        corners = to_corners(rects)
        corners = (
            corners
            + (torch.rand(n, 4, 2, generator=g) - 0.5) * sizes.min(1).values[:, None, None] * 0.3
        )
        return from_corners(corners)
    return from_corners(20 + 60 * torch.rand(n, 4, 2, generator=g))


def shapely_hull_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    pa = Polygon(to_corners(a).double().tolist()).convex_hull
    pb = Polygon(to_corners(b).double().tolist()).convex_hull
    union = pa.union(pb).area
    return pa.intersection(pb).area / union if union > 0 else 0.0


def test_quad_iou_matches_ops_and_shapely() -> None:
    g = torch.Generator().manual_seed(1)
    a, b = random_quads(300, g), random_quads(300, g)
    # Hand-made cases: identical, shared edge, touching, one inside another, clipped at a
    # border (collinear edges), a square and itself turned by 45 degrees.
    sq = quad(50, 50, 20, 20, 0)
    extra_a = torch.stack([sq, sq, sq, sq, quad(0, 10, 20, 20, 0), sq])
    extra_b = torch.stack([
        sq, quad(50, 60, 20, 20, 0), quad(70, 50, 20, 20, 0), quad(50, 50, 10, 10, 0),
        quad(0, 12, 20, 24, 0), quad(50, 50, 20, 20, 45),
    ])  # fmt: skip
    a, b = torch.cat([a, extra_a]), torch.cat([b, extra_b])
    got = quad_iou(a, b)
    ref = ops.paired_iou(a, b)
    assert (got - ref).abs().max() < 1e-5
    hand = [1.0, 1 / 3, 0.0, 0.25, 400 / 480, None]
    for i, want in enumerate(hand):
        if want is not None:
            assert math.isclose(float(got[300 + i]), want, abs_tol=1e-6)
    octagon = 2 * 20 * 20 * (math.sqrt(2) - 1)  # square ∩ itself at 45 degrees
    assert math.isclose(float(got[-1]), octagon / (2 * 400 - octagon), rel_tol=1e-5)
    # Non-convex / bow-tie corners: the hull is measured (shapely reference).
    c, d = random_quads(100, g, convex=False), random_quads(100, g, convex=False)
    got = quad_iou(c, d)
    for i in range(100):
        assert abs(float(got[i]) - shapely_hull_iou(c[i], d[i])) < 1e-5


@pytest.mark.parametrize("threshold", [0.3, 0.5])
def test_greedy_select_is_greedy_polygon_nms_truncated(threshold: float) -> None:
    """Candidates of 2 images x 12 rows x 3 classes, overlapping heavily: the picks are
    ops.batched_nms's kept boxes, per image, in order, up to the cap."""
    g = torch.Generator().manual_seed(2)
    num_b, num_r, num_g, cap = 2, 12, 3, 10
    poly = random_quads(num_b * num_r * num_g, g).view(num_b, num_r, num_g, 10)
    scores = torch.rand(num_b, num_r, num_g, generator=g)
    scores[0, 3, 1] = scores[0, 5, 1]  # a tie: the lower index goes first
    candidate = torch.rand(num_b, num_r, num_g, generator=g) > 0.2
    suppress = suppression_matrix(poly.transpose(1, 2), candidate.transpose(1, 2), threshold)
    picks, found = greedy_select(scores.reshape(num_b, -1), candidate.reshape(num_b, -1),
                                 suppress, cap)  # fmt: skip
    for b in range(num_b):
        idx = torch.where(candidate[b].reshape(-1))[0]
        labels = idx % num_g
        keep = ops.batched_nms(poly[b].reshape(-1, 10)[idx], scores[b].reshape(-1)[idx],
                               labels, threshold)  # fmt: skip
        want = idx[keep][:cap]
        assert torch.equal(picks[b][found[b]], want)
        assert found[b].sum() == min(cap, len(keep))
        assert not found[b][len(want) :].any()  # padding at the end only


def test_select_proposals_nms_matches_torchvision_per_image() -> None:
    """One batched NMS over (image, level) groups == torchvision per image and level."""
    from polydet.geometry.coder import PolyBoxCoder

    g = torch.Generator().manual_seed(3)
    coder = PolyBoxCoder((1.0, 1.0) + (2.0,) * 8)
    num_b, sizes = 2, torch.tensor([[100.0, 120.0], [90.0, 60.0]])
    levels = []
    for n, size in ((300, 12.0), (80, 30.0)):
        xy = torch.rand(n, 2, generator=g) * 110
        anchors = torch.cat([xy, xy + size], 1)
        objectness = torch.randn(num_b, n, generator=g)
        deltas = torch.randn(num_b, n, 10, generator=g) * 0.3
        levels.append((objectness, deltas, anchors))
    boxes, scores, poly, valid = select_proposals(levels, sizes, coder, 100, 60, 0.1, 0.7)
    for b in range(num_b):
        h, w = sizes[b].tolist()
        cand_boxes, cand_scores, cand_level = [], [], []
        for level, (objectness, deltas, anchors) in enumerate(levels):
            top = objectness[b].topk(min(100, objectness.shape[1])).indices
            p = coder.decode(deltas[b, top], anchors[top])
            hull = torch.cat([to_corners(p).amin(1), to_corners(p).amax(1)], 1)
            hull[:, 0::2] = hull[:, 0::2].clamp(0, w)
            hull[:, 1::2] = hull[:, 1::2].clamp(0, h)
            cand_boxes.append(hull)
            cand_scores.append(objectness[b, top].sigmoid())
            cand_level.append(torch.full((len(top),), level))
        cb, cs, cl = torch.cat(cand_boxes), torch.cat(cand_scores), torch.cat(cand_level)
        ok = ((cb[:, 2:] - cb[:, :2]) >= 1e-3).all(1) & (cs >= 0.1)
        idx = torch.where(ok)[0]
        keep = idx[box_batched_nms(cb[idx], cs[idx], cl[idx], 0.7)][:60]
        assert int(valid[b].sum()) == len(keep)
        torch.testing.assert_close(boxes[b][valid[b]], cb[keep])
        torch.testing.assert_close(scores[b][valid[b]], cs[keep])
        assert (scores[b][~valid[b]] == 0).all()


def test_exported_suppression_matrix_with_no_candidate_pair(tmp_path: Path) -> None:
    """Regression: with no pair passing the bound, ONNX Runtime failed on the empty gathers
    ("perm size: 2 does not match input rank: 3"); 0, 1 and 2 overlapping pairs now give
    the eager matrix."""
    import warnings

    import onnxruntime as ort

    def case(overlaps: int) -> tuple[torch.Tensor, torch.Tensor]:
        qs = [quad(20 + 40 * k, 20, 10, 10, 0) for k in range(6)]
        for k in range(overlaps):
            qs[2 * k + 1] = quad(21 + 80 * k, 20, 10, 10, 0)
        return torch.stack(qs).view(1, 1, 6, 10), torch.ones(1, 1, 6, dtype=torch.bool)

    class Suppress(torch.nn.Module):
        def forward(self, p: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            return suppression_matrix(p, c, 0.3)

    path = tmp_path / "s.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Suppress(), case(2), str(path), dynamo=False, opset_version=17,
                          input_names=["p", "c"], dynamic_axes={"p": [2], "c": [2]})  # fmt: skip
    session = ort.InferenceSession(str(path))
    for overlaps in (0, 1, 2):
        p, c = case(overlaps)
        got = session.run(None, {"p": p.numpy(), "c": c.numpy()})[0]
        want = Suppress()(p, c).numpy()
        assert (got == want).all() and int(want.sum()) == 2 * overlaps
