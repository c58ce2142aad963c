"""The heading head: a 4-way classifier of the first corner beside the polybox regression.

The box head's representation of a RoI (the ``TwoMLPHead`` output) goes through one linear
layer to 4 logits: which corner of the object's *canonical* ring the annotation started at
(:mod:`polydet.geometry.heading`). The polybox regression stays independent of corner order;
this head alone carries the heading. Training: cross-entropy over the positive RoIs whose
ground truth has a known first corner (``first_corner >= 0``: not a symmetric class, not an
old manifest), times ``model.roi.heading_loss_weight``. Inference: the head runs on each final
detection's hull (one more RoIAlign + box head pass over ``detections_per_img`` boxes, like a
refinement step) and its argmax indexes the detection's canonical ring.

Known limit: the canonical ring's start jumps by one corner when an edge turns through the
anti-diagonal (``polydet.geometry.polybox``), so the class of an object rotated near that
boundary flips; the head sees a slightly blurred boundary there.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polydet.model.inference import pool_rois

NUM_CORNERS = 4


class HeadingPredictor(nn.Module):
    """Logits ``[R, 4]`` of the first corner from box-head features ``[R, D]``."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        # Initialised on a fork of the global RNG: adding the head leaves the random stream
        # of everything built and sampled after it (and so every seeded run) as it was.
        with torch.random.fork_rng(devices=[]):
            self.first_corner = nn.Linear(in_channels, NUM_CORNERS)

    def forward(self, x: Tensor) -> Tensor:
        return self.first_corner(x.flatten(start_dim=1))


def heading_loss(logits: Tensor, first_corner: Tensor, num_sampled: int) -> Tensor:
    """Cross-entropy of ``logits [Q, 4]`` against ``first_corner [Q]`` (positives' ground
    truth, -1 = unknown, ignored), summed and divided by ``num_sampled`` (the sampled RoIs,
    as the box losses are); 0 (with a gradient path) when nothing is known."""
    if num_sampled == 0 or logits.shape[0] == 0:
        return logits.float().sum() * 0.0  # float32 under autocast too
    # ignore_index instead of a mask: no host sync (on CUDA) to ask whether any is known;
    # a sum over nothing is 0, with the gradient path kept.
    target = first_corner.long().clamp(min=-1)
    ce = F.cross_entropy(logits.float(), target, ignore_index=-1, reduction="sum")
    return ce / num_sampled


def predict_first_corner(
    roi_heads: nn.Module, features: dict[str, Tensor], hulls: Tensor, batch_hw: Any
) -> tuple[Tensor, Tensor]:
    """First corner ``[B, K]`` (int64) and its probability ``[B, K]`` for detections whose hulls
    are ``hulls [B, K, 4]`` (padding rows give values the caller masks): RoIAlign, the box
    head, the heading layer. Tensor code only, so the exported graph can run it."""
    num_b, num_k = hulls.shape[0], hulls.shape[1]
    # Degenerate padding rows would give RoIAlign an empty box: use a unit box there.
    unit = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=hulls.dtype, device=hulls.device)
    ok = ((hulls[..., 2:] - hulls[..., :2]) > 1e-3).all(-1)
    boxes = torch.where(ok[..., None], hulls, unit.expand_as(hulls))
    image = torch.arange(num_b, device=hulls.device, dtype=hulls.dtype)
    rois = torch.cat([image[:, None, None].expand(-1, num_k, 1), boxes], -1).reshape(-1, 5)
    x = pool_rois(roi_heads.box_roi_pool, features, rois, batch_hw)
    logits = roi_heads.heading(roi_heads.box_head(x)).float()
    probs = F.softmax(logits, dim=-1).view(num_b, num_k, NUM_CORNERS)
    conf, first = probs.max(-1)
    return first.to(torch.int64), conf
