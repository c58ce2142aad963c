"""Quad-aligned RoI pooling (polydet/model/quad_align.py) against torchvision's roi_align on
axis-aligned quads, against a slow point-by-point bilinear reference on rotated rectangles
and general quads, its gradient, its FPN level rule, and its export."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign, roi_align

from polydet.model.quad_align import QuadRoIPool, quad_levels, quad_roi_align


def _boxes(num: int, batch: int, height: int, width: int, stride: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(num, 2, generator=g, dtype=torch.float64)
    xy = xy * torch.tensor([width, height]) * stride * 1.3 - 10  # some past every edge
    # at least one cell: roi_align widens narrower boxes to one cell, a quad is pooled as it is
    wh = (1.01 + torch.rand(num, 2, generator=g, dtype=torch.float64) * 8) * stride
    image = torch.randint(0, batch, (num, 1), generator=g).double()
    return torch.cat([image, xy, xy + wh], dim=1)


def _box_corners(boxes: torch.Tensor) -> torch.Tensor:
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([torch.stack(p, -1) for p in ((x1, y1), (x2, y1), (x2, y2), (x1, y2))], -2)


def _slow_reference(
    feature: np.ndarray, image: int, corners: np.ndarray, scale: float, pool: int, sampling: int
) -> np.ndarray:
    """One RoI, point by point: the bilinear map of the unit square onto the quad, each
    sample read with the roi_align rule written out as in torchvision's C++ kernel."""
    _, channels, height, width = feature.shape
    c = corners * scale
    out = np.zeros((channels, pool, pool))
    for i in range(pool):
        for j in range(pool):
            acc = np.zeros(channels)
            for iy in range(sampling):
                for ix in range(sampling):
                    u = (j + (ix + 0.5) / sampling) / pool
                    v = (i + (iy + 0.5) / sampling) / pool
                    p = (
                        (1 - u) * (1 - v) * c[0]
                        + u * (1 - v) * c[1]
                        + u * v * c[2]
                        + (1 - u) * v * c[3]
                    )
                    x, y = float(p[0]), float(p[1])
                    if y < -1.0 or y > height or x < -1.0 or x > width:
                        continue
                    y, x = max(y, 0.0), max(x, 0.0)
                    y_low, x_low = int(y), int(x)
                    if y_low >= height - 1:
                        y_high = y_low = height - 1
                        y = float(y_low)
                    else:
                        y_high = y_low + 1
                    if x_low >= width - 1:
                        x_high = x_low = width - 1
                        x = float(x_low)
                    else:
                        x_high = x_low + 1
                    ly, lx = y - y_low, x - x_low
                    f = feature[image]
                    acc += (
                        (1 - ly) * (1 - lx) * f[:, y_low, x_low]
                        + (1 - ly) * lx * f[:, y_low, x_high]
                        + ly * (1 - lx) * f[:, y_high, x_low]
                        + ly * lx * f[:, y_high, x_high]
                    )
            out[:, i, j] = acc / (sampling * sampling)
    return out


def _rotated_rectangles(num: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centre = torch.rand(num, 2, generator=g, dtype=torch.float64) * 90 - 5
    half = 2 + torch.rand(num, 2, generator=g, dtype=torch.float64) * 20
    angle = torch.rand(num, generator=g, dtype=torch.float64) * math.pi
    cos, sin = angle.cos(), angle.sin()
    local = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]], dtype=torch.float64)
    pts = local[None] * half[:, None]
    x = pts[..., 0] * cos[:, None] - pts[..., 1] * sin[:, None]
    y = pts[..., 0] * sin[:, None] + pts[..., 1] * cos[:, None]
    return torch.stack([x, y], -1) + centre[:, None]


def _general_quads(num: int, seed: int) -> torch.Tensor:
    rects = _rotated_rectangles(num, seed)
    g = torch.Generator().manual_seed(seed + 1)
    return rects + torch.randn(rects.shape, generator=g, dtype=torch.float64) * 3


