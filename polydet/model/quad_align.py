"""Quad-aligned RoI pooling: features sampled on a grid laid on each quadrilateral itself.

torchvision's ``MultiScaleRoIAlign`` pools an axis-aligned box. A quad near 45 degrees fills
about half of its enclosing box, and a thin diagonal one far less, so the box head sees mostly
background and the corners sit mid-edge of its window. :func:`quad_roi_align` lays the
``P x P`` output grid on the quad instead: the bilinear map from the unit square

    p(u, v) = (1-u)(1-v) c0 + u(1-v) c1 + u v c2 + (1-u) v c3

sends the square's corners to the quad's 4 corners ``c0..c3`` in the order given (canonical
polyboxes: clockwise on screen from the first corner, so the frame is reproducible), ``u``
along the first edge and ``v`` along the last. Bin ``(i, j)`` averages ``s x s`` samples at
``u = (j + (k + 0.5) / s) / P``, ``v = (i + (l + 0.5) / s) / P``, each read with
torchvision's ``roi_align`` bilinear rule (``aligned=False``: samples beyond ``[-1, size]``
weigh 0, coordinates clamped into the map, the last row/column repeated). On an
axis-aligned quad that is exactly torchvision's ``roi_align`` (``tests/test_quad_align.py``);
on a rotated rectangle it is the rotated RoIAlign of RoI Transformer / Oriented R-CNN; on a
general quad the grid follows its edges.

The FPN level of each quad comes from the quad's own area, with torchvision's
``LevelMapper`` rule (``floor(4 + log2(sqrt(area) / 224))`` clamped to the pooled levels), not
from its enclosing box's. All levels and RoIs run as one gather: the levels' maps are
flattened channels-last into one table, and each sample reads its 4 neighbours' rows by
index. The code is plain tensor arithmetic (``index_select``, no custom operator, no loop over
RoIs or levels), so it traces, exports to ONNX at any opset the model uses and runs on CPU and
CUDA alike, with autograd's gradient. Eager mode computes the same weighted sum of rows with
``embedding_bag`` (one fused kernel; the export records the plain gather).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops.poolers import _setup_scales

# torchvision's LevelMapper constants (canonical level 4 for 224 px objects).
CANONICAL_SCALE = 224
CANONICAL_LEVEL = 4
LEVEL_EPS = 1e-6


def unit_grid(pool: int, sampling: int, device: Any, dtype: torch.dtype) -> Tensor:
    """Sample positions ``[pool * sampling]`` along one side of the unit square: sample ``k``
    of bin ``p`` at ``(p + (k + 0.5) / sampling) / pool``."""
    n = pool * sampling
    return (torch.arange(n, device=device, dtype=dtype) + 0.5) / n


def quad_sample_points(corners: Tensor, pool: int, sampling: int) -> Tensor:
    """Sample points ``[R, P*s, P*s, 2]`` (x, y; rows along ``v``, columns along ``u``) of
    quads ``corners [R, 4, 2]`` under the bilinear map of the module docstring."""
    t = unit_grid(pool, sampling, corners.device, corners.dtype)
    u = t[None, None, :, None]  # [1, 1, n, 1]: columns
    v = t[None, :, None, None]  # [1, n, 1, 1]: rows
    c = corners[:, None, None]  # [R, 1, 1, 4, 2]
    return (
        (1 - u) * (1 - v) * c[..., 0, :]
        + u * (1 - v) * c[..., 1, :]
        + u * v * c[..., 2, :]
        + (1 - u) * v * c[..., 3, :]
    )


def _axis(pos: Tensor, size: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """torchvision's roi_align rule on one axis: ``(low, high, frac, inside)`` for sample
    positions ``pos`` in a map of ``size`` cells (a tensor broadcastable with ``pos``)."""
    inside = ((pos >= -1.0) & (pos <= size.to(pos.dtype))).to(pos.dtype)
    pos = pos.clamp_min(0.0)
    last = (size - 1).to(pos.dtype)
    low = pos.floor()
    at_end = low >= last
    low = torch.where(at_end, last.expand_as(low), low)
    pos = torch.where(at_end, low, pos)
    high = torch.where(at_end, low, low + 1)
    return low.long(), high.long(), pos - low, inside


def quad_levels(corners: Tensor, k_min: int, k_max: int) -> Tensor:
    """FPN level index ``[R]`` (0 = ``k_min``) of quads ``corners [R, 4, 2]`` from their own
    shoelace area, with torchvision's ``LevelMapper`` rule."""
    x, y = corners[..., 0], corners[..., 1]
    shoelace = 0.5 * (x * y.roll(-1, -1) - y * x.roll(-1, -1)).sum(-1).abs()
    size = shoelace.clamp_min(1e-6).sqrt()
    level = torch.floor(CANONICAL_LEVEL + torch.log2(size / CANONICAL_SCALE) + LEVEL_EPS)
    return (level.clamp(min=k_min, max=k_max) - k_min).to(torch.int64)


