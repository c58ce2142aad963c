"""The separable RoIAlign used in training on CPU against torchvision's operator."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import roi_align

from polydet.model.roi_align import MAX_CELLS, roi_align_separable, use_separable


def _rois(num: int, batch: int, height: int, width: int, stride: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(num + height)
    xy = torch.rand(num, 2, generator=g, dtype=torch.float64)
    xy = xy * torch.tensor([width, height]) * stride * 1.3 - 10  # some past every edge
    wh = torch.rand(num, 2, generator=g, dtype=torch.float64) * 8 * stride
    wh[:5] = 0.1  # below one cell: torchvision widens them to 1
    image = torch.randint(0, batch, (num, 1), generator=g).double()
    return torch.cat([image, xy, xy + wh], dim=1)


@pytest.mark.parametrize("shape", [(4, 6, 20, 20), (2, 3, 10, 13), (3, 2, 5, 5), (1, 2, 1, 7)])
@pytest.mark.parametrize("sampling_ratio", [1, 2, 3])
def test_equals_torchvision_forward_and_backward(shape, sampling_ratio) -> None:
    batch, _, height, width = shape
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    rois = _rois(120, batch, height, width, stride=8)
    expected = roi_align(x, rois, (7, 5), 1 / 8, sampling_ratio)
    got = roi_align_separable(x, rois, (7, 5), 1 / 8, sampling_ratio)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    upstream = torch.randn_like(expected)
    (g_expected,) = torch.autograd.grad((expected * upstream).sum(), x)
    (g_got,) = torch.autograd.grad((got * upstream).sum(), x)
    torch.testing.assert_close(g_got, g_expected, rtol=0, atol=1e-12)


def test_float32_in_float32_out_and_images_without_rois() -> None:
    x = torch.randn(3, 4, 12, 12, requires_grad=True)
    rois = _rois(30, 1, 12, 12, stride=4).float()  # image 0 only
    got = roi_align_separable(x, rois, (7, 7), 0.25, 1)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, roi_align(x, rois, (7, 7), 0.25, 1), rtol=0, atol=1e-5)


def test_used_only_for_training_on_small_cpu_maps() -> None:
    small = torch.zeros(1, 1, 20, 20, requires_grad=True)
    assert use_separable(small, 1)
    assert not use_separable(small.detach(), 1)  # inference: torchvision's operator
    assert not use_separable(small, 0)  # adaptive sampling
    side = int(MAX_CELLS**0.5) + 1
    assert not use_separable(torch.zeros(1, 1, side, side, requires_grad=True), 1)
    with pytest.raises(ValueError, match="sampling_ratio"):
        roi_align_separable(small, torch.zeros(1, 5), (7, 7), 1.0, 0)