@pytest.mark.parametrize("sampling", [1, 2, 3])
@pytest.mark.parametrize("shape", [(2, 5, 13, 17), (3, 4, 20, 20), (1, 2, 1, 9)])
def test_axis_aligned_quads_equal_torchvision_roi_align(shape, sampling) -> None:
    batch, _, height, width = shape
    x = torch.randn(*shape, dtype=torch.float64)
    boxes = _boxes(80, batch, height, width, stride=8, seed=height + sampling)
    expected = roi_align(x, boxes, (7, 7), 1 / 8, sampling, aligned=False)
    got = quad_roi_align([x], [1 / 8], boxes[:, 0].long(), _box_corners(boxes[:, 1:]), 7, sampling)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # float32, as the model runs
    got32 = quad_roi_align(
        [x.float()], [1 / 8], boxes[:, 0].long(), _box_corners(boxes[:, 1:]).float(), 7, sampling
    )
    expected32 = roi_align(x.float(), boxes.float(), (7, 7), 1 / 8, sampling, aligned=False)
    # float32 positions round differently through the bilinear map (x1 + u w vs its 4 terms)
    torch.testing.assert_close(got32, expected32, rtol=0, atol=1e-4)


@pytest.mark.parametrize("kind", ["rotated", "general"])
@pytest.mark.parametrize("sampling", [1, 2])
def test_rotated_and_general_quads_equal_slow_reference(kind, sampling) -> None:
    x = torch.randn(2, 3, 12, 11, dtype=torch.float64)
    corners = _rotated_rectangles(12, 3) if kind == "rotated" else _general_quads(12, 4)
    image = torch.arange(12) % 2
    got = quad_roi_align([x], [1 / 8], image, corners, 5, sampling).numpy()
    for r in range(12):
        ref = _slow_reference(x.numpy(), int(image[r]), corners[r].numpy(), 1 / 8, 5, sampling)
        np.testing.assert_allclose(got[r], ref, rtol=0, atol=1e-10)


def test_rotated_grid_follows_the_quad() -> None:
    """A feature that is a linear ramp along x reads back the ramp along the quad's first edge:
    on a square turned by 90 degrees (first corner top-right), bins along u run down in y."""
    height, width = 16, 16
    ramp = torch.arange(width, dtype=torch.float64).expand(height, width)
    feat = torch.stack([ramp, ramp.t()])[None]  # channel 0: x, channel 1: y
    turned = torch.tensor(
        [[[12.0, 2.0], [12.0, 12.0], [2.0, 12.0], [2.0, 2.0]]], dtype=torch.float64
    )
    out = quad_roi_align([feat], [1.0], torch.zeros(1, dtype=torch.long), turned, 5, 1)[0]
    t = (torch.arange(5, dtype=torch.float64) + 0.5) / 5
    # u (columns) runs from corner 0 (12, 2) towards corner 1 (12, 12): y grows along a row
    for row in range(5):
        torch.testing.assert_close(out[1, row], 2 + 10 * t)
    # v (rows) runs from corner 0 towards corner 3 (2, 2): x falls down a column
    for col in range(5):
        torch.testing.assert_close(out[0, :, col], 12 - 10 * t)


def test_gradients() -> None:
    x = torch.randn(2, 2, 7, 8, dtype=torch.float64, requires_grad=True)
    corners = (_general_quads(5, 7) / 12).requires_grad_(True)
    image = torch.tensor([0, 1, 1, 0, 1])

    def pooled(feature: torch.Tensor, quads: torch.Tensor) -> torch.Tensor:
        return quad_roi_align([feature], [1.0], image, quads, 3, 2)

    assert torch.autograd.gradcheck(pooled, (x, corners), eps=1e-6, atol=1e-6)


