"""The inference path of the detector as fixed-shape tensor code, shared by the eager
:meth:`PolyDetector.predict` and the exported models (:mod:`polydet.deploy.export`).

Everything here works on padded batches: each stage returns ``[B, K, ...]`` tensors plus a
``valid [B, K]`` mask instead of per-image lists, and uses no data-dependent Python (no
``.item()``, no loop over images or boxes, no numpy), so ``torch.jit.trace`` records it for
any batch size and image size and the ONNX exporter turns it into standard ONNX operators.
:meth:`PolyRPN.propose` and :meth:`PolyRoIHeads.detect` are thin wrappers that pad their
inputs, call :func:`select_proposals` / :func:`detect_batched`, and drop the padding; the
export graph calls the same two functions on the padded tensors directly.

- **Proposals** (:func:`select_proposals`): per FPN level the top-n objectness, decode, the
  decoded polyboxes' hulls clipped to the image, small and low-score ones masked, then one
  ``torchvision.ops.batched_nms`` over the whole batch (one group per image and level;
  masked boxes get score ``-inf`` so they never suppress anything) and the ``post_n`` best
  survivors per image (a top-k over the masked scores). In eager mode torchvision runs its
  C++ NMS; in the ONNX graph it becomes the standard ``NonMaxSuppression`` operator.
- **Detections** (:func:`detect_batched`): RoIAlign of the padded proposals (one ``[B*P, 5]``
  RoI tensor, :func:`pool_rois`), the box head, decode every (RoI, foreground class) pair,
  clip corners, canonicalise, mask low scores and tiny boxes, then **polygon NMS in tensor
  ops**: a suppression matrix ``[B, C-1, P, P]`` (per class; pairs that cannot reach the IoU
  threshold are rejected by a cheap bound, the others measured with the exact convex-quad
  kernel :func:`quad_iou`), and a greedy pass of exactly ``detections_per_img`` steps, each
  taking the best remaining candidate of every image and removing what it suppresses. That is
  greedy NMS (drop IoU > threshold, as torchvision) truncated to the detection cap, so it
  keeps exactly what NMS-then-cap keeps, ties going to the earlier candidate. With
  ``model.roi.refine_candidates`` the best candidates are refined by the box head before that
  NMS, and with ``vote_iou`` each kept quad becomes the weighted mean of the refined quads that
  overlap it (:func:`refine_then_nms`); without, the NMS survivors are refined after it
  (:func:`refine_detections`, :func:`renms`). With the localisation-quality branch
  (``model.roi.quality_loss_weight``) the scores that rank are :func:`ranked`'s.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.ops import boxes as box_ops
from torchvision.ops import roi_align
from torchvision.ops.poolers import MultiScaleRoIAlign, _setup_scales

from polydet.geometry.coder import PolyBoxCoder
from polydet.geometry.heading import map_first_corner
from polydet.geometry.ops import intersection_area, intersection_area_autograd
from polydet.geometry.polybox import (
    align_corners,
    area,
    canonicalize,
    from_corners,
    hull_xyxy,
    to_corners,
)
from polydet.model.roi_align import roi_align_separable, use_separable

# Proposals whose clipped hull is narrower than this (pixels) are dropped, as in torchvision.
MIN_PROPOSAL_SIZE = 1e-3
# Detections whose hull is narrower than this, or whose area is below its square, are dropped
# (torchvision drops boxes narrower than 1e-2 px).
MIN_DETECTION_SIZE = 1e-2


# --- geometry ------------------------------------------------------------------------------


def clip_polyboxes(polyboxes: Tensor, sizes: Tensor) -> Tensor:
    """Clamp each corner of polyboxes ``[N, 10]`` into its image, ``sizes [N, 2]`` = (h, w)
    (then re-canonicalise: clamping moves the centre and can move the first corner)."""
    return from_corners(clip_corners(to_corners(polyboxes), sizes))


def clip_corners(corners: Tensor, sizes: Tensor) -> Tensor:
    """Corners ``[N, 4, 2]`` clamped into their images, ``sizes [N, 2]`` = (h, w), in the
    order given (no re-canonicalisation)."""
    x = torch.minimum(corners[..., 0].clamp_min(0), sizes[:, 1:2])
    y = torch.minimum(corners[..., 1].clamp_min(0), sizes[:, 0:1])
    return torch.stack([x, y], dim=-1)


def _cross(u: Tensor, v: Tensor) -> Tensor:
    """z of ``u x v`` over the last dim (2)."""
    return u[..., 0] * v[..., 1] - u[..., 1] * v[..., 0]


def hull_ring(polyboxes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(ring [N, 4, 2]`` relative to ``centre [N, 2]``, ``area [N])`` of *canonical*
    polyboxes ``[N, 10]`` (what the detector emits): the corners are already in angle order
    around their mean, so the convex hull only needs a reflex corner collapsed onto its
    predecessor (hull semantics, as :func:`polydet.ops.pairwise_iou`)."""
    corners = to_corners(polyboxes)  # [N, 4, 2]
    centre = corners.mean(dim=-2)
    ring = corners - centre[:, None]
    turn = _cross(ring - ring.roll(1, 1), ring.roll(-1, 1) - ring)  # [N, 4]
    ring = torch.where((turn < 0)[..., None], ring.roll(1, 1), ring)
    return ring, centre, (0.5 * _cross(ring, ring.roll(-1, 1)).sum(-1)).clamp_min(0.0)


