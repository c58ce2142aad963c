"""RoIAlign as two small matrix products, for training on CPU.

torchvision's CPU ``roi_align`` backward recomputes the bilinear weights of every output
element and scatters them one at a time: at the default training size it was ~13% of a
step (``bench/bench_model.py``'s profile, AVX2, one thread). Bilinear sampling is
separable, so with a fixed ``sampling_ratio`` the pooled value of one RoI is
``Wy @ feature @ Wx.T``, where ``Wy [PH, H]`` / ``Wx [PW, W]`` hold each bin's averaged
interpolation weights along one axis. Forward and backward are then dense matrix products
(autograd's), exact to float rounding against torchvision's kernel (``aligned=False``,
the same edge rules; ``tests/test_roi_align.py``).

The products cost ``R * PH * H * W * C`` multiply-adds, so :func:`use_separable` keeps this
path to CPU feature maps of at most :data:`MAX_CELLS` cells (a 512 px input at stride 8);
larger maps, CUDA, adaptive sampling (``sampling_ratio <= 0``), tracing and export use
torchvision's operator.
"""

from __future__ import annotations

import torch
from torch import Tensor

MAX_CELLS = 64 * 64


def use_separable(feature: Tensor, sampling_ratio: int) -> bool:
    """Whether :func:`roi_align_separable` should pool this feature map (see module doc)."""
    return (
        feature.device.type == "cpu"
        and feature.requires_grad
        and sampling_ratio > 0
        and feature.shape[-2] * feature.shape[-1] <= MAX_CELLS
        and not torch.jit.is_tracing()
        and not torch.jit.is_scripting()
    )


def _axis_weights(start: Tensor, length: Tensor, bins: int, grid: int, size: int) -> Tensor:
    """``[R, bins, size]``: the mean bilinear weight of each bin's ``grid`` samples on each
    cell of one axis, with torchvision's rules (samples beyond ``[-1, size]`` weigh 0, then
    coordinates are clamped to ``[0, size - 1]``)."""
    num_r = start.shape[0]
    step = length / bins
    offsets = torch.arange(bins * grid, device=start.device, dtype=start.dtype)
    # sample k = p * grid + i sits at start + p * step + (i + 0.5) * step / grid
    pos = start[:, None] + (offsets + 0.5)[None] * (step / grid)[:, None]  # [R, bins*grid]
    inside = ((pos >= -1.0) & (pos <= size)).to(pos.dtype)
    pos = pos.clamp(min=0.0)
    low = pos.floor()
    at_end = low >= size - 1
    low = torch.where(at_end, torch.full_like(low, size - 1), low)
    pos = torch.where(at_end, low, pos)
    high = torch.where(at_end, low, low + 1)
    frac = pos - low
    weights = pos.new_zeros((num_r, bins * grid, size))
    weights.scatter_add_(2, low.long()[..., None], ((1.0 - frac) * inside)[..., None])
    weights.scatter_add_(2, high.long()[..., None], (frac * inside)[..., None])
    return weights.view(num_r, bins, grid, size).sum(2) / grid


def roi_align_separable(
    feature: Tensor,
    rois: Tensor,
    output_size: tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
) -> Tensor:
    """``torchvision.ops.roi_align(feature, rois, output_size, spatial_scale,
    sampling_ratio, aligned=False)`` for ``sampling_ratio > 0``: ``feature [B, C, H, W]``,
    ``rois [R, 5]`` (image index, x1, y1, x2, y2) → ``[R, C, PH, PW]``. Computed in float32
    (as torchvision's autocast rule does; float64 stays float64) and returned in ``feature``'s dtype."""
    if sampling_ratio <= 0:
        raise ValueError(f"roi_align_separable needs sampling_ratio > 0, got {sampling_ratio}")
    out_h, out_w = output_size
    num_b, num_c, height, width = feature.shape
    with torch.autocast(feature.device.type, enabled=False):
        x = feature if feature.dtype == torch.float64 else feature.float()
        boxes = rois[:, 1:].to(x.dtype) * spatial_scale
        roi_w = (boxes[:, 2] - boxes[:, 0]).clamp(min=1.0)
        roi_h = (boxes[:, 3] - boxes[:, 1]).clamp(min=1.0)
        wy = _axis_weights(boxes[:, 1], roi_h, out_h, sampling_ratio, height)  # [R, PH, H]
        wx = _axis_weights(boxes[:, 0], roi_w, out_w, sampling_ratio, width)  # [R, PW, W]
        image = rois[:, 0].long()
        result = x.new_zeros((rois.shape[0], num_c, out_h, out_w))
        for b in range(num_b):
            idx = torch.where(image == b)[0]
            if idx.numel() == 0:
                continue
            n = idx.numel()
            # [n*PH, H] @ [H, C*W] -> [n, PH, C, W]
            rows = wy[idx].reshape(n * out_h, height) @ x[b].transpose(0, 1).reshape(height, -1)
            rows = rows.view(n, out_h * num_c, width)
            pooled = torch.bmm(rows, wx[idx].transpose(1, 2))  # [n, PH*C, PW]
            pooled = pooled.view(n, out_h, num_c, out_w).transpose(1, 2)
            result = result.index_put((idx,), pooled)
    return result.to(feature.dtype)