def quad_roi_align(
    features: list[Tensor],
    scales: list[float],
    image: Tensor,
    corners: Tensor,
    pool: int,
    sampling: int,
) -> Tensor:
    """Pooled features ``[R, C, P, P]`` of quads ``corners [R, 4, 2]`` (input pixels) in images
    ``image [R]`` (int64 index into the batch) from FPN maps ``features`` (each ``[B, C, H_l,
    W_l]``, ``scales[l]`` = map size / input size, powers of 2 from fine to coarse); see the
    module docstring. ``sampling >= 1`` samples per bin side, fixed (no adaptive count), so
    training and the export sample alike."""
    if sampling < 1:
        raise ValueError(f"quad_roi_align needs sampling >= 1, got {sampling}")
    num_r = corners.shape[0]
    num_c = features[0].shape[1]
    dtype = torch.float64 if features[0].dtype == torch.float64 else torch.float32
    corners = corners.to(dtype)
    k_min = int(round(-math.log2(scales[0])))
    k_max = int(round(-math.log2(scales[-1])))
    if len(features) > 1:
        level = quad_levels(corners, k_min, k_max)  # [R]
    else:
        level = torch.zeros(num_r, dtype=torch.int64, device=corners.device)
    # One channels-last table of every level's cells: row = start[l] + (b * H_l + y) * W_l + x.
    shapes = torch.stack([torch._shape_as_tensor(f)[-2:] for f in features]).to(corners.device)
    batch = torch._shape_as_tensor(features[0])[0].to(corners.device)
    counts = shapes[:, 0] * shapes[:, 1] * batch
    start = torch.cumsum(counts, 0) - counts  # [L]
    table = torch.cat([f.permute(0, 2, 3, 1).reshape(-1, num_c) for f in features]).to(dtype)
    scale = torch.pow(2.0, -(level + k_min).to(dtype))  # [R]: scales are 2^-k (docstring)
    height = shapes[level, 0][:, None, None]  # [R, 1, 1]
    width = shapes[level, 1][:, None, None]
    pts = quad_sample_points(corners * scale[:, None, None], pool, sampling)  # [R, n, n, 2]
    ylo, yhi, fy, in_y = _axis(pts[..., 1], height)
    xlo, xhi, fx, in_x = _axis(pts[..., 0], width)
    base = start[level] + image.to(torch.int64) * shapes[level, 0] * shapes[level, 1]
    base = base[:, None, None]
    rows = torch.stack(
        [base + ylo * width + xlo, base + ylo * width + xhi,
         base + yhi * width + xlo, base + yhi * width + xhi],
        -1,
    )  # fmt: skip
    inside = in_y * in_x
    weights = (
        torch.stack([(1 - fy) * (1 - fx), (1 - fy) * fx, fy * (1 - fx), fy * fx], -1)
        * inside[..., None]
    )  # [R, n, n, 4]
    n = pool * sampling
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        # The export: a gather of the 4 neighbours' rows, weighted and summed (standard
        # ONNX Gather / Mul / ReduceSum).
        values = table.index_select(0, rows.reshape(-1)).view(num_r, n, n, 4, num_c)
        sampled = (values * weights[..., None]).sum(3)  # [R, n, n, C]
    else:
        # Eager: the same weighted sum as one fused kernel, without the [R, n, n, 4, C]
        # intermediate: ~40x faster forward and ~7x forward + backward on one CPU thread.
        sampled = F.embedding_bag(
            rows.reshape(-1, 4), table, per_sample_weights=weights.reshape(-1, 4), mode="sum"
        ).view(num_r, n, n, num_c)
    binned = sampled.view(num_r, pool, sampling, pool, sampling, num_c).mean((2, 4))
    return binned.permute(0, 3, 1, 2).to(features[0].dtype)


class QuadRoIPool(nn.Module):
    """:func:`quad_roi_align` over the FPN maps named ``featmap_names`` of a feature dict,
    with the levels' scales inferred from the padded batch size as torchvision's
    ``MultiScaleRoIAlign`` infers them (and cached on the first call, as it does)."""

    def __init__(self, featmap_names: list[str], output_size: int, sampling_ratio: int) -> None:
        super().__init__()
        self.featmap_names = list(featmap_names)
        self.output_size = int(output_size)
        self.sampling_ratio = int(sampling_ratio)
        self.scales: list[float] | None = None

    def forward(
        self, features: dict[str, Tensor], image: Tensor, corners: Tensor, batch_hw: Any
    ) -> Tensor:
        x = [features[k] for k in self.featmap_names]
        if self.scales is None:
            self.scales, _ = _setup_scales(
                x, [(int(batch_hw[0]), int(batch_hw[1]))], CANONICAL_SCALE, CANONICAL_LEVEL
            )
        sampling = max(1, self.sampling_ratio)
        return quad_roi_align(x, self.scales, image, corners, self.output_size, sampling)
