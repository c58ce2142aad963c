"""Stage 1: the polybox region proposal network.

Per FPN level, torchvision's 3x3 conv then two 1x1 convs: objectness ``[B, A, H, W]`` and
polybox deltas ``[B, A*10, H, W]`` (the article's ``[B, 9, H, W]`` / ``[B, 9*10, H, W]``),
``A`` anchors per location from torchvision's ``AnchorGenerator``.

Design choices (see the module functions for details):

- **Matching on enclosing boxes.** An anchor is compared with a ground truth's enclosing
  axis-aligned box (``hull_xyxy``) by box IoU. Anchors and proposals are axis-aligned boxes
  and RoIAlign pools exactly that box, so the hull is the region a proposal has to cover; a
  polygon IoU would give a thin diagonal object no anchor above 0.7 (its best axis-aligned
  box covers mostly background) and leave it without positives. It is also what makes the
  model reduce to torchvision's Faster R-CNN on axis-aligned ground truths.
- **Low-quality matches need IoU > 0.** torchvision's ``Matcher`` marks, for each ground
  truth, its best anchors positive; for a ground truth that overlaps no anchor (degenerate or
  tiny) the "best" IoU is 0 and *every* anchor ties, so every anchor became positive.
  :class:`Matcher` skips ground truths whose best IoU is 0.
- **Proposals are hulls.** Only the pre-NMS top-n deltas per level are decoded (the same
  result as decoding all anchors first, for less work); the decoded polyboxes' enclosing
  boxes are clipped, filtered and box-NMS'd per level as torchvision does. Box NMS on hulls is
  enough here: proposals only choose where the second stage looks, and it is exact and fast.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import Conv2dNormActivation, box_iou

from polydet.core.config import RPNConfig
from polydet.geometry.coder import PolyBoxCoder, polybox_loss
from polydet.geometry.polybox import hull_xyxy
from polydet.model.inference import flatten_anchors, select_proposals


class Matcher(det_utils.Matcher):
    """torchvision's ``Matcher`` whose low-quality matches require an IoU above 0.

    ``matcher(quality [G, N]) -> matches [N]``: a ground-truth index, or
    ``BELOW_LOW_THRESHOLD`` (-1) / ``BETWEEN_THRESHOLDS`` (-2).
    """

    def set_low_quality_matches_(
        self, matches: Tensor, all_matches: Tensor, match_quality_matrix: Tensor
    ) -> None:
        highest = match_quality_matrix.max(dim=1).values  # [G]
        # A ground truth that overlaps nothing has no "best" prediction: every one ties at 0.
        is_best = (match_quality_matrix == highest[:, None]) & (highest[:, None] > 0)  # [G, N]
        preds = torch.where(is_best)[1]
        matches[preds] = all_matches[preds]


class PolyRPNHead(nn.Module):
    """3x3 conv + ReLU, then 1x1 convs for objectness and polybox deltas (shared by levels)."""

    def __init__(self, in_channels: int, num_anchors: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            Conv2dNormActivation(in_channels, in_channels, kernel_size=3, norm_layer=None)
        )
        self.cls_logits = nn.Conv2d(in_channels, num_anchors, kernel_size=1)
        self.polybox_pred = nn.Conv2d(in_channels, num_anchors * 10, kernel_size=1)
        for layer in self.modules():
            if isinstance(layer, nn.Conv2d):  # torchvision's RPN initialisation
                nn.init.normal_(layer.weight, std=0.01)
                if layer.bias is not None:
                    nn.init.constant_(layer.bias, 0.0)

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Per level: objectness ``[B, A, H, W]`` and deltas ``[B, A*10, H, W]``."""
        logits, deltas = [], []
        for feature in features:
            t = self.conv(feature)
            logits.append(self.cls_logits(t))
            deltas.append(self.polybox_pred(t))
        return logits, deltas


@dataclass
class RPNOutput:
    """Raw RPN outputs for a batch, flattened in anchor order.

    ``anchors [A, 4]`` xyxy in the model's input pixels (the same for every image of a padded
    batch), ``objectness [B, A]`` logits, ``deltas [B, A, 10]`` encoded polyboxes,
    ``num_anchors_per_level`` (sums to ``A``).
    """

    anchors: Tensor
    objectness: Tensor
    deltas: Tensor
    num_anchors_per_level: list[int]


@dataclass
class RPNMatch:
    """Anchor matching per image: ``labels [A]`` (1 positive, 0 negative, -1 ignored, float),
    ``matched_gt [A]`` (index of the best ground truth, 0 when there is none) and
    ``ious [A]`` (best IoU of each anchor with any ground truth's hull)."""

    labels: list[Tensor]
    matched_gt: list[Tensor]
    ious: list[Tensor]


@dataclass
class Proposals:
    """Per image after filtering and NMS: ``boxes [K, 4]`` (hulls, xyxy, clipped), ``scores
    [K]`` (objectness probabilities) and the decoded ``polyboxes [K, 10]`` they enclose (raw
    decoder output: corners in regressed order, not clipped)."""

    boxes: list[Tensor]
    scores: list[Tensor]
    polyboxes: list[Tensor]