def test_levels_from_the_quads_own_area() -> None:
    """A square turned 45 degrees inside a 120 px box has the area of an 85 px box: level 2
    (stride 4 of 2..5) where its enclosing box would take level 3. The rule is torchvision's
    LevelMapper on sqrt(area)."""
    side = 120.0
    diamond = torch.tensor(
        [[[side / 2, 0.0], [side, side / 2], [side / 2, side], [0.0, side / 2]]]
    )  # area side^2 / 2, enclosing box side x side
    level = quad_levels(diamond, 2, 5)
    expected = math.floor(4 + math.log2(math.sqrt(side * side / 2) / 224) + 1e-6) - 2
    assert int(level) == expected
    hull_level = math.floor(4 + math.log2(side / 224) + 1e-6) - 2
    assert hull_level == expected + 1  # the enclosing box would pick a coarser level

    # the same levels as MultiScaleRoIAlign on axis-aligned boxes
    boxes = _boxes(60, 1, 40, 40, stride=8, seed=2)[:, 1:] * 4
    pooler = MultiScaleRoIAlign(["0", "1", "2"], 7, 1)
    feats = {k: torch.zeros(1, 1, s, s) for k, s in (("0", 80), ("1", 40), ("2", 20))}
    pooler(feats, [boxes.float()], [(640, 640)])  # sets up its level mapper
    expected_levels = pooler.map_levels([boxes.float()])
    torch.testing.assert_close(quad_levels(_box_corners(boxes).float(), 3, 5), expected_levels)


def test_multilevel_equals_per_level_torchvision() -> None:
    """Several levels in one gather: each RoI equals roi_align on its own level's map."""
    feats = {
        "0": torch.randn(2, 3, 40, 40, dtype=torch.float64),
        "1": torch.randn(2, 3, 20, 20, dtype=torch.float64),
        "2": torch.randn(2, 3, 10, 10, dtype=torch.float64),
    }
    boxes = _boxes(50, 2, 40, 40, stride=8, seed=5)
    boxes[:, 3:] = boxes[:, 1:3] + (boxes[:, 3:] - boxes[:, 1:3]) * 4  # larger: several levels
    pool = QuadRoIPool(["0", "1", "2"], 7, 2)
    got = pool(feats, boxes[:, 0].long(), _box_corners(boxes[:, 1:]), (320, 320))
    levels = quad_levels(_box_corners(boxes[:, 1:]), 3, 5)
    assert len(set(levels.tolist())) > 1
    for r in range(len(boxes)):
        lvl = int(levels[r])
        ref = roi_align(feats[str(lvl)], boxes[r : r + 1], (7, 7), 1 / 2 ** (3 + lvl), 2)
        torch.testing.assert_close(got[r : r + 1], ref, rtol=0, atol=1e-10)


class _Pool(torch.nn.Module):
    def forward(
        self, f0: torch.Tensor, f1: torch.Tensor, image: torch.Tensor, corners: torch.Tensor
    ):
        return quad_roi_align([f0, f1], [1 / 8, 1 / 16], image, corners, 7, 1)


def test_exports_to_onnx_and_torchscript() -> None:
    ort = pytest.importorskip("onnxruntime")
    f0, f1 = torch.randn(2, 4, 20, 24), torch.randn(2, 4, 10, 12)
    corners = (_general_quads(9, 8) * 2).float()
    image = torch.tensor([0, 1] * 4 + [1])
    module = _Pool()
    expected = module(f0, f1, image, corners)
    traced = torch.jit.trace(module, (f0, f1, image, corners))
    # other sizes and RoI counts than the example: nothing baked in
    g0, g1 = torch.randn(3, 4, 16, 32), torch.randn(3, 4, 8, 16)
    quads, img = (_general_quads(5, 9) * 2).float(), torch.tensor([2, 0, 1, 2, 0])
    torch.testing.assert_close(traced(g0, g1, img, quads), module(g0, g1, img, quads))
    buf = io.BytesIO()
    torch.onnx.export(
        module, (f0, f1, image, corners), buf, dynamo=False, opset_version=17,
        input_names=["f0", "f1", "image", "corners"], output_names=["pooled"],
        dynamic_axes={"f0": [0, 2, 3], "f1": [0, 2, 3], "image": [0], "corners": [0]},
    )  # fmt: skip
    session = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    for args in ((f0, f1, image, corners), (g0, g1, img, quads)):
        feed = dict(zip(["f0", "f1", "image", "corners"], (a.numpy() for a in args)))
        (got,) = session.run(None, feed)
        np.testing.assert_allclose(got, module(*args).numpy(), rtol=0, atol=1e-5)
    assert expected.shape == (9, 4, 7, 7)
