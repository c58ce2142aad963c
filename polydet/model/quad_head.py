"""The quad-aligned second stage: each first-stage quad seen in its own frame.

The first stage (:class:`polydet.model.roi_heads.PolyRoIHeads`' box head) pools a proposal
through its axis-aligned box and regresses a class-specific quad. :class:`QuadHead` then pools
the FPN features on a grid laid on that quad itself (:mod:`polydet.model.quad_align`), and
from the aligned features it predicts:

- class scores ``[R, C]`` (at inference averaged with the first stage's, as Cascade R-CNN
  averages its stages);
- 8 class-agnostic corner deltas **in the quad's frame** (:class:`QuadFrameCoder`): each
  corner's offset from the reference quad's own corner, divided into the quad's two edge
  vectors, so every target is 0 when the object is the reference quad, whatever its angle
  (relative to an axis-aligned box, the corners of a 45-degree object sit mid-edge, targets
  around +-1.5);
- with ``heading_loss_weight > 0``, the heading: which corner of the reference quad's frame
  the annotation's first edge starts at (4 logits). The grid starts at the quad's first
  canonical corner, so the head sees the object turned into its frame.

This is RoI Transformer / Oriented R-CNN's rotated RoI stage for a general quadrilateral,
with plain tensor code throughout so that the export needs no custom operator.

Training (:func:`quad_stage_loss`): the first stage's sampled RoIs, decoded with their
class's deltas (the true class for positives, the predicted one otherwise), clipped and
made canonical, are matched again with the ground truths by polygon IoU (Cascade R-CNN's
re-matching), sampled (half positive at most) and trained with the first stage's losses:
cross-entropy, smooth-L1 against the closest of the 4 corner rolls of the ground truth (the
loss does not depend on corner order), ``1 - IoU`` of the decoded quads, and the heading's
cross-entropy relative to the chosen roll. The first stage's quads are detached, as a
cascade passes boxes forward without gradient.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.faster_rcnn import TwoMLPHead

from polydet.core.config import RoIConfig
from polydet.geometry import heading
from polydet.geometry.coder import DEFAULT_CLAMP
from polydet.geometry.ops import pairwise_iou
from polydet.geometry.polybox import area, from_corners, hull_xyxy, to_corners
from polydet.model.heading import heading_loss
from polydet.model.inference import clip_corners, clip_polyboxes, quad_iou
from polydet.model.quad_align import QuadRoIPool

# Frame-relative deltas are divided by this weight, as the box coder's (torchvision's 10).
QUAD_CODER_WEIGHT = 10.0
# Quads smaller than this (px^2) are not pooled: no frame to speak of.
MIN_QUAD_AREA = 1.0


def _frame(ref: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Edge vectors ``u, v [N, 2]`` and determinant ``[N]`` of reference quads ``ref [N, 4,
    2]``: ``u`` the mean of the first and third edges (corner 0 -> 1, 3 -> 2), ``v`` of the
    last and second (0 -> 3, 1 -> 2); for an axis-aligned box ``(w, 0)`` and ``(0, h)``."""
    u = 0.5 * ((ref[:, 1] - ref[:, 0]) + (ref[:, 2] - ref[:, 3]))
    v = 0.5 * ((ref[:, 3] - ref[:, 0]) + (ref[:, 2] - ref[:, 1]))
    det = u[:, 0] * v[:, 1] - u[:, 1] * v[:, 0]
    det = torch.where(det.abs() > 1e-6, det, torch.full_like(det, 1e-6))
    return u, v, det


