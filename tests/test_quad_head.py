"""The quad stage (polydet/model/quad_head.py): its frame coder, its heading targets and how
its inference carries the heading back to the canonical ring."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import Tensor, nn

from polydet.core.config import load_config
from polydet.geometry import heading
from polydet.geometry.coder import PolyBoxCoder
from polydet.geometry.polybox import from_corners, from_xyxy, to_corners
from polydet.model.quad_head import QuadFrameCoder, QuadHead, _pass_loss, refine_quads


def _rotate(points: Tensor, angle: float, centre: Tensor) -> Tensor:
    c, s = math.cos(angle), math.sin(angle)
    rot = torch.tensor([[c, -s], [s, c]], dtype=points.dtype)
    return (points - centre) @ rot.T + centre


def _quads(n: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    centre = torch.rand(n, 1, 2, generator=g, dtype=torch.float64) * 100
    half = 5 + torch.rand(n, 1, 2, generator=g, dtype=torch.float64) * 20
    unit = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]], dtype=torch.float64)
    jitter = torch.randn(n, 4, 2, generator=g, dtype=torch.float64)
    return centre + unit * half + jitter


def test_frame_coder_round_trip_and_the_box_coder_on_axis_aligned_references() -> None:
    coder = QuadFrameCoder()
    ref, gt = _quads(50, 0), _quads(50, 0) + torch.randn(50, 4, 2, dtype=torch.float64)
    torch.testing.assert_close(coder.decode(coder.encode(gt, ref), ref), gt)
    # On an axis-aligned reference each corner's offset in units of the box's width and
    # height, times the box coder's weight (10): what PolyBoxCoder gives for a corner term
    # when the centre is the reference box's.
    boxes = torch.tensor([[10.0, 20.0, 50.0, 40.0], [0.0, 0.0, 8.0, 30.0]], dtype=torch.float64)
    rect = to_corners(from_xyxy(boxes))
    moved = rect + torch.randn(2, 4, 2, dtype=torch.float64)
    moved = moved - moved.mean(1, keepdim=True) + rect.mean(1, keepdim=True)  # same centre
    expected = PolyBoxCoder().encode(from_corners(moved), boxes)[:, 2:]
    torch.testing.assert_close(coder.encode(to_corners(from_corners(moved)), rect), expected)


@pytest.mark.parametrize("angle", [0.3, math.pi / 4, 2.0])
def test_frame_targets_do_not_change_when_the_scene_turns(angle: float) -> None:
    """What the quad stage regresses is relative to the quad itself: turning reference and
    object together leaves every target as it was (a box coder's targets change)."""
    coder = QuadFrameCoder()
    ref = _quads(20, 1)
    gt = ref + torch.randn(20, 4, 2, dtype=torch.float64)
    centre = torch.tensor([50.0, 50.0], dtype=torch.float64)
    turned = coder.encode(_rotate(gt, angle, centre), _rotate(ref, angle, centre))
    torch.testing.assert_close(turned, coder.encode(gt, ref))


class _StubHead(nn.Module):
    """A quad head that predicts no corner change, every RoI class 1, and heading ``k``."""

    def __init__(self, k: int, with_heading: bool = True) -> None:
        super().__init__()
        self.k = k
        self.coder = QuadFrameCoder()
        self.heading = nn.Identity() if with_heading else None

    def forward(self, features, image, corners, batch_hw):  # noqa: ANN001
        n = corners.shape[0]
        logits = torch.tensor([[-5.0, 5.0, -5.0]]).expand(n, -1)
        first = torch.full((n, 4), -9.0)
        first[:, self.k] = 9.0
        return logits, torch.zeros(n, 8), first if self.heading is not None else None


def test_heading_target_is_the_frame_corner_of_the_annotations_first_edge() -> None:
    """A reference quad whose corners start elsewhere than the object's first corner: the
    heading target is the reference corner nearest that first corner (an independent,
    geometric reading of the roll the loss chooses)."""
    cfg = load_config("params.yaml").model.roi
    gt = from_corners(_quads(1, 3).float())  # canonical
    first = torch.tensor([2])
    ref = gt.clone()  # the same corners, so the frame is the canonical ring
    expected = int(heading.nearest_corner(to_corners(ref)[0], to_corners(gt)[0, 2]))
    batch = (torch.tensor([1]), gt, first, ref, torch.tensor([0]))
    for k in range(4):
        losses, decoded = _pass_loss(_StubHead(k), cfg, {}, batch, (64, 64))
        assert (float(losses["loss_heading"]) < 1e-3) == (k == expected), (k, losses)
    torch.testing.assert_close(decoded[0], to_corners(ref)[0])


def test_refine_quads_returns_the_heading_on_the_canonical_ring() -> None:
    """The first corner the quad stage reports indexes the refined quad's canonical ring at
    the frame edge the head chose: the heading points at that edge's midpoint."""
    cfg = dataclasses.replace(load_config("params.yaml").model.roi, second_stage="quad")
    roi_heads = nn.Module()
    roi_heads.num_classes = 3
    roi_heads.cfg = cfg
    corners = _rotate(_quads(3, 4).float(), 0.7, torch.tensor([50.0, 50.0])) + 100
    poly = from_corners(corners)[None]  # [1, 3, 10]
    scores = torch.tensor([[0.6, 0.5, 0.4]])
    labels = torch.ones(1, 3, dtype=torch.int64)
    found = torch.tensor([[True, True, False]])
    sizes = torch.tensor([[400.0, 400.0]])
    for k in range(4):
        roi_heads.quad_head = _StubHead(k)
        out, out_scores, first = refine_quads(
            roi_heads, {}, poly, scores, labels, found, sizes, (400, 400)
        )
        torch.testing.assert_close(out, poly)  # zero deltas, inside the image
        assert first[0, 2] == heading.UNKNOWN  # not found: left as it was
        ring = to_corners(poly[0, :2])
        mid = 0.5 * (ring[:, k] + ring[:, (k + 1) % 4])  # frame edge k = canonical edge k
        centre = ring.mean(1)
        expected = torch.atan2(mid[:, 1] - centre[:, 1], mid[:, 0] - centre[:, 0])
        got = heading.heading_degrees(out[0, :2], first[0, :2])
        torch.testing.assert_close(got, torch.rad2deg(expected) % 360, atol=1e-3, rtol=0)
        # scores: the mean of the two stages' probabilities where refined
        p = torch.softmax(torch.tensor([-5.0, 5.0, -5.0]), 0)[1]
        torch.testing.assert_close(out_scores[0, :2], (scores[0, :2] + p) / 2)
        assert out_scores[0, 2] == scores[0, 2]


def test_quad_head_builds_from_the_config() -> None:
    cfg = load_config("params.yaml").model.roi
    head = QuadHead(["0", "1"], 8, 4, cfg)
    feats = {"0": torch.randn(2, 8, 20, 20), "1": torch.randn(2, 8, 10, 10)}
    corners = _quads(5, 5).float()
    logits, deltas, first = head(feats, torch.tensor([0, 1, 0, 1, 1]), corners, (160, 160))
    assert logits.shape == (5, 4) and deltas.shape == (5, 8)
    assert (first is None) == (cfg.heading_loss_weight == 0)
    # a refinement starts near the identity
    assert float(deltas.abs().max()) < 0.5
