"""Stage 2: RoI features of the proposals, a two-layer MLP, class scores and polybox deltas.

torchvision's ``MultiScaleRoIAlign`` pools each proposal box (an axis-aligned hull, see
:mod:`polydet.model.rpn`) and its ``TwoMLPHead`` turns the pooled features into a vector;
:class:`PolyPredictor` outputs ``num_classes`` scores and ``num_classes * 10`` class-specific
polybox deltas. Proposals are matched with the ground truths' hulls (box IoU, like the RPN),
ground-truth hulls are added to the proposals during training as torchvision does, and the
losses are torchvision's: cross-entropy, and smooth-L1 (beta 1/9) over the 10 terms of the
positives' true class, divided by the number of sampled RoIs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.faster_rcnn import TwoMLPHead
from torchvision.ops import MultiScaleRoIAlign, box_iou

from polydet.core.config import RoIConfig
from polydet.geometry.coder import PolyBoxCoder, polybox_loss
from polydet.geometry.polybox import hull_xyxy
from polydet.model.heading import HeadingPredictor, heading_loss, predict_first_corner
from polydet.model.inference import (
    MIN_PROPOSAL_SIZE,
    clip_polyboxes,
    detect_batched,
    pool_rois,
    quad_iou,
)
from polydet.model.quad_head import QuadHead, quad_stage_loss


def polybox_iou_loss(deltas: Tensor, gt: Tensor, refs: Tensor, coder: PolyBoxCoder) -> Tensor:
    """Summed ``1 - IoU`` of the decoded ``deltas [Q, 10]`` (relative to ``refs [Q, 4]``) with
    the ground truths ``gt [Q, 10]``: the hull IoU of :func:`~polydet.model.inference.quad_iou`,
    differentiable almost everywhere. It scores the corner *set*, so it does not depend on
    which corner comes first, and it weighs a corner error by what it costs the overlap that
    AP75 thresholds, where smooth-L1 weighs all 10 terms alike."""
    if deltas.shape[0] == 0:
        return deltas.sum() * 0.0
    pred = coder.decode(deltas, refs, check=False)
    return (1.0 - quad_iou(pred, gt.to(pred.dtype), differentiable=True)).sum()


def rois_of(boxes: list[Tensor]) -> Tensor:
    """``[R, 5]`` (image index, x1, y1, x2, y2) of per-image boxes ``[R_i, 4]``."""
    image = torch.cat([torch.full_like(b[:, :1], i) for i, b in enumerate(boxes)])
    return torch.cat([image, torch.cat(boxes)], dim=1)


class PolyPredictor(nn.Module):
    """Linear class scores ``[R, num_classes]`` and class-specific deltas ``[R, num_classes*10]``."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.cls_score = nn.Linear(in_channels, num_classes)
        self.polybox_pred = nn.Linear(in_channels, num_classes * 10)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = x.flatten(start_dim=1)
        return self.cls_score(x), self.polybox_pred(x)


@dataclass
class RoISamples:
    """Sampled RoIs per image: ``boxes [R, 4]``, ``labels [R]`` (0 = background) and the
    matched ground truth ``gt_polyboxes [R, 10]`` (meaningful where ``labels > 0``)."""

    boxes: list[Tensor]
    labels: list[Tensor]
    gt_polyboxes: list[Tensor]
    gt_first_corner: list[Tensor] = field(default_factory=list)  # [R] heading, -1 unknown


@dataclass
class RoIOutput:
    """Head outputs for the sampled RoIs: ``class_logits [R, C]``, ``deltas [R, C*10]``, and the
    encoded ``targets [Q, 10]`` / class-specific ``pos_deltas [Q, 10]`` of the Q positives
    (in the order of ``torch.where(labels > 0)`` over all images)."""

    class_logits: Tensor
    deltas: Tensor
    targets: Tensor
    pos_deltas: Tensor