class QuadFrameCoder:
    """Corner offsets expressed in a reference quad's frame: for reference corners ``r_i``
    and frame ``(u, v)`` (:func:`_frame`), the target of corner ``g_i`` is
    ``W * (a_i, b_i)`` with ``g_i - r_i = a_i u + b_i v``. On an axis-aligned reference it is
    the box coder's corner term, ``W (g - r) / (w, h)``."""

    def __init__(self, weight: float = QUAD_CODER_WEIGHT, clamp: float = DEFAULT_CLAMP) -> None:
        self.weight = float(weight)
        self.clamp = float(clamp)

    def encode(self, corners: Tensor, ref: Tensor) -> Tensor:
        """Targets ``[N, 8]`` of ``corners [N, 4, 2]`` relative to ``ref [N, 4, 2]``, corner
        ``i`` against reference corner ``i``."""
        u, v, det = _frame(ref)
        d = corners - ref  # [N, 4, 2]
        a = (v[:, None, 1] * d[..., 0] - v[:, None, 0] * d[..., 1]) / det[:, None]
        b = (u[:, None, 0] * d[..., 1] - u[:, None, 1] * d[..., 0]) / det[:, None]
        return torch.stack([a, b], -1).flatten(1) * self.weight

    def encode_rolls(self, corners: Tensor, ref: Tensor) -> Tensor:
        """``[N, 4, 8]``: :meth:`encode` of the 4 cyclic rolls (roll ``r`` pairs reference
        corner ``i`` with corner ``(i + r) % 4``)."""
        return torch.stack([self.encode(corners.roll(-r, dims=1), ref) for r in range(4)], 1)

    def decode(self, deltas: Tensor, ref: Tensor) -> Tensor:
        """Corners ``[N, 4, 2]`` (in the reference's corner order) of ``deltas [N, 8]``;
        every term clamped to ``clamp`` frame units, as the box coder clamps."""
        u, v, _ = _frame(ref)
        t = (deltas.view(-1, 4, 2) / self.weight).clamp(-self.clamp, self.clamp)
        return ref + t[..., :1] * u[:, None] + t[..., 1:] * v[:, None]