def quad_iou(a: Tensor, b: Tensor, differentiable: bool = False) -> Tensor:
    """IoU ``[P]`` of canonical polyboxes ``a[p]`` and ``b[p]`` (``[P, 10]``, pixels), on their
    convex hulls, computed in float64 relative to ``a``'s centre; returns ``a``'s dtype.
    The intersection is :func:`polydet.ops.intersection_area`, the tensor kernel behind
    :func:`polydet.ops.pairwise_iou` on CUDA (one implementation: plain tensor ops, which
    the tracer and the ONNX exporter record as they are); ``differentiable`` uses its
    out-of-place twin :func:`polydet.ops.intersection_area_autograd` (for losses)."""
    ring_a, centre_a, area_a = hull_ring(a.double())
    ring_b, centre_b, area_b = hull_ring(b.double())
    kernel = intersection_area_autograd if differentiable else intersection_area
    inter = kernel(ring_a, ring_b + (centre_b - centre_a)[:, None])
    inter = torch.minimum(inter, torch.minimum(area_a, area_b))
    union = area_a + area_b - inter
    iou = torch.where(union > 0, inter / union.clamp_min(1e-30), torch.zeros_like(inter))
    return iou.to(a.dtype)


def overlap_matrix(polyboxes: Tensor, candidate: Tensor, iou_threshold: float) -> Tensor:
    """``O [B, G, N, N]`` float: ``O[b, g, i, j]`` is the polygon IoU of candidates ``i != j``
    of group ``g`` (one class) in image ``b`` when both are ``candidate [B, G, N]`` and their
    IoU can exceed ``iou_threshold``, else 0 (also on the diagonal), for canonical
    ``polyboxes [B, G, N, 10]``.

    The polygon kernel runs only on pairs that pass a cheap bound: IoU <= (intersection of
    the enclosing boxes) / (larger area) and IoU <= (smaller area) / (larger area); the
    selected pairs come from ``nonzero`` (a data-dependent count, which ONNX handles).
    """
    hull = hull_xyxy(polyboxes)  # [B, G, N, 4]
    ar = area(polyboxes)  # shoelace <= hull area, so the bound stays an upper bound
    lo = torch.maximum(hull[..., :, None, :2], hull[..., None, :, :2])  # [B, G, N, N, 2]
    hi = torch.minimum(hull[..., :, None, 2:], hull[..., None, :, 2:])
    inter = (hi - lo).clamp_min(0).prod(-1)  # [B, G, N, N]
    big = torch.maximum(ar[..., :, None], ar[..., None, :])
    small = torch.minimum(ar[..., :, None], ar[..., None, :])
    n = polyboxes.shape[-2]
    upper = torch.ones(n, n, dtype=torch.bool, device=polyboxes.device).triu(1)
    # A little slack: the bound and the kernel round differently.
    slack = iou_threshold * (1 - 1e-4)
    maybe = (inter > slack * big) & (small > slack * big) & upper
    maybe = maybe & candidate[..., :, None] & candidate[..., None, :]
    # One dummy pair (0, 0, 0, 0), never a real one (diagonal), keeps the pair count above 0:
    # ONNX Runtime mis-shapes the gathers of an empty pair list.
    pairs = torch.cat([torch.nonzero(maybe), maybe.new_zeros((1, 4), dtype=torch.int64)])
    b, g, i, j = pairs.unbind(1)
    iou = quad_iou(polyboxes[b, g, i], polyboxes[b, g, j])
    iou = torch.where(maybe[b, g, i, j], iou, torch.zeros_like(iou))
    out = torch.zeros(maybe.shape, dtype=iou.dtype, device=iou.device)
    out = out.index_put((b, g, i, j), iou)
    return out + out.transpose(-1, -2)