class PolyRoIHeads(nn.Module):
    """``MultiScaleRoIAlign`` + ``TwoMLPHead`` + :class:`PolyPredictor`, matching, losses,
    and the detection post-processing."""

    def __init__(
        self, featmap_names: list[str], in_channels: int, num_classes: int, cfg: RoIConfig
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_classes = num_classes
        self.box_roi_pool = MultiScaleRoIAlign(
            featmap_names, cfg.pool_size, sampling_ratio=cfg.sampling_ratio
        )
        self.box_head = TwoMLPHead(in_channels * cfg.pool_size**2, cfg.representation_size)
        self.box_predictor = PolyPredictor(cfg.representation_size, num_classes)
        self.coder = PolyBoxCoder(cfg.coder_weights)
        self.matcher = det_utils.Matcher(
            cfg.fg_iou_thresh, cfg.bg_iou_thresh, allow_low_quality_matches=False
        )
        self.sampler = det_utils.BalancedPositiveNegativeSampler(
            cfg.batch_size_per_image, cfg.positive_fraction
        )
        # The quad-aligned second stage (polydet/model/quad_head.py), which reads the heading
        # in each quad's frame; with the hull second stage the heading hook (issue 15,
        # polydet/model/heading.py) is a first-corner classifier on the box head.
        self.quad_head = (
            QuadHead(featmap_names, in_channels, num_classes, cfg)
            if cfg.second_stage == "quad"
            else None
        )
        self.heading = (
            HeadingPredictor(cfg.representation_size)
            if cfg.heading_loss_weight > 0 and self.quad_head is None
            else None
        )
        # Localisation quality: the IoU of each class's decoded polybox with the object, from
        # the box head's features (inference ranks by it, ``quality_power``; README).
        self.quality = (
            nn.Linear(cfg.representation_size, num_classes) if cfg.quality_loss_weight > 0 else None
        )

    def box_features(
        self, features: dict[str, Tensor], boxes: list[Tensor], image_sizes: list[tuple[int, int]]
    ) -> Tensor:
        """The box head's feature vectors ``[R, representation_size]`` of the boxes of all
        images (RoIAlign through :func:`~polydet.model.inference.pool_rois`)."""
        return self.roi_features(features, rois_of(boxes), image_sizes)

    def roi_features(
        self, features: dict[str, Tensor], rois: Tensor, image_sizes: list[tuple[int, int]]
    ) -> Tensor:
        """:meth:`box_features` of ``rois [R, 5]`` (image index, x1, y1, x2, y2)."""
        batch_hw = max(h for h, _ in image_sizes), max(w for _, w in image_sizes)
        return self.box_head(pool_rois(self.box_roi_pool, features, rois, batch_hw))

    def head(
        self, features: dict[str, Tensor], boxes: list[Tensor], image_sizes: list[tuple[int, int]]
    ) -> tuple[Tensor, Tensor]:
        """Class logits ``[R, C]`` and deltas ``[R, C*10]`` of the boxes of all images."""
        return self.box_predictor(self.box_features(features, boxes, image_sizes))

    # --- training ----------------------------------------------------------------------

    def sample(self, proposals: list[Tensor], targets: list[dict[str, Tensor]]) -> RoISamples:
        """Add the ground truths' hulls to the proposals, match (hull IoU) and sample."""
        boxes_all, labels_all, gt_all, first_all = [], [], [], []
        for boxes, target in zip(proposals, targets):
            first = target.get("first_corner")  # heading hook: -1 (unknown) when not given
            if first is None:
                first = torch.full((target["polyboxes"].shape[0],), -1, dtype=torch.long)
            first = first.to(boxes.device)
            gt = target["polyboxes"].float()
            hulls = hull_xyxy(gt)  # [G, 4]
            # A degenerate hull would be a zero-area RoI with NaN IoU and infinite targets.
            wh = hulls[:, 2:] - hulls[:, :2]
            ok = (wh >= MIN_PROPOSAL_SIZE).all(dim=1)
            boxes = torch.cat([boxes, hulls[ok]])
            if gt.shape[0] == 0:
                labels = torch.zeros(boxes.shape[0], dtype=torch.long, device=boxes.device)
                matched = torch.zeros_like(labels)
                gt = gt.new_zeros((1, 10))
                first = torch.full((1,), -1, dtype=torch.long, device=boxes.device)
            else:
                idx = self.matcher(box_iou(hulls, boxes))
                matched = idx.clamp(min=0)
                labels = target["labels"].to(boxes.device)[matched]
                labels[idx == self.matcher.BELOW_LOW_THRESHOLD] = 0
                labels[idx == self.matcher.BETWEEN_THRESHOLDS] = -1
            boxes_all.append(boxes)
            labels_all.append(labels)
            gt_all.append(gt[matched])
            first_all.append(first[matched])
        pos_masks, neg_masks = self.sampler(labels_all)
        out = RoISamples([], [], [])
        for boxes, labels, gt, pos, neg, first in zip(
            boxes_all, labels_all, gt_all, pos_masks, neg_masks, first_all
        ):
            keep = torch.where(pos | neg)[0]
            out.boxes.append(boxes[keep])
            out.labels.append(labels[keep])
            out.gt_polyboxes.append(gt[keep])
            out.gt_first_corner.append(first[keep])
        return out

    def loss(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_sizes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]],
    ) -> tuple[dict[str, Tensor], RoISamples, RoIOutput]:
        """``loss_classifier`` and ``loss_polybox`` of the sampled proposals (torchvision's
        ``fastrcnn_loss`` with 10 terms per box), with the samples and raw outputs."""
        samples = self.sample(proposals, targets)
        # As self.head, keeping the box head's features for the heading hook below.
        feats = self.box_features(features, samples.boxes, image_sizes)
        logits, deltas = self.box_predictor(feats)
        logits = logits.float()
        labels = torch.cat(samples.labels)
        pos = torch.where(labels > 0)[0]
        pos_deltas = deltas.view(deltas.shape[0], -1, 10)[pos, labels[pos]].float()  # [Q, 10]
        loss_box, targets_enc = polybox_loss(
            pos_deltas,
            torch.cat(samples.gt_polyboxes)[pos],
            torch.cat(samples.boxes)[pos],
            self.coder,
            self.cfg.order_free,
        )
        if labels.numel() == 0:  # no proposal and no ground truth in the whole batch
            zero = logits.sum() * 0.0 + deltas.sum() * 0.0
            losses = {
                "loss_classifier": zero,
                "loss_polybox": zero,
                "loss_polybox_iou": zero,
                "loss_refine": zero,
            }
        else:
            losses = {
                "loss_classifier": F.cross_entropy(logits, labels),
                "loss_polybox": loss_box * self.cfg.loss_weight / labels.numel(),
            }
            loss_iou = pos_deltas.sum() * 0.0  # off: no work, the same keys
            if self.cfg.iou_loss_weight > 0:
                gt = torch.cat(samples.gt_polyboxes)[pos]
                refs = torch.cat(samples.boxes)[pos]
                loss_iou = polybox_iou_loss(pos_deltas, gt, refs, self.coder)
            losses["loss_polybox_iou"] = loss_iou * self.cfg.iou_loss_weight / labels.numel()
            loss_refine = pos_deltas.sum() * 0.0  # off: no work, the same keys
            if self.cfg.refine_loss_weight > 0:
                loss_refine = self.refine_loss(features, samples, pos, pos_deltas, image_sizes)
            losses["loss_refine"] = loss_refine * self.cfg.refine_loss_weight / labels.numel()
        if self.quality is not None:
            loss_q = self.quality_loss(feats, samples, pos, labels, pos_deltas)
            losses["loss_quality"] = loss_q * self.cfg.quality_loss_weight / max(labels.numel(), 1)
        else:  # no quality branch: the same keys
            losses["loss_quality"] = feats.float().sum() * 0.0
        if self.quad_head is not None:  # the quad stage (with the heading, if any)
            losses.update(
                quad_stage_loss(self, features, samples, logits, deltas, image_sizes, targets)
            )
        elif self.heading is not None:  # heading hook (issue 15): cross-entropy of the positives
            first = torch.cat(samples.gt_first_corner)[pos]
            loss_h = heading_loss(self.heading(feats[pos]), first, labels.numel())
            losses["loss_heading"] = loss_h * self.cfg.heading_loss_weight
        if self.quad_head is None:  # no quad stage: the same keys
            zero = feats.float().sum() * 0.0
            losses["loss_quad_classifier"] = zero
            losses["loss_quad_polybox"] = zero
            losses.setdefault("loss_heading", zero)
        return losses, samples, RoIOutput(logits, deltas, targets_enc, pos_deltas)

    def quality_loss(
        self, feats: Tensor, samples: RoISamples, pos: Tensor, labels: Tensor, pos_deltas: Tensor
    ) -> Tensor:
        """Summed binary cross-entropy of the quality branch's logit for each positive's true
        class against the polygon IoU of its decoded polybox with its ground truth (a soft
        target in [0, 1], as GFL's quality focal loss without the focal term; IoU-Net regresses
        the same quantity). The target is a measurement of the regression, so no gradient
        flows into the deltas through it."""
        if pos.numel() == 0:
            return feats.float().sum() * 0.0
        with torch.no_grad():
            refs = torch.cat(samples.boxes)[pos]
            pred = self.coder.decode(pos_deltas.detach(), refs, check=False)
            gt = torch.cat(samples.gt_polyboxes)[pos].to(pred.dtype)
            iou = quad_iou(pred, gt).nan_to_num(0.0).clamp(0.0, 1.0)
        logit = self.quality(feats[pos]).float().gather(1, labels[pos, None])[:, 0]
        return F.binary_cross_entropy_with_logits(logit, iou, reduction="sum")

    def refine_loss(
        self,
        features: dict[str, Tensor],
        samples: RoISamples,
        pos: Tensor,
        pos_deltas: Tensor,
        image_sizes: list[tuple[int, int]],
    ) -> Tensor:
        """The box losses (smooth-L1 at ``loss_weight`` + IoU at ``iou_loss_weight``, summed
        over RoIs) of the box head run again on the hulls of its own decoded positives, each
        against the same ground truth: the second pass of ``refine_steps`` sees such hulls at
        inference, far tighter than the proposals the first pass learns from, and this trains
        it on them (Cascade R-CNN's point, with one shared head). The first pass's quads are
        detached, as a cascade's stages pass boxes forward without gradient."""
        if pos.numel() == 0:
            return pos_deltas.sum() * 0.0
        labels = torch.cat(samples.labels)[pos]
        gt = torch.cat(samples.gt_polyboxes)[pos].float()
        with torch.no_grad():
            pos_rois = rois_of(samples.boxes)[pos]  # the first pass's RoIs of the positives
            image = pos_rois[:, :1]
            quads = self.coder.decode(pos_deltas.detach(), pos_rois[:, 1:], check=False)
            sizes = torch.tensor(image_sizes, dtype=quads.dtype, device=quads.device)
            hull = hull_xyxy(clip_polyboxes(quads, sizes[image[:, 0].long()]))
            wh = hull[:, 2:] - hull[:, :2]
            ok = torch.where((wh >= MIN_PROPOSAL_SIZE).all(1) & torch.isfinite(hull).all(1))[0]
        if ok.numel() == 0:
            return pos_deltas.sum() * 0.0
        rois = torch.cat([image[ok], hull[ok]], dim=1)
        _, deltas = self.box_predictor(self.roi_features(features, rois, image_sizes))
        own = deltas.view(deltas.shape[0], -1, 10)[torch.arange(ok.numel()), labels[ok]].float()
        loss, _ = polybox_loss(own, gt[ok], hull[ok], self.coder, self.cfg.order_free)
        loss = loss * self.cfg.loss_weight
        if self.cfg.iou_loss_weight > 0:
            loss = (
                loss
                + polybox_iou_loss(own, gt[ok], hull[ok], self.coder) * self.cfg.iou_loss_weight
            )
        return loss

    # --- inference ---------------------------------------------------------------------

    def detect(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_sizes: list[tuple[int, int]],
    ) -> list[dict[str, Tensor]]:
        """Per image ``{"polyboxes" [K, 10], "scores" [K], "labels" [K]}`` in the model's
        input pixels: decode, score threshold, clip corners, drop tiny, polygon NMS per class,
        keep the ``detections_per_img`` best (:func:`polydet.model.inference.detect_batched`,
        the code the exported model runs, on the proposals padded to one tensor)."""
        device = proposals[0].device
        num_p = max(1, max(p.shape[0] for p in proposals))
        boxes = torch.zeros(len(proposals), num_p, 4, device=device)
        valid = torch.zeros(len(proposals), num_p, dtype=torch.bool, device=device)
        for i, p in enumerate(proposals):
            boxes[i, : p.shape[0]] = p
            valid[i, : p.shape[0]] = True
        sizes = torch.tensor(image_sizes, dtype=torch.float32, device=device)
        # RoIAlign's level scales are inferred from the largest image, as torchvision does.
        batch_hw = max(h for h, _ in image_sizes), max(w for _, w in image_sizes)
        poly, scores, labels, found, first = detect_batched(
            self, features, boxes, valid, sizes, batch_hw
        )
        out = [
            {"polyboxes": p[f], "scores": s[f], "labels": lab[f]}
            for p, s, lab, f in zip(poly, scores, labels, found)
        ]
        if first is not None:  # the quad stage's heading
            for det, fc, f in zip(out, first, found):
                det["first_corner"] = fc[f]
        elif self.heading is not None:  # heading hook (issue 15): first corner of each detection
            first, _ = predict_first_corner(self, features, hull_xyxy(poly), batch_hw)
            for det, fc, f in zip(out, first, found):
                det["first_corner"] = fc[f]
        return out
