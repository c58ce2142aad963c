"""Augmentations keep polyboxes exact: the transformed box covers exactly the transformed
pixels (pixel-centre rasterization), and stays canonical."""

import numpy as np
import pytest
import torch
from matplotlib.path import Path as MPath

from polydet.core.config import AugmentConfig
from polydet.data import augment as A
from polydet.geometry import polybox

H, W = 48, 64  # not square: rot90 must swap the sides


def _raster(boxes: torch.Tensor, h: int, w: int) -> np.ndarray:
    """[H, W] bool: pixel centres inside any polybox (an independent rasterizer)."""
    yy, xx = np.mgrid[0:h, 0:w]
    pts = np.stack([xx.ravel() + 0.5, yy.ravel() + 0.5], 1)
    out = np.zeros(h * w, bool)
    for c in polybox.to_corners(boxes.double()).numpy():
        out |= MPath(c).contains_points(pts)
    return out.reshape(h, w)


@pytest.fixture
def sample() -> tuple[torch.Tensor, dict]:
    rng = np.random.default_rng(3)
    # Irregular convex quads with non-integer corners (no pixel centre on an edge).
    corners = torch.tensor(
        [
            [[5.3, 4.1], [30.7, 9.2], [26.2, 30.9], [7.9, 22.4]],
            [[40.2, 20.3], [60.1, 26.6], [52.4, 45.2], [38.3, 40.7]],
        ],
        dtype=torch.float64,
    )
    boxes = polybox.from_corners(corners).float()
    image = torch.from_numpy(rng.random((3, H, W)).astype(np.float32))
    mask = torch.from_numpy(_raster(boxes, H, W))
    image[0] = torch.where(mask, 1.0, 0.0)  # channel 0 paints the objects
    return image, {
        "polyboxes": boxes,
        "labels": torch.tensor([1, 2]),
        "difficult": torch.tensor([False, True]),
        "image_id": "x",
    }


@pytest.mark.parametrize(
    "op",
    [
        A.hflip,
        A.vflip,
        lambda i, t: A.rot90(i, t, 1),
        lambda i, t: A.rot90(i, t, 2),
        lambda i, t: A.rot90(i, t, 3),
    ],
)
def test_geometric_ops_cover_the_same_pixels(sample: tuple, op) -> None:
    image, target = sample
    out, t = op(image, target)
    h, w = out.shape[-2:]
    painted = out[0].numpy() > 0.5
    assert (_raster(t["polyboxes"], h, w) == painted).all()
    assert painted.sum() > 500
    torch.testing.assert_close(polybox.canonicalize(t["polyboxes"]), t["polyboxes"])
    assert (
        t["labels"].tolist() == [1, 2]
        and t["difficult"].tolist() == [False, True]
        and t["image_id"] == "x"
    )


def test_rot90_changes_shape_and_four_turns_are_identity(sample: tuple) -> None:
    image, target = sample
    out, t = A.rot90(image, target, 1)
    assert out.shape == (3, W, H)
    for _ in range(3):
        out, t = A.rot90(out, t, 1)
    assert torch.equal(out, image)
    torch.testing.assert_close(t["polyboxes"], target["polyboxes"], atol=1e-4, rtol=0)


def test_resize_scales_boxes_exactly(sample: tuple) -> None:
    image, target = sample
    out, t = A.resize(image, target, (96, 160))  # 2x high, 2.5x wide
    assert out.shape == (3, 96, 160)
    expected = polybox.to_corners(target["polyboxes"]) * torch.tensor([2.5, 2.0])
    torch.testing.assert_close(polybox.to_corners(t["polyboxes"]), expected)
    # Interpolated pixels: the painted region agrees with the scaled boxes to a 1 px border.
    painted = out[0].numpy() > 0.5
    iou = (painted & _raster(t["polyboxes"], 96, 160)).sum() / (
        painted | _raster(t["polyboxes"], 96, 160)
    ).sum()
    assert iou > 0.95


def test_color_jitter_keeps_range_and_is_seeded(sample: tuple) -> None:
    image, _ = sample
    a = A.color_jitter(image, 0.4, torch.Generator().manual_seed(1))
    b = A.color_jitter(image, 0.4, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, image)
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(A.color_jitter(image, 0.0), image)


def test_augment_is_a_function_of_the_generator(sample: tuple) -> None:
    image, target = sample
    aug = A.Augment(AugmentConfig(hflip=0.5, vflip=0.5, rot90=0.5, color_jitter=0.2))
    shapes = set()
    for seed in range(12):
        i1, t1 = aug(image, target, torch.Generator().manual_seed(seed))
        i2, t2 = aug(image, target, torch.Generator().manual_seed(seed))
        assert torch.equal(i1, i2) and torch.equal(t1["polyboxes"], t2["polyboxes"])
        torch.testing.assert_close(polybox.area(t1["polyboxes"]), polybox.area(target["polyboxes"]))
        shapes.add(tuple(i1.shape))
    assert shapes == {(3, H, W), (3, W, H)}
    same, _ = A.Augment(AugmentConfig(0.0, 0.0, 0.0, 0.0))(image, target)
    assert torch.equal(same, image)
