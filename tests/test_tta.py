"""Test-time augmentation: views mapped back exactly, corner-aligned fusion, classes apart."""

from __future__ import annotations

import dataclasses
import math
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
    """The configured TTA, on, with the exact views (mirrors, quarter turns) unless changed."""
    cfg = load_config(PARAMS).evaluate.tta
    views = {"flips": ("h", "v"), "rot90": (1, 2, 3), "angles": ()}
    return dataclasses.replace(cfg, enabled=True, **{**views, **changes})


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
    off = dataclasses.replace(load_config(PARAMS).evaluate.tta, enabled=False)
    assert with_tta(MarkerDetector, off) is MarkerDetector
    logged = {"tta": {**dataclasses.asdict(off), "enabled": True, "flips": ["h"]}}
    with pytest.warns(UserWarning, match="torch runtime"):  # the stand-in is no torch model
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


# --- angle views (evaluate.tta.angles) -------------------------------------------------------


def test_a90_degree_angle_view_is_the_quarter_turn() -> None:
    """The general rotation at 90 degrees samples exactly the pixel centres a quarter turn
    moves (so the two views agree), and maps detections back the same way."""
    from polydet.eval.tta import canvas_size

    image = marked_image()
    turned, quarter = View(angle=90.0), View(k=1)
    assert canvas_size(40, 30, 90.0) == (30, 40)
    assert torch.allclose(turned.apply(image), quarter.apply(image), atol=1e-5)
    found = MarkerDetector().predict([quarter.apply(image)])[0]["polyboxes"]
    back = turned.invert(found, 30, 40, source=(40, 30))
    assert torch.allclose(back, quarter.invert(found, 30, 40), atol=1e-4)


def test_angle_view_turns_counter_clockwise_on_screen_and_maps_points_back() -> None:
    """A bright square right of the centre of a 60 x 40 image, turned by 30 degrees: in the
    canvas its centroid is 30 degrees *above* the horizontal through the canvas centre
    (counter-clockwise on screen, y down), and the inverse mapping takes the centroid back to
    the square's centre; the canvas holds the whole image (mean colour outside it)."""
    from polydet.eval.tta import canvas_size

    image = torch.full((3, 40, 60), 0.2)
    image[:, 16:24, 44:52] = 1.0  # centre (48, 20): 18 px right of the image centre (30, 20)
    view = View(angle=30.0)
    shown = view.apply(image)
    width, height = canvas_size(60, 40, 30.0)
    c, s = math.cos(math.radians(30)), math.sin(math.radians(30))
    assert (width, height) == (math.ceil(60 * c + 40 * s), math.ceil(60 * s + 40 * c))
    assert shown.shape == (3, height, width)
    mass = (shown[0] - 0.3).clamp_min(0)  # the square (the fill, the mean, is ~0.22)
    ys, xs = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    cx, cy = float((mass * xs).sum() / mass.sum()), float((mass * ys).sum() / mass.sum())
    assert cx - width / 2 == pytest.approx(18 * c, abs=0.05)
    assert cy - height / 2 == pytest.approx(-18 * s, abs=0.05)  # up on screen
    point = torch.tensor([cx, cy] + [0.0] * 8)  # a polybox whose corners are its centre
    back = view.invert(point[None], width, height, source=(60, 40))[0, :2]
    assert torch.allclose(back, torch.tensor([48.0, 20.0]), atol=0.05)
    # Outside the image the canvas has the image's mean colour, not black.
    assert torch.allclose(shown[:, 0, 0], image.mean((1, 2)), atol=1e-5)


