"""Test-time augmentation: views mapped back exactly, corner-aligned fusion, classes apart."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from helpers import quad, tiny_cfg

from polydet.core.config import ConfigError, load_config, tta_config_from_dict
from polydet.core.errors import ModelError
from polydet.eval.tta import TTAModel, View, fuse, input_scale, views_of, with_tta
from polydet.geometry import polybox
from polydet.model import build_model
from polydet.tracking.pyfunc import _with_logged_tta

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
# Marked pixels (x, y) of two quads, one per channel: a convex, asymmetric quad each.
MARKS = {0: [(5, 3), (20, 6), (17, 20), (4, 15)], 1: [(25, 5), (36, 8), (33, 25), (27, 21)]}


def tta_cfg(**changes: object):  # -> TTAConfig
    cfg = load_config(PARAMS).evaluate.tta
    return dataclasses.replace(cfg, enabled=True, **changes)


class MarkerDetector:
    """A stand-in detector whose output is a function of the image content only: for each
    of channels 0 and 1, the quad through the centres of its lit pixels (label channel + 1,
    a score from the channel). A flip or a quarter turn of the image moves the pixel centres
    exactly, so the true inverse mapping gives back the untransformed detections."""

    def predict(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        out = []
        for im in images:
            boxes, scores, labels = [], [], []
            for c in (0, 1):
                ys, xs = torch.where(im[c] > 0.5)
                if len(xs) == 4:
                    pts = torch.stack([xs, ys], -1).float() + 0.5  # pixel centres
                    boxes.append(polybox.from_corners(pts))
                    scores.append(0.9 - 0.2 * c)
                    labels.append(c + 1)
            out.append(
                {
                    "polyboxes": torch.stack(boxes),
                    "scores": torch.tensor(scores),
                    "labels": torch.tensor(labels),
                }
            )
        return out


def marked_image() -> torch.Tensor:
    image = torch.zeros(3, 30, 40)  # not square: odd quarter turns change the shape
    for c, pts in MARKS.items():
        for x, y in pts:
            image[c, y, x] = 1.0
    return image


def test_every_view_maps_back_to_the_untransformed_detections() -> None:
    image = marked_image()
    net = TTAModel(MarkerDetector(), tta_cfg())
    assert len(net.views) == 6  # identity, h, v, rot90 by 1, 2, 3
    per_view = net.view_detections([image])
    expected = MarkerDetector().predict([image])[0]
    truth = torch.tensor([[x + 0.5, y + 0.5] for x, y in MARKS[0]])
    assert torch.allclose(polybox.canonicalize(expected["polyboxes"][0]),
                          polybox.from_corners(truth))  # fmt: skip
    for view, (det,) in zip(net.views, per_view):
        assert det["labels"].tolist() == [1, 2]
        assert torch.allclose(det["polyboxes"], expected["polyboxes"], atol=1e-4), view
        assert torch.equal(det["scores"], expected["scores"])
        # The mapping back did something: the view's own detections differ (but the identity).
        raw = MarkerDetector().predict([view.apply(image)])[0]["polyboxes"]
        moved = not torch.allclose(raw, expected["polyboxes"], atol=1e-2)
        assert moved == (view != View())


@pytest.mark.parametrize("fusion", ["nms", "weighted"])
def test_tta_of_an_equivariant_detector_is_its_plain_output(fusion: str) -> None:
    image = marked_image()
    fused = TTAModel(MarkerDetector(), tta_cfg(fusion=fusion)).predict([image, image.flip(-1)])
    for im, det in zip([image, image.flip(-1)], fused):
        plain = MarkerDetector().predict([im])[0]
        assert det["labels"].tolist() == plain["labels"].tolist()
        assert torch.allclose(det["polyboxes"], plain["polyboxes"], atol=1e-4)
        assert torch.allclose(det["scores"], plain["scores"])


def test_weighted_fusion_aligns_corner_order_before_averaging() -> None:
    q = quad(50, 40, 30, 12, 20)
    corners = polybox.to_corners(q)
    rolled = torch.cat(
        [q[:2], (corners.roll(1, 0) - q[:2]).flatten()]
    )  # same quad, 2nd corner first
    naive = polybox.from_corners((corners + corners.roll(1, 0)) / 2)  # edge midpoints: a rhombus
    assert polybox.area(naive) < 0.6 * polybox.area(q)
    dets = [
        {"polyboxes": q[None], "scores": torch.tensor([0.9]), "labels": torch.tensor([1])},
        {"polyboxes": rolled[None], "scores": torch.tensor([0.6]), "labels": torch.tensor([1])},
    ]
    out = fuse(dets, "weighted", 0.5, num_views=2)
    assert len(out["scores"]) == 1
    assert torch.allclose(out["polyboxes"][0], q, atol=1e-4)
    assert torch.isclose(out["scores"][0], torch.tensor(0.75))


def test_weighted_fusion_across_the_45_degree_switch_of_the_first_corner() -> None:
    a, b = quad(60, 60, 40, 40, 44), quad(60, 60, 40, 40, 46)
    # Canonical order starts at a different corner of the two nearly identical squares.
    assert (polybox.to_corners(a)[0] - polybox.to_corners(b)[0]).norm() > 20
    dets = [
        {"polyboxes": p[None], "scores": torch.tensor([0.8]), "labels": torch.tensor([2])}
        for p in (a, b)
    ]
    out = fuse(dets, "weighted", 0.5, num_views=2)
    assert len(out["scores"]) == 1
    assert torch.allclose(out["polyboxes"][0], quad(60, 60, 40, 40, 45), atol=0.05)
    assert polybox.area(out["polyboxes"][0]) > 0.99 * 1600


@pytest.mark.parametrize("fusion", ["nms", "weighted"])
def test_fusion_keeps_classes_apart(fusion: str) -> None:
    q = quad(30, 30, 20, 10, 10)
    views = [
        {"polyboxes": torch.stack([q, q]), "scores": torch.tensor([0.9, 0.8]),
         "labels": torch.tensor([1, 2])},
        {"polyboxes": q[None] + 0.3, "scores": torch.tensor([0.7]), "labels": torch.tensor([1])},
    ]  # fmt: skip
    out = fuse(views, fusion, 0.5, num_views=2)
    assert sorted(out["labels"].tolist()) == [1, 2]
    assert (out["scores"][:-1] >= out["scores"][1:]).all()


def test_align_corners_picks_the_closest_roll() -> None:
    ref = polybox.to_corners(quad(0, 0, 10, 4, 0))
    for r in range(4):
        assert torch.equal(polybox.align_corners(ref, ref.roll(r, 0)[None])[0], ref)


def test_scale_views_resize_the_model_input_and_restore_it() -> None:
    net = build_model(tiny_cfg())  # min_size = max_size = 128
    image = torch.rand(3, 64, 96)
    with input_scale(net, 1.5):
        batch, _, _ = net.preprocess([image])
        assert batch.image_sizes == [(128, 192)]
    assert net.cfg.min_size == 128 and net.preprocess([image])[0].image_sizes == [(85, 128)]
    assert len(views_of(tta_cfg(scales=(1.5,)))) == 7
    with pytest.raises(ModelError, match="torch runtime"):
        TTAModel(MarkerDetector(), tta_cfg(scales=(1.5,)))


def test_tta_settings_are_checked_and_reach_the_mlflow_model() -> None:
    with pytest.raises(ConfigError, match="evaluate.tta.rot90"):
        load_config(PARAMS, ["evaluate.tta.rot90=[4]"])
    with pytest.raises(ConfigError, match="evaluate.tta.fusion"):
        load_config(PARAMS, ["evaluate.tta.fusion=mean"])
    off = load_config(PARAMS).evaluate.tta
    assert not off.enabled and with_tta(MarkerDetector, off) is MarkerDetector
    logged = {"tta": {**dataclasses.asdict(off), "enabled": True, "fusion": "weighted"}}
    wrapped = _with_logged_tta(MarkerDetector(), logged)
    assert isinstance(wrapped, TTAModel) and wrapped.tta == tta_config_from_dict(logged["tta"])
    plain = MarkerDetector()
    assert _with_logged_tta(plain, None) is plain  # a model logged before the setting


class HeadingMarkerDetector(MarkerDetector):
    """:class:`MarkerDetector` that also predicts a heading: the first corner of each quad is
    the one whose edge's midpoint is nearest the lit pixel of channel 2 (a content function,
    so each view's answer is the same physical edge)."""

    def predict(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        from polydet.geometry import heading

        out = super().predict(images)
        for im, det in zip(images, out):
            ys, xs = torch.where(im[2] > 0.5)
            mark = torch.stack([xs, ys], -1).float()[0] + 0.5
            det["first_corner"] = heading.nearest_edge(polybox.to_corners(det["polyboxes"]), mark)
        return out


def test_tta_maps_the_heading_back_and_keeps_it_through_fusion() -> None:
    from polydet.geometry import heading

    image = marked_image()
    image[2, 4, 12] = 1.0  # next to the middle of quad 0's top edge (5, 3) -> (20, 6)
    expected = HeadingMarkerDetector().predict([image])[0]
    ring = polybox.to_corners(expected["polyboxes"][0])
    # Independent of the code under test: the top edge starts at the marked (5, 3) corner.
    assert torch.allclose(ring[int(expected["first_corner"][0])], torch.tensor([5.5, 3.5]))
    net = TTAModel(HeadingMarkerDetector(), tta_cfg())
    changed = 0
    for view, (det,) in zip(net.views, net.view_detections([image])):
        raw = HeadingMarkerDetector().predict([view.apply(image)])[0]["first_corner"]
        assert torch.equal(det["first_corner"], expected["first_corner"]), (view, raw)
        changed += not torch.equal(raw, expected["first_corner"])
    assert changed >= 2  # the views' own first corners differ: the mapping back matters
    for fusion in ("nms", "weighted"):
        (fused,) = TTAModel(HeadingMarkerDetector(), tta_cfg(fusion=fusion)).predict([image])
        assert torch.equal(fused["first_corner"], expected["first_corner"]), fusion
        h = heading.heading_degrees(fused["polyboxes"], fused["first_corner"])
        h0 = heading.heading_degrees(expected["polyboxes"], expected["first_corner"])
        assert torch.allclose(h, h0, atol=1e-3), fusion
