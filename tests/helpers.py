"""Shared by the model tests: the tiny detector configuration and rotated-rectangle quads."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from polydet.core.config import ModelConfig, load_config
from polydet.geometry.polybox import from_corners

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
# A 32-channel FPN on 128 px images, two classes: fast enough for CPU tests.
TINY_MODEL = (
    "model.backbone=resnet18_fpn",
    "model.weights=null",
    "model.returned_layers=[2, 3, 4]",
    "model.fpn_channels=32",
    "model.min_size=128",
    "model.max_size=128",
    "anchors.sizes=[[16], [32], [64], [128]]",
    "anchors.aspect_ratios=[0.5, 1.0, 2.0]",
    "model.rpn.pre_nms_top_n_train=200",
    "model.rpn.post_nms_top_n_train=100",
    "model.rpn.pre_nms_top_n_test=100",
    "model.rpn.post_nms_top_n_test=50",
    "model.roi.representation_size=64",
    "model.roi.batch_size_per_image=32",
    "data.classes=[a, b]",
)


def tiny_cfg(*overrides: str) -> ModelConfig:
    """The tiny model's config; ``overrides`` (``key=value``) win over :data:`TINY_MODEL`."""
    return load_config(PARAMS, [*TINY_MODEL, *overrides]).model


def quad(cx: float, cy: float, w: float, h: float, angle_deg: float) -> torch.Tensor:
    """A rotated rectangle as a canonical polybox ``[10]``."""
    a = math.radians(angle_deg)
    rot = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    half = torch.tensor([[-w / 2, -h / 2], [w / 2, -h / 2], [w / 2, h / 2], [-w / 2, h / 2]])
    return from_corners(half @ rot.T + torch.tensor([cx, cy]))


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread: on a shared 2-core machine two spinning OpenMP threads per
    process made tiny training steps 5-8x slower (measured 3.9 s against 0.6 s for 3 steps).
    Test modules that train opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``
    after importing it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