def test_angle_views_keep_the_objects_pixel_size_on_the_torch_runtime() -> None:
    """The model sees an angle view's larger canvas at a larger input size, so that objects
    keep the size they have in the identity view: 64 x 96 at 128 / 96 = 4/3; its 45-degree
    canvas (ceil(160 / sqrt 2) = 114 px square) at the same factor, an input of 152 px."""
    net = build_model(tiny_cfg())  # min_size = max_size = 128
    seen = []
    plain_predict = net.predict

    def spy(images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        seen.extend(net.preprocess(images)[0].image_sizes)
        return plain_predict(images)

    net.predict = spy
    TTAModel(net, tta_cfg(flips=(), rot90=(), angles=(45.0,))).predict([torch.rand(3, 64, 96)])
    side = round(math.ceil(160 / math.sqrt(2)) * 128 / 96)
    assert side == 152 and seen == [(85, 128), (side, side)]


def test_align_power_trusts_the_view_where_the_object_is_axis_aligned() -> None:
    """Two views' detections of one object: one axis-aligned in its view (align 1), one at
    45 degrees in its own (align 0). With align_power 4 the fused quad is all but the first;
    with 0, the score-weighted mean (the second has the higher score)."""
    good, loose = quad(50, 50, 40, 20, 10), quad(51, 50, 44, 22, 14)
    dets = [
        {"polyboxes": good[None], "scores": torch.tensor([0.6]), "labels": torch.tensor([1]),
         "align": torch.tensor([1.0])},
        {"polyboxes": loose[None], "scores": torch.tensor([0.9]), "labels": torch.tensor([1]),
         "align": torch.tensor([0.0])},
    ]  # fmt: skip
    trusted = fuse(dets, "weighted", 0.5, num_views=2, align_power=4.0)
    w = 0.6 * 1.05**4, 0.9 * 0.05**4
    ring = polybox.align_corners(polybox.to_corners(good), polybox.to_corners(loose)[None])[0]
    expected = (polybox.to_corners(good) * w[0] + ring * w[1]) / sum(w)
    assert torch.allclose(trusted["polyboxes"][0], polybox.from_corners(expected), atol=1e-4)
    assert torch.allclose(trusted["polyboxes"][0], good, atol=1e-3)
    assert torch.isclose(trusted["scores"][0], torch.tensor(0.75))  # the mean score, as before
    plain = fuse(dets, "weighted", 0.5, num_views=2)
    mean = (polybox.to_corners(good) * 0.6 + ring * 0.9) / 1.5
    assert torch.allclose(plain["polyboxes"][0], polybox.from_corners(mean), atol=1e-4)


def test_angle_settings_are_checked_and_old_logged_settings_load() -> None:
    with pytest.raises(ConfigError, match="evaluate.tta.angles"):
        load_config(PARAMS, ["evaluate.tta.angles=[90]"])  # a quarter turn: rot90
    with pytest.raises(ConfigError, match="evaluate.tta.align_power"):
        load_config(PARAMS, ["evaluate.tta.align_power=-1"])
    raw = dataclasses.asdict(load_config(PARAMS).evaluate.tta)
    del raw["angles"], raw["align_power"]  # logged before angle views existed
    old = tta_config_from_dict(raw)
    assert old.angles == () and old.align_power == 0.0
    assert len(views_of(tta_cfg(angles=(45.0,)))) == 7


def test_an_exported_model_runs_without_the_angle_views() -> None:
    """The ONNX runtime cannot see a larger canvas at a larger input size: TTA there keeps
    the other views, with a warning, instead of failing (the default has an angle view); with
    none left but the identity, the model runs alone (no fusion of its own detections)."""
    with pytest.warns(UserWarning, match="torch runtime"):
        net = TTAModel(MarkerDetector(), tta_cfg(flips=("h",), rot90=(), angles=(45.0,)))
    assert net.views == [View(), View(flip="h")]
    plain = MarkerDetector()
    with pytest.warns(UserWarning, match="torch runtime"):
        assert with_tta(plain, tta_cfg(flips=(), rot90=(), angles=(45.0,))) is plain


def test_fused_quads_are_clipped_to_the_image_keeping_their_heading() -> None:
    """An angle view's canvas reaches past the image: fused quads are clipped to it (the
    quad of the part inside, as `prepare` clips labels), and the first corner still starts
    the same edge (its heading moves by the clipping only)."""
    from polydet.eval.tta import _clipped
    from polydet.geometry import heading

    q = quad(5, 40, 30, 12, 50)  # reaches past x = 0
    start = polybox.to_corners(q)[0]
    assert float(start[0]) < 0
    # Clipping moves that corner right: another becomes the canonical first (smallest x + y).
    moved = polybox.to_corners(_clipped({"polyboxes": q[None]}, 100, 80)["polyboxes"][0])[0]
    assert (moved - torch.stack([start[0].clamp(0, 100), start[1]])).norm() > 1
    for first in range(4):
        det = {"polyboxes": q[None], "first_corner": torch.tensor([first])}
        out = _clipped(det, 100, 80)
        ring = polybox.to_corners(out["polyboxes"][0])
        assert float(ring[:, 0].max()) <= 100 and float(ring.min()) >= 0 and ring[:, 1].max() <= 80
        before = heading.heading_degrees(q[None], det["first_corner"])
        after = heading.heading_degrees(out["polyboxes"], out["first_corner"])
        turn = (after - before + 180) % 360 - 180
        assert abs(float(turn)) < 45, (first, before, after)  # a wrong edge: ~90
    unknown = _clipped({"polyboxes": q[None], "first_corner": torch.tensor([-1])}, 100, 80)
    assert unknown["first_corner"].tolist() == [-1]