class QuadHead(nn.Module):
    """Quad-aligned pooling + ``TwoMLPHead`` + class scores, frame deltas and the heading."""

    def __init__(
        self, featmap_names: list[str], in_channels: int, num_classes: int, cfg: RoIConfig
    ) -> None:
        super().__init__()
        self.pool = QuadRoIPool(featmap_names, cfg.pool_size, cfg.sampling_ratio)
        self.head = TwoMLPHead(in_channels * cfg.pool_size**2, cfg.representation_size)
        self.cls_score = nn.Linear(cfg.representation_size, num_classes)
        self.quad_pred = nn.Linear(cfg.representation_size, 8)
        # A refinement starts as the identity (Detectron's box-regressor init).
        nn.init.normal_(self.quad_pred.weight, std=0.001)
        nn.init.zeros_(self.quad_pred.bias)
        self.heading = (
            nn.Linear(cfg.representation_size, 4) if cfg.heading_loss_weight > 0 else None
        )
        self.coder = QuadFrameCoder()

    def forward(
        self, features: dict[str, Tensor], image: Tensor, corners: Tensor, batch_hw: Any
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Class logits ``[R, C]``, frame deltas ``[R, 8]`` and heading logits ``[R, 4]`` (None
        without the heading) of quads ``corners [R, 4, 2]`` in images ``image [R]``."""
        feats = self.head(self.pool(features, image, corners, batch_hw))
        first = None if self.heading is None else self.heading(feats).float()
        return self.cls_score(feats).float(), self.quad_pred(feats).float(), first


# --- training -------------------------------------------------------------------------------


def _stage_inputs(
    samples: Any,
    logits: Tensor,
    deltas: Tensor,
    coder: Any,
    image_sizes: list[tuple[int, int]],
) -> tuple[list[Tensor], list[Tensor]]:
    """Per image: the first stage's decoded quads ``[R_i, 10]`` of its sampled RoIs
    (canonical, clipped; detached) and whether each can be pooled ``[R_i]``."""
    with torch.no_grad():
        labels = torch.cat(samples.labels)
        num_r, num_c = logits.shape[0], logits.shape[1]
        predicted = logits[:, 1:].argmax(1) + 1
        cls = torch.where(labels > 0, labels, predicted)
        own = deltas.detach().float().view(num_r, num_c, 10)[torch.arange(num_r), cls]
        boxes = torch.cat(samples.boxes).float()
        quads = coder.decode(own, boxes, check=False)
        image = torch.cat([torch.full((len(b),), i) for i, b in enumerate(samples.boxes)])
        sizes = torch.tensor(image_sizes, dtype=quads.dtype, device=quads.device)
        quads = clip_polyboxes(quads, sizes[image.to(quads.device)])
        ok = torch.isfinite(quads).all(1) & (area(quads) >= MIN_QUAD_AREA)
        counts = [len(b) for b in samples.boxes]
        return list(quads.split(counts)), list(ok.split(counts))


def _match(
    quads: list[Tensor], oks: list[Tensor], targets: list[dict[str, Tensor]], fg_iou: float
) -> list[tuple[Tensor, ...]]:
    """Per image ``(labels, matched gt [R, 10], first corner, quads, image index)`` of the
    poolable quads, each matched with the ground truth it overlaps most (polygon IoU; a
    positive from ``fg_iou``), as Cascade R-CNN re-matches each stage's boxes."""
    out = []
    for i, (q, ok, target) in enumerate(zip(quads, oks, targets)):
        q = q[ok]
        gt = target["polyboxes"].float()
        first = target.get("first_corner")
        if first is None:
            first = torch.full((gt.shape[0],), -1, dtype=torch.long, device=gt.device)
        if gt.shape[0] == 0 or q.shape[0] == 0:
            labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
            matched = torch.zeros_like(labels)
            gt = gt.new_zeros((1, 10))
            first = torch.full((1,), -1, dtype=torch.long, device=q.device)
        else:
            best, matched = pairwise_iou(q, gt).max(1)  # [R_i]
            labels = target["labels"].to(q.device)[matched]
            labels = torch.where(best >= fg_iou, labels, torch.zeros_like(labels))
        out.append(
            (labels, gt[matched], first.to(q.device)[matched], q, torch.full_like(labels, i))
        )
    return out


def _pass_loss(
    head: QuadHead,
    cfg: RoIConfig,
    features: dict[str, Tensor],
    batch: tuple[Tensor, ...],
    batch_hw: Any,
) -> tuple[dict[str, Tensor], Tensor]:
    """The quad stage's losses (summed over RoIs) on one pass's sampled ``batch = (labels,
    gt, first, quads, image)``, and the decoded quads ``[R, 4, 2]`` (frame order, detached)."""
    labels, gt, first, quads, image = batch
    ref = to_corners(quads)
    cls_logits, frame_deltas, head_logits = head(features, image, ref, batch_hw)
    pos = torch.where(labels > 0)[0]
    rolls = head.coder.encode_rolls(to_corners(gt[pos]), ref[pos])  # [Q, 4, 8]
    per_roll = F.smooth_l1_loss(
        frame_deltas[pos, None].expand_as(rolls), rolls, beta=1 / 9, reduction="none"
    ).sum(-1)
    roll = per_roll.argmin(1)
    loss_box = per_roll.gather(1, roll[:, None]).sum() * cfg.loss_weight
    decoded = head.coder.decode(frame_deltas, ref)
    if cfg.iou_loss_weight > 0:
        d = decoded[pos]
        pred = torch.cat([d.mean(1), (d - d.mean(1, keepdim=True)).flatten(1)], 1)
        loss_iou = (1.0 - quad_iou(pred, gt[pos], differentiable=True)).sum()
        loss_box = loss_box + loss_iou * cfg.iou_loss_weight
    losses = {
        "loss_quad_classifier": F.cross_entropy(cls_logits, labels, reduction="sum"),
        "loss_quad_polybox": loss_box,
    }
    if head_logits is not None:  # the first corner relative to the chosen roll (docstring)
        f = first[pos]
        target = torch.where(f >= 0, (f - roll) % 4, torch.full_like(f, -1))
        losses["loss_heading"] = heading_loss(head_logits[pos], target, 1) * cfg.heading_loss_weight
    return losses, decoded.detach()


def quad_stage_loss(
    roi_heads: nn.Module,
    features: dict[str, Tensor],
    samples: Any,
    logits: Tensor,
    deltas: Tensor,
    image_sizes: list[tuple[int, int]],
    targets: list[dict[str, Tensor]],
) -> dict[str, Tensor]:
    """``loss_quad_classifier``, ``loss_quad_polybox`` (smooth-L1 + IoU terms at the first
    stage's weights) and ``loss_heading`` of the quad stage (module docstring), each the mean
    over RoIs and over the ``refine_steps`` passes: pass ``p`` sees the quads pass ``p - 1``
    decoded (detached), as inference iterates, positives from polygon IoU ``fg_iou_thresh +
    0.1 p`` with the same object (Cascade R-CNN's rising thresholds)."""
    head: QuadHead = roi_heads.quad_head
    cfg = roi_heads.cfg
    quads, oks = _stage_inputs(samples, logits, deltas, roi_heads.coder, image_sizes)
    per_image = _match(quads, oks, targets, cfg.fg_iou_thresh)
    size = max(1, cfg.batch_size_per_image // 2)
    pos_masks, neg_masks = det_utils.BalancedPositiveNegativeSampler(size, 0.5)(
        [b[0] for b in per_image]
    )
    keep = [torch.where(p | n)[0] for p, n in zip(pos_masks, neg_masks)]
    batch = tuple(torch.cat([b[j][k] for b, k in zip(per_image, keep)]) for j in range(5))
    num = batch[0].numel()
    zero = logits.sum() * 0.0
    keys = ("loss_quad_classifier", "loss_quad_polybox", "loss_heading")
    if num == 0:
        return dict.fromkeys(keys, zero)
    batch_hw = max(h for h, _ in image_sizes), max(w for _, w in image_sizes)
    sizes = torch.tensor(image_sizes, dtype=torch.float32, device=batch[3].device)
    passes = max(1, cfg.refine_steps)
    total = dict.fromkeys(keys, zero)
    for p in range(passes):
        losses, decoded = _pass_loss(head, cfg, features, batch, batch_hw)
        for k, v in losses.items():
            total[k] = total[k] + v / (num * passes)
        if p + 1 == passes:
            break
        labels, gt, first, quads, image = batch
        with torch.no_grad():  # the next pass's quads: this pass's output, re-matched
            moved = from_corners(clip_corners(decoded, sizes[image]))
            ok = torch.isfinite(moved).all(1) & (area(moved) >= MIN_QUAD_AREA)
            quads = torch.where(ok[:, None], moved, quads)
            iou = quad_iou(quads, gt)
            thresh = min(cfg.fg_iou_thresh + 0.1 * (p + 1), 0.95)
            labels = torch.where(iou >= thresh, labels, torch.zeros_like(labels))
        batch = (labels, gt, first, quads, image)
    return total


# --- inference ------------------------------------------------------------------------------


def refine_quads(
    roi_heads: nn.Module,
    features: dict[str, Tensor],
    polyboxes: Tensor,
    scores: Tensor,
    labels: Tensor,
    found: Tensor,
    image_sizes: Tensor,
    batch_hw: Any,
) -> tuple[Tensor, Tensor, Tensor]:
    """One pass of the quad stage over detections ``polyboxes [B, K, 10]`` (canonical;
    ``labels [B, K]`` from 1, ``found [B, K]``): the refined quads (clipped, canonical), the
    mean of the two stages' probabilities of the detected class, and the first corner ``[B,
    K]`` (an index into the refined canonical ring; :data:`heading.UNKNOWN` without the
    heading). Rows that are not found, or too small to pool, keep their quad and score.
    Tensor code only: the exported graph runs it."""
    head: QuadHead = roi_heads.quad_head
    num_b, num_k = scores.shape[0], scores.shape[1]
    num_c = roi_heads.num_classes
    ok = (found.to(scores.dtype) * (area(polyboxes) >= MIN_QUAD_AREA).to(scores.dtype)) > 0.5
    hull = hull_xyxy(polyboxes)
    ok = ok & ((hull[..., 2:] - hull[..., :2]) > 1e-3).all(-1)
    unit = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]], device=scores.device)
    ref = torch.where(ok[..., None, None], to_corners(polyboxes), unit.to(polyboxes.dtype))
    ref = ref.reshape(-1, 4, 2)
    image = torch.arange(num_b, device=scores.device)[:, None].expand(-1, num_k).reshape(-1)
    logits, deltas, head_logits = head(features, image, ref, batch_hw)
    cls = labels.clamp(1, num_c - 1).reshape(-1, 1)
    probs = F.softmax(logits, dim=-1).gather(1, cls).view(num_b, num_k)
    corners = head.coder.decode(deltas, ref.to(deltas.dtype))  # [B*K, 4, 2], frame order
    sizes = image_sizes.to(corners.dtype)[:, None].expand(-1, num_k, 2).reshape(-1, 2)
    corners = clip_corners(corners, sizes)
    refined = from_corners(corners)  # canonical
    if head_logits is None:
        first = torch.full((num_b * num_k,), heading.UNKNOWN, dtype=torch.int64,
                           device=scores.device)  # fmt: skip
    else:  # the frame's first edge, found again on the canonical ring
        k = head_logits.argmax(1)
        first = heading.map_first_corner(corners, to_corners(refined), k)
    refined = refined.view(num_b, num_k, 10)
    first = first.view(num_b, num_k)
    unknown = torch.full_like(first, heading.UNKNOWN)
    return (
        torch.where(ok[..., None], refined, polyboxes),
        torch.where(ok, (scores + probs) / 2, scores),
        torch.where(ok, first, unknown),
    )
