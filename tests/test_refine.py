"""Iterative refinement of detections (model.roi.refine_steps): the box head's second pass
on each detection's hull, decoded with the detected class's deltas."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import Tensor, nn

from polydet.core.config import load_config
from polydet.geometry.coder import PolyBoxCoder
from polydet.geometry.polybox import from_corners, hull_xyxy, to_corners
from polydet.model.inference import refine_detections, refine_then_nms, renms
from polydet.model.roi_heads import PolyRoIHeads, RoISamples

NUM_C = 4  # background + 3


class ClassShift(nn.Module):
    """Logits ``log(p)`` for fixed class probabilities; deltas that keep the RoI box except for
    a centre shift of ``c`` reference widths / ``W0`` for class ``c``."""

    def __init__(self, probs: list[float]) -> None:
        super().__init__()
        self.logits = torch.tensor(probs).log()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        n = x.shape[0]
        deltas = torch.zeros(n, NUM_C, 10)
        deltas[:, :, 0] = torch.arange(NUM_C, dtype=torch.float32)
        return self.logits.expand(n, -1), deltas.flatten(1)


class CentreQuality(nn.Module):
    """A quality branch whose logit is the RoI's centre x in feature cells minus 4 (every
    class alike), read from pooled features whose channel 0 is the x coordinate map."""

    def forward(self, x: Tensor) -> Tensor:
        return (x[:, :49].mean(1, keepdim=True) - 4.0).expand(-1, NUM_C)


def x_map(h: int, w: int) -> Tensor:
    """``[1, 2, h, w]`` features: channel 0 = the x index of each cell, channel 1 = noise."""
    return torch.stack([torch.arange(w, dtype=torch.float32).expand(h, w), torch.rand(h, w)])[None]


def heads(**roi: object) -> PolyRoIHeads:
    roi = {"second_stage": "hull", **roi}  # the box head's second pass (not the quad stage)
    cfg = dataclasses.replace(load_config("params.yaml").model.roi, refine_steps=1, **roi)
    h = PolyRoIHeads(["0"], 2, NUM_C, cfg)
    h.box_head = nn.Flatten()  # any features: the stub predictor ignores them
    h.box_predictor = ClassShift([0.1, 0.2, 0.3, 0.4])
    if cfg.quality_loss_weight > 0:
        h.quality = CentreQuality()
    return h


def test_refinement_decodes_the_detected_class_on_the_hull_and_averages_scores() -> None:
    h = heads()
    features = {"0": torch.rand(2, 2, 16, 16)}  # stride 8 for 128 x 128 images
    rect = [[10.0, 20.0], [50.0, 20.0], [50.0, 40.0], [10.0, 40.0]]
    kite = [[70.0, 60.0], [90.0, 75.0], [70.0, 100.0], [55.0, 75.0]]
    poly = from_corners(torch.tensor([[rect, kite], [kite, rect]]))  # [2, 2, 10]
    scores = torch.tensor([[0.9, 0.6], [0.8, 0.0]])
    labels = torch.tensor([[1, 3], [2, 0]])
    found = torch.tensor([[True, True], [True, False]])  # the last row is padding
    sizes = torch.tensor([[128.0, 128.0], [128.0, 128.0]])
    out, out_scores, quality = refine_detections(
        h, features, poly, scores, labels, found, sizes, (128, 128)
    )
    assert quality is None  # no quality branch

    w0 = PolyBoxCoder(h.cfg.coder_weights).weights[0]
    for b, k in [(0, 0), (0, 1), (1, 0)]:
        hull = hull_xyxy(poly[b, k])
        expected = torch.tensor(
            [[hull[0], hull[1]], [hull[2], hull[1]], [hull[2], hull[3]], [hull[0], hull[3]]]
        )
        expected[:, 0] += int(labels[b, k]) * (hull[2] - hull[0]) / w0
        assert torch.allclose(to_corners(out[b, k]), to_corners(from_corners(expected)), atol=1e-4)
        probability = [0.1, 0.2, 0.3, 0.4][int(labels[b, k])]
        assert abs(float(out_scores[b, k]) - (float(scores[b, k]) + probability) / 2) < 1e-6
    assert torch.equal(out[1, 1], poly[1, 1]) and float(out_scores[1, 1]) == 0.0


def test_refined_corners_are_clipped_to_the_image() -> None:
    h = heads()
    features = {"0": torch.rand(1, 2, 8, 8)}
    near_edge = from_corners(
        torch.tensor([[[[40.0, 5.0], [63.0, 5.0], [63.0, 30.0], [40.0, 30.0]]]])
    )
    out, _, _ = refine_detections(
        h, features, near_edge, torch.tensor([[0.9]]), torch.tensor([[3]]),
        torch.tensor([[True]]), torch.tensor([[64.0, 64.0]]), (64, 64),
    )  # fmt: skip
    corners = to_corners(out[0, 0])
    assert float(corners[:, 0].max()) == 64.0  # the class-3 shift pushed it past the edge
    assert float(corners.min()) >= 0.0


def test_second_nms_drops_refined_duplicates_per_class_and_sorts() -> None:
    a = from_corners(torch.tensor([[10.0, 10.0], [40.0, 10.0], [40.0, 30.0], [10.0, 30.0]]))
    b = from_corners(torch.tensor([[11.0, 10.0], [41.0, 10.0], [41.0, 30.0], [11.0, 30.0]]))
    c = from_corners(torch.tensor([[60.0, 60.0], [90.0, 60.0], [90.0, 80.0], [60.0, 80.0]]))
    poly = torch.stack([a, b, b, c, c])[None]  # a ~ b (IoU 0.94), c alone
    scores = torch.tensor([[0.5, 0.7, 0.6, 0.4, 0.0]])
    labels = torch.tensor([[1, 1, 2, 1, 0]])
    found = torch.tensor([[True, True, True, True, False]])
    out, out_scores, out_labels, kept, first = renms(poly, scores, labels, found, 0.3)
    assert first is None  # no first corners given
    # b (0.7) suppresses a (0.5, same class); b of class 2 and c stay; best first.
    assert kept.tolist() == [[True, True, True, False, False]]
    assert out_scores[0, :3].tolist() == pytest.approx([0.7, 0.6, 0.4])
    assert out_labels[0, :3].tolist() == [1, 2, 1]
    assert torch.equal(out[0, 0], b) and torch.equal(out[0, 2], c)


def rect(x1: float, y1: float, x2: float, y2: float) -> list[list[float]]:
    return [[x1, y1], [x2, y1], [x2, y2], [x1, y2]]


def shapely_iou(a: Tensor, b: Tensor) -> float:
    from shapely.geometry import Polygon

    pa, pb = Polygon(to_corners(a).tolist()), Polygon(to_corners(b).tolist())
    return pa.intersection(pb).area / pa.union(pb).area


@pytest.mark.parametrize(("vote_iou", "power"), [(0.0, 0.0), (0.6, 0.0), (0.6, 0.5), (0.0, 1.0)])
def test_refine_then_nms_refines_the_best_candidates_then_nms_then_votes(
    vote_iou: float, power: float
) -> None:
    """Candidates go through the head first (the stub: the hull, shifted by class x width /
    W0), then NMS per class, then each kept quad is the score x IoU weighted mean of the
    refined quads of its class overlapping it by >= vote_iou; all checked against a plain
    Python reference with shapely's IoU. With the quality branch (``power`` > 0) the score is
    the mean probability^(1 - power) x the predicted IoU^power of the refinement pass (the
    stub: sigmoid of its RoI's centre x / 8 - 4), and NMS and the vote use that score."""
    h = heads(
        refine_candidates=5, vote_iou=vote_iou, nms_thresh=0.3, detections_per_img=10,
        quality_loss_weight=float(power > 0), quality_power=power,
    )  # fmt: skip
    features = {"0": x_map(16, 16)}
    tilt = [[20.0, 12.0], [60.0, 20.0], [56.0, 42.0], [16.0, 34.0]]  # hull 16..60 x 12..42
    quads = {  # (RoI, class g): first-pass quad and score
        (0, 0): (tilt, 0.9),
        (1, 0): (rect(19.0, 14.0, 63.0, 44.0), 0.6),  # same object: IoU > 0.6 with (0, 0)
        (2, 0): (rect(30.0, 25.0, 74.0, 55.0), 0.5),  # neighbour: 0.3 < IoU < 0.6
        (1, 1): (rect(19.0, 14.0, 63.0, 44.0), 0.45),  # another class: never voted with g 0
        (3, 0): (rect(90.0, 90.0, 110.0, 110.0), 0.35),  # alone
        (4, 0): (rect(5.0, 90.0, 25.0, 110.0), 0.2),  # 6th best: not refined, not kept
        (4, 2): (rect(5.0, 5.0, 9.0, 9.0), 0.01),  # not a candidate (score)
    }
    poly = torch.zeros(1, 5, 3, 10)
    scores = torch.zeros(1, 5, 3)
    for (p, g), (corners, s) in quads.items():
        poly[0, p, g] = from_corners(torch.tensor(corners))
        scores[0, p, g] = s
    candidate = scores > 0.05
    sizes = torch.tensor([[128.0, 128.0]])
    out, out_scores, labels, found, first = refine_then_nms(
        h, features, poly, scores, candidate, sizes, (128, 128)
    )
    assert first is None  # the hull stage's heading head is separate (none here)

    # The reference: refine the 5 best, greedy NMS per class, vote.
    w0 = float(PolyBoxCoder(h.cfg.coder_weights).weights[0])
    probs = [0.1, 0.2, 0.3, 0.4]
    best = sorted((k for k in quads if quads[k][1] > 0.05), key=lambda k: -quads[k][1])[:5]
    refined = []
    for p, g in best:
        x1, y1, x2, y2 = hull_xyxy(poly[0, p, g]).tolist()
        dx = (g + 1) * (x2 - x1) / w0
        quad = from_corners(torch.tensor(rect(x1 + dx, y1, x2 + dx, y2)))
        score = (quads[(p, g)][1] + probs[g + 1]) / 2
        quality = torch.tensor((x1 + x2) / 2 / 8 - 4).sigmoid().item()  # the stub on the hull
        refined.append((quad, score ** (1 - power) * quality**power, g + 1))
    kept, free = [], list(range(len(refined)))
    while free:
        i = max(free, key=lambda j: refined[j][1])
        kept.append(i)
        free = [j for j in free if j != i and not (
            refined[j][2] == refined[i][2] and shapely_iou(refined[i][0], refined[j][0]) > 0.3
        )]  # fmt: skip
    assert found[0].tolist() == [True] * len(kept) + [False] * (10 - len(kept))
    if power == 1:  # the quality alone ranks: by the hull's centre x, (3, 0) first
        assert kept == [4, 2, 3, 0]  # (2, 0) now suppresses (1, 0)
    elif power == 0:  # by the mean probability: (0, 0) suppresses (1, 0)
        assert kept == [0, 3, 2, 4]
    else:  # both: (2, 0) rises above (1, 1)
        assert kept == [0, 2, 3, 4]
    for row, i in enumerate(kept):
        quad, score, label = refined[i]
        assert int(labels[0, row]) == label
        assert float(out_scores[0, row]) == pytest.approx(score)
        members = [(j, shapely_iou(quad, refined[j][0])) for j in range(len(refined))]
        members = [(j, v) for j, v in members if refined[j][2] == label and v >= vote_iou > 0]
        expected = quad
        if members:
            weights = torch.tensor([refined[j][1] * v for j, v in members])
            stack = torch.stack([to_corners(refined[j][0]) for j, _ in members])
            expected = from_corners((stack * weights[:, None, None]).sum(0) / weights.sum())
        assert torch.allclose(out[0, row], expected, atol=1e-4), (row, vote_iou)
    if vote_iou:  # (0, 0) was voted with (1, 0), so it moved towards it
        assert not torch.allclose(out[0, 0], refined[0][0], atol=1e-2)


def two_positives() -> tuple[list[Tensor], list[Tensor], Tensor, RoISamples]:
    """Sampled RoIs of two images (RoIs 0 and 2 positive, of classes 2 and 3; RoI 1 a
    background one), their labels, matched ground truths and the RoISamples of them."""
    boxes = [torch.tensor([[10.0, 20.0, 50.0, 40.0], [0.0, 0.0, 5.0, 5.0]]),
             torch.tensor([[100.0, 60.0, 126.0, 90.0]])]  # fmt: skip
    labels = [torch.tensor([2, 0]), torch.tensor([3])]
    gt = from_corners(torch.tensor([[[12.0, 18.0], [52.0, 22.0], [49.0, 43.0], [9.0, 39.0]],
                                    [[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]],
                                    [[101.0, 58.0], [127.0, 61.0], [125.0, 92.0], [99.0, 88.0]]]))  # fmt: skip
    return boxes, labels, gt, RoISamples(boxes, labels, [gt[:2], gt[2:]])


def test_refine_loss_runs_the_head_on_the_hulls_of_its_own_decoded_positives() -> None:
    """Training of the second pass (``model.roi.refine_loss_weight``): the stub head shifts a
    class-c RoI by c widths / W0, so the first pass's quad of a positive is its RoI shifted,
    clipped to the image; the second pass is scored on that hull against the same truth."""
    from polydet.geometry.coder import polybox_loss
    from polydet.model.roi_heads import polybox_iou_loss

    h = heads()
    h.cfg = dataclasses.replace(h.cfg, refine_loss_weight=1.0, iou_loss_weight=3.0)
    w0 = float(PolyBoxCoder(h.cfg.coder_weights).weights[0])
    boxes, labels, gt, samples = two_positives()
    pos = torch.tensor([0, 2])
    first = h.box_predictor(torch.zeros(3, 1))[1].view(3, NUM_C, 10)[pos, torch.tensor([2, 3])]
    first.requires_grad_(True)
    features = {"0": torch.rand(2, 2, 16, 16, requires_grad=True)}
    loss = h.refine_loss(features, samples, pos, first, [(128, 128), (128, 128)])

    # expected hulls, by hand: box 0 shifted right by 2 widths / W0; box 2 by 3, then clipped
    hull0 = torch.tensor([10.0 + 2 * 40 / w0, 20.0, 50.0 + 2 * 40 / w0, 40.0])
    hull2 = torch.tensor([100.0 + 3 * 26 / w0, 60.0, 128.0, 90.0])
    hulls = torch.stack([hull0, hull2])
    second = first.detach()
    expected = polybox_loss(second, gt[[0, 2]], hulls, h.coder, h.cfg.order_free)[0]
    expected = expected * h.cfg.loss_weight + 3.0 * polybox_iou_loss(
        second, gt[[0, 2]], hulls, h.coder
    )
    assert abs(float(loss) - float(expected)) < 1e-4 * max(1.0, float(expected))
    # The first pass's quads are passed on without gradient, as between cascade stages: the
    # stub head has no parameters, so the loss would need a gradient only through them.
    assert not loss.requires_grad


def test_refine_loss_off_is_zero_and_on_trains_the_head() -> None:
    from polydet.model import build_model

    cfg = load_config("params.yaml").model
    quad = from_corners(torch.tensor([[[30.0, 40.0], [90.0, 30.0], [100.0, 80.0], [35.0, 90.0]]]))
    targets = [{"polyboxes": quad, "labels": torch.tensor([1])}]
    images = [torch.rand(3, 128, 128)]
    for weight in (0.0, 1.0):
        roi = dataclasses.replace(cfg.roi, refine_loss_weight=weight)
        torch.manual_seed(0)
        model = build_model(dataclasses.replace(cfg, roi=roi)).train()
        losses = model.loss(images, targets)
        if weight == 0:
            assert losses["loss_refine"].item() == 0.0
            continue
        assert losses["loss_refine"].item() > 0
        head = model.roi_heads.box_predictor.polybox_pred.weight
        (grad,) = torch.autograd.grad(losses["loss_refine"], head)
        assert grad.abs().sum() > 0


def test_quality_loss_is_cross_entropy_against_each_positives_polygon_iou() -> None:
    """The quality branch (``model.roi.quality_loss_weight``) learns, for each positive, the
    IoU of its decoded polybox (here: the RoI shifted by 1.5 widths / W0, as all-zero deltas
    but the first decode to the RoI itself) with its ground truth, by shapely; the target is
    a measurement, so no gradient reaches the deltas."""
    h = heads(quality_loss_weight=1.0)
    h.quality = nn.Linear(8, NUM_C)
    w0 = float(PolyBoxCoder(h.cfg.coder_weights).weights[0])
    boxes, labels, gt, samples = two_positives()
    pos = torch.tensor([0, 2])
    deltas = torch.zeros(2, 10)
    deltas[:, 0] = 1.5
    deltas.requires_grad_(True)
    feats = torch.randn(3, 8)
    loss = h.quality_loss(feats, samples, pos, torch.cat(labels), deltas)

    expected = 0.0
    for row, (box, label) in enumerate([(boxes[0][0], 2), (boxes[1][0], 3)]):
        x1, y1, x2, y2 = box.tolist()
        dx = 1.5 * (x2 - x1) / w0
        iou = shapely_iou(from_corners(torch.tensor(rect(x1 + dx, y1, x2 + dx, y2))), gt[2 * row])
        assert 0.3 < iou < 0.95  # a real soft target
        logit = h.quality(feats[int(pos[row])])[label]
        expected = expected + torch.nn.functional.binary_cross_entropy_with_logits(
            logit, torch.tensor(iou)
        )
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert deltas.grad is None
    assert h.quality.weight.grad is not None and h.quality.weight.grad.abs().sum() > 0