def suppression_matrix(polyboxes: Tensor, candidate: Tensor, iou_threshold: float) -> Tensor:
    """``S [B, G, N, N]`` bool: ``S[b, g, i, j]`` when candidates ``i != j`` of group ``g``
    (one class) in image ``b`` are both ``candidate [B, G, N]`` and their polygon IoU is
    ``> iou_threshold`` (:func:`overlap_matrix`), for canonical ``polyboxes [B, G, N, 10]``."""
    return overlap_matrix(polyboxes, candidate, iou_threshold) > iou_threshold


def greedy_select(
    scores: Tensor, candidate: Tensor, suppress: Tensor, steps: int
) -> tuple[Tensor, Tensor]:
    """Greedy NMS truncated to ``steps`` picks, on ``scores [B, N]`` (candidates in
    ``(row, group)`` order: ``n = row * G + group``), ``candidate [B, N]`` and the per-group
    suppression matrix ``suppress [B, G, R, R]`` (N = R * G).

    Each step takes the best remaining candidate of every image (ties: lowest index, as a
    stable descending sort) and removes it and the candidates it suppresses. Returns the
    picked indices ``[B, steps]`` and whether each pick is real ``[B, steps]`` (an image with
    nothing left yields padding). Under tracing the loop is compiled with
    ``torch.jit.script`` (the same source), so the export holds one ``Loop`` node instead of
    ``steps`` copies of its body."""
    loop = _greedy_loop
    if torch.jit.is_tracing():
        global _GREEDY_SCRIPTED
        if _GREEDY_SCRIPTED is None:
            _GREEDY_SCRIPTED = torch.jit.script(_greedy_loop)
        loop = _GREEDY_SCRIPTED
    return loop(scores, candidate, suppress, torch.tensor(steps))


_GREEDY_SCRIPTED: Any = None


def _greedy_loop(
    scores: Tensor, candidate: Tensor, suppress: Tensor, steps: Tensor
) -> tuple[Tensor, Tensor]:
    # Masks are 0/1 floats: the ONNX exporter cannot type booleans inside a scripted loop.
    num_b, num_g, num_r = suppress.shape[0], suppress.shape[1], suppress.shape[2]
    flat = suppress.reshape(num_b, num_g * num_r, num_r).to(scores.dtype)  # row = g * R + r
    index = torch.arange(num_g * num_r, device=scores.device).unsqueeze(0)  # [1, N]
    groups = torch.arange(num_g, device=scores.device).view(1, 1, num_g)  # [1, 1, G]
    remaining = candidate.to(scores.dtype)
    picks: list[Tensor] = []
    found: list[Tensor] = []
    for _ in range(int(steps)):
        masked = torch.where(remaining > 0.5, scores, torch.full_like(scores, -1.0))
        best = masked.argmax(dim=1)  # [B]: first maximum
        ok = masked.gather(1, best.unsqueeze(1)).squeeze(1) > -0.5
        row = torch.div(best, num_g, rounding_mode="floor")
        group = best - row * num_g
        line = flat.gather(1, (group * num_r + row).view(-1, 1, 1).expand(-1, 1, num_r))
        same = (groups == group.view(-1, 1, 1)).to(scores.dtype)
        hits = line.squeeze(1).unsqueeze(2) * same  # [B, R, G]
        other = (index != best.unsqueeze(1)).to(scores.dtype)
        remaining = remaining * (1.0 - hits.reshape(num_b, -1)) * other
        picks.append(best)
        found.append(ok)
    return torch.stack(picks, 1), torch.stack(found, 1)


# --- RPN ------------------------------------------------------------------------------------