class PolyRPN(nn.Module):
    """Anchors + :class:`PolyRPNHead` + matching, sampling, losses and proposal filtering."""

    def __init__(self, anchor_generator: AnchorGenerator, head: PolyRPNHead, cfg: RPNConfig):
        super().__init__()
        self.anchor_generator = anchor_generator
        self.head = head
        self.cfg = cfg
        self.coder = PolyBoxCoder(cfg.coder_weights)
        self.matcher = Matcher(cfg.fg_iou_thresh, cfg.bg_iou_thresh, allow_low_quality_matches=True)
        self.sampler = det_utils.BalancedPositiveNegativeSampler(
            cfg.batch_size_per_image, cfg.positive_fraction
        )

    def forward(self, images: ImageList, features: list[Tensor]) -> RPNOutput:
        """Head outputs and anchors for a batch of FPN features ``[B, C, H_l, W_l]``."""
        logits, deltas = self.head(features)
        # Anchors in float32 whatever autocast does to the features: only shapes are read.
        shapes = [f.new_empty((0, 0, *f.shape[-2:]), dtype=torch.float32) for f in features]
        anchors = self.anchor_generator(images, shapes)[0]  # identical for every image
        num_per_level = [int(o.shape[1] * o.shape[2] * o.shape[3]) for o in logits]
        objectness = torch.cat([flatten_anchors(o, 1) for o in logits], dim=1).squeeze(-1)
        flat_deltas = torch.cat([flatten_anchors(d, 10) for d in deltas], dim=1)
        return RPNOutput(anchors, objectness, flat_deltas, num_per_level)

    # --- training ----------------------------------------------------------------------

    def match(self, anchors: Tensor, gt_polyboxes: list[Tensor]) -> RPNMatch:
        """Match anchors ``[A, 4]`` with each image's ground truths ``[G, 10]`` (hull IoU)."""
        labels, matched, ious = [], [], []
        num_anchors = anchors.shape[0]
        for gt in gt_polyboxes:
            if gt.shape[0] == 0:  # background image: every anchor is a negative
                labels.append(anchors.new_zeros(num_anchors))
                matched.append(torch.zeros(num_anchors, dtype=torch.long, device=anchors.device))
                ious.append(anchors.new_zeros(num_anchors))
                continue
            quality = box_iou(hull_xyxy(gt.float()), anchors)  # [G, A]
            idx = self.matcher(quality)
            label = (idx >= 0).float()
            label[idx == self.matcher.BETWEEN_THRESHOLDS] = -1.0
            labels.append(label)
            matched.append(idx.clamp(min=0))
            ious.append(quality.max(dim=0).values)
        return RPNMatch(labels, matched, ious)

    def loss(
        self, out: RPNOutput, gt_polyboxes: list[Tensor]
    ) -> tuple[dict[str, Tensor], RPNMatch]:
        """``loss_rpn_objectness`` (BCE over sampled anchors) and ``loss_rpn_polybox``
        (smooth-L1, beta 1/9, summed over the 10 terms of sampled positives and divided by
        the number of sampled anchors, as torchvision normalises its box loss)."""
        match = self.match(out.anchors, gt_polyboxes)
        pos_masks, neg_masks = self.sampler(match.labels)
        pos = torch.where(torch.cat(pos_masks))[0]
        neg = torch.where(torch.cat(neg_masks))[0]
        sampled = torch.cat([pos, neg])
        labels = torch.cat(match.labels)
        objectness = out.objectness.flatten().float()
        loss_obj = F.binary_cross_entropy_with_logits(objectness[sampled], labels[sampled])

        # Encode only the sampled positives: global index = image * A + anchor.
        num_anchors = out.anchors.shape[0]
        image, anchor = pos // num_anchors, pos % num_anchors
        offsets = [0]
        for gt in gt_polyboxes[:-1]:
            offsets.append(offsets[-1] + gt.shape[0])
        offset = torch.tensor(offsets, device=pos.device)
        all_gt = torch.cat([gt.float() for gt in gt_polyboxes])  # [sum G, 10]
        gt_index = torch.cat(match.matched_gt)[pos] + offset[image]
        preds = out.deltas.reshape(-1, 10)[pos].float()
        loss_box, _ = polybox_loss(
            preds, all_gt[gt_index], out.anchors[anchor], self.coder, self.cfg.order_free
        )
        loss_box = loss_box * self.cfg.loss_weight / max(1, sampled.numel())
        return {"loss_rpn_objectness": loss_obj, "loss_rpn_polybox": loss_box}, match

    # --- proposals ---------------------------------------------------------------------

    def propose(
        self, out: RPNOutput, image_sizes: list[tuple[int, int]], training: bool
    ) -> Proposals:
        """Decode, clip, filter and NMS the proposals of each image
        (:func:`polydet.model.inference.select_proposals`, the code the exported model runs).

        ``training`` picks the ``*_train`` or ``*_test`` top-n settings (the losses always use
        the training ones, whatever mode the module is in).
        """
        cfg = self.cfg
        pre_n = cfg.pre_nms_top_n_train if training else cfg.pre_nms_top_n_test
        post_n = cfg.post_nms_top_n_train if training else cfg.post_nms_top_n_test
        sizes = torch.tensor(image_sizes, dtype=torch.float32, device=out.anchors.device)
        levels = list(
            zip(
                out.objectness.split(out.num_anchors_per_level, dim=1),
                out.deltas.split(out.num_anchors_per_level, dim=1),
                out.anchors.split(out.num_anchors_per_level, dim=0),
            )
        )
        boxes, scores, polyboxes, valid = select_proposals(
            levels, sizes, self.coder, pre_n, post_n, cfg.score_thresh, cfg.nms_thresh
        )
        return Proposals(
            [b[v] for b, v in zip(boxes, valid)],
            [s[v] for s, v in zip(scores, valid)],
            [p[v] for p, v in zip(polyboxes, valid)],
        )
