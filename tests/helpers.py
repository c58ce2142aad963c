"""Shared by the tests: the one tiny configuration (and its faster-training variant) and
rotated-rectangle quads. (Not in conftest.py: tests/ and tests/faults/ each have a conftest,
so ``from conftest import ...`` would not name one module.)"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from polydet.core.config import ModelConfig, load_config
from polydet.geometry.polybox import from_corners

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
# The tiny configuration (params.yaml overrides) of every test that builds a model: a
# 32-channel ResNet-18 FPN on 128 px images, few proposals and sampled RoIs, on the CPU.
TINY = (
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
    "train.device=cpu",
)
# TINY made cheap to train, for the tests that run training steps (training, resume, DDP,
# prediction from a trained file): a 16-channel MobileNetV3 FPN on 64 px images, a step in
# well under a second on one core.
FAST = (
    *TINY,
    "model.backbone=mobilenet_v3_fpn",
    "model.fpn_channels=16",
    "model.min_size=64",
    "model.max_size=64",
    "model.returned_layers=[4, 5]",
    "anchors.sizes=[[12], [24], [48]]",
    "model.roi.representation_size=32",
    "model.rpn.pre_nms_top_n_train=64",
    "model.rpn.post_nms_top_n_train=32",
    "model.rpn.pre_nms_top_n_test=64",
    "model.rpn.post_nms_top_n_test=32",
    "model.rpn.batch_size_per_image=32",
    "model.roi.batch_size_per_image=16",
)


def tiny_cfg(*overrides: str) -> ModelConfig:
    """The model section of :data:`TINY` with two classes (a, b); ``overrides`` win."""
    return load_config(PARAMS, [*TINY, "data.classes=[a, b]", *overrides]).model


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