def flatten_anchors(x: Tensor, k: int) -> Tensor:
    """``[B, A*k, H, W]`` -> ``[B, H*W*A, k]``: the anchor order of ``AnchorGenerator``."""
    b, ak, h, w = x.shape
    return x.view(b, ak // k, k, h, w).permute(0, 3, 4, 1, 2).reshape(b, -1, k)


def rpn_levels(rpn: nn.Module, images: Tensor, features: list[Tensor]) -> list[tuple[Tensor, ...]]:
    """Per FPN level ``(objectness [B, A_l], deltas [B, A_l, 10], anchors [A_l, 4])`` for a
    padded batch ``images [B, 3, H, W]``: :meth:`PolyRPN.forward` without concatenating the
    levels, with every size taken from tensor shapes (traced, not baked in)."""
    logits, deltas = rpn.head(features)
    generator = rpn.anchor_generator
    image_size = images.shape[-2:]
    grid_sizes = [f.shape[-2:] for f in features]
    strides = [
        [
            torch.empty((), dtype=torch.int64, device=images.device).fill_(image_size[0] // g[0]),
            torch.empty((), dtype=torch.int64, device=images.device).fill_(image_size[1] // g[1]),
        ]
        for g in grid_sizes
    ]
    generator.set_cell_anchors(torch.float32, images.device)
    anchors = generator.grid_anchors(grid_sizes, strides)
    return [
        (flatten_anchors(o, 1).squeeze(-1), flatten_anchors(d, 10), a)
        for o, d, a in zip(logits, deltas, anchors)
    ]


def select_proposals(
    levels: list[tuple[Tensor, ...]],
    image_sizes: Tensor,
    coder: PolyBoxCoder,
    pre_n: int,
    post_n: int,
    score_thresh: float,
    nms_thresh: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Proposals of a batch from :func:`rpn_levels` output and ``image_sizes [B, 2]`` (h, w of
    each image inside the padded batch): ``boxes [B, P, 4]`` (clipped hulls, xyxy),
    ``scores [B, P]`` (objectness probabilities), ``polyboxes [B, P, 10]`` (raw decoded) and
    ``valid [B, P]``, best first, ``P = min(post_n, candidates)`` (module docstring)."""
    idx_l, obj_l, delta_l, anchor_l, level_l = [], [], [], [], []
    for level, (objectness, deltas, anchors) in enumerate(levels):
        objectness = objectness.detach().float()
        k = det_utils._topk_min(objectness, pre_n, 1)
        idx = objectness.topk(k, dim=1).indices  # [B, k]
        obj_l.append(objectness.gather(1, idx))
        delta_l.append(deltas.detach().gather(1, idx[..., None].expand(-1, -1, 10)).float())
        anchor_l.append(anchors[idx])
        level_l.append(torch.full_like(idx, level))
        idx_l.append(idx)
    scores = torch.cat(obj_l, 1).sigmoid()  # [B, K]
    deltas, anchors, level = torch.cat(delta_l, 1), torch.cat(anchor_l, 1), torch.cat(level_l, 1)
    num_b, num_k = scores.shape[0], scores.shape[1]
    # Anchors have positive sizes by construction: no check (its bool() would sync CUDA).
    flat = coder.decode(deltas.reshape(-1, 10), anchors.reshape(-1, 4), check=False)
    polyboxes = flat.view(num_b, -1, 10)
    hulls = hull_xyxy(polyboxes)  # [B, K, 4]
    sizes = image_sizes.to(hulls.dtype)
    x = torch.minimum(hulls[..., 0::2].clamp_min(0), sizes[:, None, 1:2])
    y = torch.minimum(hulls[..., 1::2].clamp_min(0), sizes[:, None, 0:1])
    boxes = torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], -1)
    wh = boxes[..., 2:] - boxes[..., :2]
    valid = (wh >= MIN_PROPOSAL_SIZE).all(-1) & (scores >= score_thresh)
    image = torch.arange(num_b, device=scores.device)[:, None].expand(-1, num_k)
    group = image * len(levels) + level
    nms_scores = torch.where(valid, scores, torch.full_like(scores, -float("inf")))
    keep = box_ops.batched_nms(
        boxes.reshape(-1, 4), nms_scores.reshape(-1), group.reshape(-1), nms_thresh
    )
    kept = torch.zeros(num_b * num_k, dtype=torch.bool, device=scores.device)
    kept = kept.index_put((keep,), torch.ones_like(keep, dtype=torch.bool))
    kept = kept.view(num_b, num_k) & valid
    masked = torch.where(kept, scores, torch.full_like(scores, -1.0))
    top_scores, top = masked.topk(det_utils._topk_min(masked, post_n, 1), dim=1)
    out_valid = top_scores > -0.5
    return (
        boxes.gather(1, top[..., None].expand(-1, -1, 4)),
        torch.where(out_valid, top_scores, torch.zeros_like(top_scores)),
        polyboxes.gather(1, top[..., None].expand(-1, -1, 10)),
        out_valid,
    )


# --- RoI heads ------------------------------------------------------------------------------


def pool_rois(
    pooler: MultiScaleRoIAlign, features: dict[str, Tensor], rois: Tensor, batch_hw: Any
) -> Tensor:
    """``MultiScaleRoIAlign`` of ``rois [R, 5]`` (image index, x1, y1, x2, y2) given as one
    tensor, so the number of images is not fixed by a Python list (torchvision's forward
    takes one box tensor per image). ``batch_hw``: the padded batch's (H, W)."""
    x = [features[k] for k in pooler.featmap_names]
    if pooler.scales is None or pooler.map_levels is None:
        pooler.scales, pooler.map_levels = _setup_scales(
            x, [(int(batch_hw[0]), int(batch_hw[1]))], pooler.canonical_scale,
            pooler.canonical_level,
        )  # fmt: skip
    size, ratio = pooler.output_size, pooler.sampling_ratio

    def align(feature: Tensor, level_rois: Tensor, scale: float) -> Tensor:
        if use_separable(feature, ratio):  # training on CPU: ~3x cheaper backward
            return roi_align_separable(feature, level_rois, size, scale, ratio)
        return roi_align(feature, level_rois, size, spatial_scale=scale, sampling_ratio=ratio)

    if len(x) == 1:
        return align(x[0], rois, pooler.scales[0])
    levels = pooler.map_levels([rois[:, 1:]])
    result = rois.new_zeros((rois.shape[0], x[0].shape[1], *size), dtype=x[0].dtype)
    for level, (feature, scale) in enumerate(zip(x, pooler.scales)):
        idx = torch.where(levels == level)[0]
        pooled = align(feature, rois[idx], scale)
        result = result.index_put((idx,), pooled.to(result.dtype))
    return result


def box_head_on(
    roi_heads: nn.Module, features: dict[str, Tensor], boxes: Tensor, valid: Tensor, batch_hw: Any
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """RoIAlign + box head on padded boxes ``[B, N, 4]`` (``valid [B, N]``): the boxes used
    (padding rows replaced by a harmless unit box, whose results the callers mask), class
    logits ``[B*N, C]``, deltas ``[B*N, C*10]`` and the quality branch's predicted IoUs
    ``[B*N, C]`` (None without the branch, ``model.roi.quality_loss_weight`` 0)."""
    num_b, num_n = boxes.shape[0], boxes.shape[1]
    unit = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=boxes.dtype, device=boxes.device)
    boxes = torch.where(valid[..., None], boxes, unit.expand_as(boxes))
    image = torch.arange(num_b, device=boxes.device, dtype=boxes.dtype)
    image = image[:, None, None].expand(-1, num_n, 1)
    rois = torch.cat([image, boxes], -1).reshape(-1, 5)
    x = pool_rois(roi_heads.box_roi_pool, features, rois, batch_hw)
    feats = roi_heads.box_head(x)
    logits, deltas = roi_heads.box_predictor(feats)
    quality = None if roi_heads.quality is None else roi_heads.quality(feats).float().sigmoid()
    return boxes, logits, deltas, quality


def ranked(probs: Tensor, quality: Tensor | None, power: float) -> Tensor:
    """Detection scores: the class probabilities ``probs``, or with the localisation-quality
    branch ``probs^(1 - power) * quality^power`` (``quality``: predicted IoU with the object,
    same shape), so that of two detections of one object the better-fitting one ranks first
    and AP at high IoU thresholds counts it (IoU-Net's IoU-guided ranking; GFL's joint
    score)."""
    if quality is None or power <= 0:
        return probs
    return probs.clamp_min(0.0).pow(1.0 - power) * quality.clamp(0.0, 1.0).pow(power)


def detect_batched(
    roi_heads: nn.Module,
    features: dict[str, Tensor],
    boxes: Tensor,
    valid: Tensor,
    image_sizes: Tensor,
    batch_hw: Any,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """Detections of padded proposals ``boxes [B, P, 4]`` / ``valid [B, P]`` in images of
    ``image_sizes [B, 2]`` (h, w): ``polyboxes [B, K, 10]`` (canonical, clipped, the model's
    input pixels), ``scores [B, K]``, ``labels [B, K]`` int64, ``found [B, K]``, best first,
    ``K = detections_per_img``; rows past an image's detections are zeros. The last item is
    the quad stage's first corner ``[B, K]`` (None without the quad stage's heading)."""
    cfg, num_c = roi_heads.cfg, roi_heads.num_classes
    num_b, num_p = boxes.shape[0], boxes.shape[1]
    boxes, logits, deltas, quality = box_head_on(roi_heads, features, boxes, valid, batch_hw)
    probs = F.softmax(logits.float(), dim=-1).view(num_b, num_p, num_c)
    decoded = roi_heads.coder.decode(deltas.float(), boxes.reshape(-1, 4), check=False)
    decoded = decoded.view(num_b, num_p, num_c, 10)[:, :, 1:]  # [B, P, G, 10], G = C - 1
    scores = probs[:, :, 1:]  # [B, P, G]
    sizes = image_sizes.to(decoded.dtype)[:, None, None].expand(-1, num_p, num_c - 1, 2)
    poly = clip_polyboxes(decoded.reshape(-1, 10), sizes.reshape(-1, 2))
    poly = poly.view(num_b, num_p, num_c - 1, 10)
    hull = hull_xyxy(poly)
    wh = hull[..., 2:] - hull[..., :2]
    big = (wh >= MIN_DETECTION_SIZE).all(-1) & (area(poly) >= MIN_DETECTION_SIZE**2)
    candidate = valid[..., None] & (scores > cfg.score_thresh) & big  # [B, P, G]
    if quality is not None:
        quality = quality.view(num_b, num_p, num_c)[:, :, 1:]
    flat_scores = ranked(scores, quality, cfg.quality_power).reshape(num_b, -1)
    first = None
    if cfg.refine_steps and cfg.refine_candidates:
        out_poly, out_scores, label, found, first = refine_then_nms(
            roi_heads, features, poly, scores, candidate, image_sizes, batch_hw
        )
    else:
        suppress = suppression_matrix(
            poly.transpose(1, 2), candidate.transpose(1, 2), cfg.nms_thresh
        )  # [B, G, P, P]
        picks, found = greedy_select(
            flat_scores, candidate.reshape(num_b, -1), suppress, cfg.detections_per_img
        )
        label = (picks % (num_c - 1) + 1).to(torch.int64)
        out_poly = poly.reshape(num_b, -1, 10).gather(1, picks[..., None].expand(-1, -1, 10))
        # Refinement averages probabilities (then ranks them); else the ranked scores.
        out_scores = (scores.reshape(num_b, -1) if cfg.refine_steps else flat_scores).gather(
            1, picks
        )
        for _ in range(cfg.refine_steps):
            out_poly, out_scores, out_quality, first = refine_step(
                roi_heads, features, out_poly, out_scores, label, found, image_sizes, batch_hw
            )
        if cfg.refine_steps:
            out_scores = ranked(out_scores, out_quality, cfg.quality_power)
            out_poly, out_scores, label, found, first = renms(
                out_poly, out_scores, label, found, cfg.nms_thresh, first
            )
    zero = torch.zeros_like(out_scores)
    if first is not None:
        first = torch.where(found, first, torch.full_like(first, -1))
    return (
        torch.where(found[..., None], out_poly, torch.zeros_like(out_poly)),
        torch.where(found, out_scores, zero),
        torch.where(found, label, torch.zeros_like(label)),
        found,
        first,
    )


def refine_step(
    roi_heads: nn.Module,
    features: dict[str, Tensor],
    polyboxes: Tensor,
    scores: Tensor,
    labels: Tensor,
    found: Tensor,
    image_sizes: Tensor,
    batch_hw: Any,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """One pass of the second stage over detections ``[B, K, ...]``: the quad stage
    (:func:`polydet.model.quad_head.refine_quads`) when the model has one, else the box head
    on the hulls (:func:`refine_detections`). Returns the quads, the scores, the quality
    branch's IoUs (hull stage; else None) and the quad stage's first corners (None without
    its heading)."""
    if roi_heads.quad_head is None:
        poly, scores, quality = refine_detections(
            roi_heads, features, polyboxes, scores, labels, found, image_sizes, batch_hw
        )
        return poly, scores, quality, None
    from polydet.model.quad_head import refine_quads

    poly, scores, first = refine_quads(
        roi_heads, features, polyboxes, scores, labels, found, image_sizes, batch_hw
    )
    return poly, scores, None, (first if roi_heads.quad_head.heading is not None else None)


def refine_detections(
    roi_heads: nn.Module,
    features: dict[str, Tensor],
    polyboxes: Tensor,
    scores: Tensor,
    labels: Tensor,
    found: Tensor,
    image_sizes: Tensor,
    batch_hw: Any,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """One step of iterative refinement of the detections ``polyboxes [B, K, 10]`` (labels
    ``[B, K]`` from 1, ``found [B, K]``): the box head runs again on each detection's hull, its
    deltas for the detected class give the new polybox (clipped, canonical), and the score
    becomes the mean of the two passes' probabilities of that class (as Cascade R-CNN averages
    its stages); with the quality branch, also its predicted IoU ``[B, K]`` of each new polybox
    (else None), for :func:`ranked`. The head was trained on hulls of proposals and ground truths, and a
    detection's hull is a far better RoI than the proposal it came from, so the second pass
    corrects what the first got wrong (``model.roi.refine_steps``; measured in the README)."""
    num_b, num_k = scores.shape[0], scores.shape[1]
    num_c = roi_heads.num_classes
    hull = hull_xyxy(polyboxes)
    wh = hull[..., 2:] - hull[..., :2]
    # As floats: ``found`` comes out of the scripted greedy loop, where the ONNX exporter
    # cannot tell it is boolean.
    ok = (found.to(hull.dtype) * (wh >= MIN_PROPOSAL_SIZE).all(-1).to(hull.dtype)) > 0.5
    boxes, logits, deltas, quality = box_head_on(roi_heads, features, hull, ok, batch_hw)
    cls = labels.clamp(1, num_c - 1).reshape(-1, 1)  # padding rows: any class, masked below
    probs = F.softmax(logits.float(), dim=-1).gather(1, cls).view(num_b, num_k)
    if quality is not None:  # rows left as they were keep their score (as probs, below)
        quality = quality.gather(1, cls).view(num_b, num_k)
        quality = torch.where(ok, quality, torch.ones_like(quality))
    own = deltas.float().view(-1, num_c, 10).gather(1, cls[..., None].expand(-1, 1, 10))
    decoded = roi_heads.coder.decode(own[:, 0], boxes.reshape(-1, 4), check=False)
    sizes = image_sizes.to(decoded.dtype)[:, None].expand(-1, num_k, 2).reshape(-1, 2)
    refined = clip_polyboxes(decoded, sizes).view(num_b, num_k, 10)
    return (
        torch.where(ok[..., None], refined, polyboxes),
        torch.where(ok, (scores + probs) / 2, scores),
        quality,
    )


def refine_then_nms(
    roi_heads: nn.Module,
    features: dict[str, Tensor],
    poly: Tensor,
    scores: Tensor,
    candidate: Tensor,
    image_sizes: Tensor,
    batch_hw: Any,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Detections from the first pass's (RoI, class) candidates ``poly [B, P, G, 10]``,
    ``scores [B, P, G]``, ``candidate [B, P, G]``, refined before NMS
    (``model.roi.refine_candidates``): the best ``refine_candidates`` of each image go through
    the box head again (``refine_steps`` times, :func:`refine_detections`), polygon NMS per
    class keeps ``detections_per_img`` of the refined quads, and with ``vote_iou`` each kept
    quad becomes the mean of the refined quads of its class that overlap it by at least that
    IoU (itself included), weighted by score x IoU, corners aligned (box voting, as in
    Gidaris & Komodakis' multi-region CNN and MMDetection's score voting). Refining first
    means that NMS and the vote see the better quads; measured in the README."""
    cfg = roi_heads.cfg
    num_b, num_g = scores.shape[0], scores.shape[2]
    flat = torch.where(candidate, scores, torch.full_like(scores, -1.0)).reshape(num_b, -1)
    num_m = min(cfg.refine_candidates, flat.shape[1])
    top, index = flat.topk(num_m, dim=1)  # [B, M], best first
    ok = top > -0.5
    labels = (index % num_g + 1).to(torch.int64)
    quads = poly.reshape(num_b, -1, 10).gather(1, index[..., None].expand(-1, -1, 10))
    top = top.clamp_min(0.0)
    quality = first = None
    for _ in range(cfg.refine_steps):
        quads, top, quality, first = refine_step(
            roi_heads, features, quads, top, labels, ok, image_sizes, batch_hw
        )
    top = ranked(top, quality, cfg.quality_power)
    same = labels[:, :, None] == labels[:, None, :]  # [B, M, M]
    vote = cfg.vote_iou > 0
    low = min(cfg.nms_thresh, cfg.vote_iou) if vote else cfg.nms_thresh
    overlap = overlap_matrix(quads[:, None], ok[:, None], low)[:, 0] * same  # [B, M, M]
    suppress = (overlap > cfg.nms_thresh)[:, None]  # [B, 1, M, M]
    picks, found = greedy_select(top, ok, suppress, cfg.detections_per_img)
    found = found.to(top.dtype) > 0.5  # typed boolean for the ONNX exporter (renms)
    kept = quads.gather(1, picks[..., None].expand(-1, -1, 10))  # [B, K, 10]
    if first is not None:
        first = first.gather(1, picks)
    picked = kept
    if vote:
        rows = overlap.gather(1, picks[..., None].expand(-1, -1, num_m))  # [B, K, M]
        itself = picks[..., None] == torch.arange(num_m, device=picks.device)  # [B, K, M]
        rows = rows + itself.to(rows.dtype)  # IoU 1 with itself
        # Only candidates have overlaps (overlap_matrix), so padding rows never vote.
        weight = torch.where(rows >= cfg.vote_iou, rows * top[:, None], torch.zeros_like(rows))
        corners = align_corners(to_corners(kept)[:, :, None], to_corners(quads)[:, None])
        total = weight.sum(-1).clamp_min(1e-12)[..., None, None]  # [B, K, 1, 1]
        mean = (corners * weight[..., None, None]).sum(2) / total  # [B, K, 4, 2]
        kept = torch.where(found[..., None], from_corners(mean), kept)
        if first is not None:  # the pick's first edge, found again on the voted quad
            first = map_first_corner(to_corners(picked), to_corners(kept), first)
    return kept, top.gather(1, picks), labels.gather(1, picks), found, first


def renms(
    polyboxes: Tensor,
    scores: Tensor,
    labels: Tensor,
    found: Tensor,
    iou_threshold: float,
    first: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """Polygon NMS per class again over detections ``[B, K, ...]`` whose quads and scores
    changed after the first NMS (:func:`refine_detections` can move two neighbours onto the
    same object); returns them best first, the same shapes, dropped rows as padding."""
    num_k = scores.shape[1]
    found = found.to(scores.dtype) > 0.5  # typed boolean for the ONNX exporter (see above)
    same = labels[:, :, None] == labels[:, None, :]  # [B, K, K]
    suppress = suppression_matrix(polyboxes[:, None], found[:, None], iou_threshold)
    suppress = suppress & same[:, None]
    picks, kept = greedy_select(scores, found, suppress, num_k)
    poly = polyboxes.gather(1, picks[..., None].expand(-1, -1, 10))
    first = None if first is None else first.gather(1, picks)
    return poly, scores.gather(1, picks), labels.gather(1, picks), kept, first


def to_input_pixels(polyboxes: Tensor, sizes: Tensor, originals: Tensor) -> Tensor:
    """Scale polyboxes ``[B, K, 10]`` from the resized images (``sizes [B, 2]``, h, w) to the
    input images (``originals [B, 2]``) and re-canonicalise; unchanged where the sizes match
    (as :func:`polydet.polybox.scale`, which is skipped there)."""
    ratio = originals.to(polyboxes.dtype) / sizes.to(polyboxes.dtype)  # [B, 2] (h, w)
    factor = ratio.flip(-1).repeat(1, 5)[:, None]  # [B, 1, 10]: (sx, sy) * 5
    same = (sizes == originals).all(-1)[:, None, None]
    return torch.where(same, polyboxes, canonicalize(polyboxes * factor))
