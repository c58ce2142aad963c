"""On axis-aligned ground truths the polybox detector is torchvision's Faster R-CNN.

Both models share the backbone, the RPN conv and objectness layer, the box head and the
classifier. The regression layers predict centre offsets only (the size/corner rows are
zero), with the same weights on both sides: torchvision's ``dx, dy`` with weights 1 (RPN) and
10 (box head) equal polydet's ``t_xc, t_yc`` with the configured weights, so proposals are
the same shifted anchors. Ground truths are 32x32 squares and the anchors (16..128 px, ratios
1/4, 1, 4) are such that only same-size boxes reach the positive IoU thresholds; for those the
size terms of both encodings are 0, and the regression losses must agree exactly, as must the
objectness and classification losses (same matching, same sampler RNG draws), the proposals
and the final detections (polygon NMS = box NMS on rectangles).
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import tiny_cfg
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import MultiScaleRoIAlign

from polydet.geometry.polybox import from_xyxy, hull_xyxy
from polydet.model import PolyDetector, build_model

NUM_CLASSES = 3
SIZES = [[16], [32], [64], [128]]
RATIOS = [0.25, 1.0, 4.0]


def _models() -> tuple[PolyDetector, FasterRCNN]:
    cfg = tiny_cfg(  # the tiny model, with anchors and sampling as described above
        f"anchors.sizes={SIZES}",
        f"anchors.aspect_ratios={RATIOS}",
        "model.rpn.pre_nms_top_n_train=300",
        "model.rpn.post_nms_top_n_train=150",
        "model.rpn.pre_nms_top_n_test=200",
        "model.rpn.post_nms_top_n_test=100",
        "model.rpn.batch_size_per_image=64",
        "model.rpn.coder_weights=[1, 1, 2, 2, 2, 2, 2, 2, 2, 2]",
        # torchvision's loss: canonical corner order, weight 1, RoIAlign sampling ratio 2
        "model.rpn.order_free=false",
        "model.rpn.loss_weight=1.0",
        "model.roi.order_free=false",
        "model.roi.loss_weight=1.0",
        "model.roi.sampling_ratio=2",
        "model.roi.iou_loss_weight=0",  # torchvision has no IoU loss
        "model.roi.refine_steps=0",  # nor a second pass of the box head
        "model.roi.pool_size=7",
        "model.roi.representation_size=64",
        "model.roi.batch_size_per_image=48",
        "model.roi.coder_weights=[10, 10, 10, 10, 10, 10, 10, 10, 10, 10]",
        "model.roi.score_thresh=0.05",
    )
    torch.manual_seed(0)
    ours = build_model(cfg)
    rpn, roi = cfg.rpn, cfg.roi
    tv = FasterRCNN(
        copy.deepcopy(ours.backbone),
        num_classes=None,  # given by the predictor
        min_size=128,
        max_size=128,
        rpn_anchor_generator=AnchorGenerator(
            tuple(tuple(s) for s in SIZES), (tuple(RATIOS),) * len(SIZES)
        ),
        rpn_pre_nms_top_n_train=rpn.pre_nms_top_n_train,
        rpn_post_nms_top_n_train=rpn.post_nms_top_n_train,
        rpn_pre_nms_top_n_test=rpn.pre_nms_top_n_test,
        rpn_post_nms_top_n_test=rpn.post_nms_top_n_test,
        rpn_nms_thresh=rpn.nms_thresh,
        rpn_fg_iou_thresh=rpn.fg_iou_thresh,
        rpn_bg_iou_thresh=rpn.bg_iou_thresh,
        rpn_batch_size_per_image=rpn.batch_size_per_image,
        rpn_positive_fraction=rpn.positive_fraction,
        rpn_score_thresh=rpn.score_thresh,
        box_roi_pool=MultiScaleRoIAlign(["0", "1", "2"], output_size=7, sampling_ratio=2),
        box_head=TwoMLPHead(32 * 7 * 7, 64),
        box_predictor=FastRCNNPredictor(64, NUM_CLASSES),
        box_score_thresh=roi.score_thresh,
        box_nms_thresh=roi.nms_thresh,
        box_detections_per_img=roi.detections_per_img,
        box_fg_iou_thresh=roi.fg_iou_thresh,
        box_bg_iou_thresh=roi.bg_iou_thresh,
        box_batch_size_per_image=roi.batch_size_per_image,
        box_positive_fraction=roi.positive_fraction,
        bbox_reg_weights=(10.0, 10.0, 5.0, 5.0),
    )
    tv.rpn.head.conv.load_state_dict(ours.rpn.head.conv.state_dict())
    tv.rpn.head.cls_logits.load_state_dict(ours.rpn.head.cls_logits.state_dict())
    tv.roi_heads.box_head.load_state_dict(ours.roi_heads.box_head.state_dict())
    tv.roi_heads.box_predictor.cls_score.load_state_dict(
        ours.roi_heads.box_predictor.cls_score.state_dict()
    )
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        # RPN: per anchor, 10 polybox channels against 4 box channels; centre rows shared.
        _share_centre_rows(
            ours.rpn.head.polybox_pred, tv.rpn.head.bbox_pred, len(RATIOS), 0.01, 0.05, g
        )
        _share_centre_rows(
            ours.roi_heads.box_predictor.polybox_pred,
            tv.roi_heads.box_predictor.bbox_pred,
            NUM_CLASSES,
            0.01,
            0.05,
            g,
        )
    return ours, tv


def _share_centre_rows(
    ours: torch.nn.Module, tv: torch.nn.Module, groups: int, w_std: float, b_std: float, g
) -> None:
    """Zero both layers, then give polydet rows 10k, 10k+1 and torchvision rows 4k, 4k+1 the
    same random weights (the x and y centre terms of group k)."""
    ours.weight.zero_()
    ours.bias.zero_()
    tv.weight.zero_()
    tv.bias.zero_()
    for k in range(groups):
        w = torch.randn((2, *tv.weight.shape[1:]), generator=g) * w_std
        b = torch.randn(2, generator=g) * b_std
        ours.weight[10 * k : 10 * k + 2] = w
        ours.bias[10 * k : 10 * k + 2] = b
        tv.weight[4 * k : 4 * k + 2] = w
        tv.bias[4 * k : 4 * k + 2] = b


def _data() -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(2)
    images = [torch.rand((3, 128, 128), generator=g) for _ in range(2)]
    # Integer 32x32 squares well inside the image: exact in float32, and proposals that
    # overlap them are never clipped by the image border.
    boxes = [
        torch.tensor([[30.0, 34.0, 62.0, 66.0], [67.0, 61.0, 99.0, 93.0]]),
        torch.tensor([[45.0, 41.0, 77.0, 73.0]]),
    ]
    labels = [torch.tensor([1, 2]), torch.tensor([2])]
    return images, boxes, labels


@pytest.fixture(scope="module")
def pair() -> tuple[PolyDetector, FasterRCNN]:
    return _models()


def test_losses_match_torchvision(pair: tuple[PolyDetector, FasterRCNN]) -> None:
    ours, tv = pair
    images, boxes, labels = _data()
    ours.train()
    tv.train()
    # torchvision's transform draws a random training size (one RNG draw per image, the only
    # size being 128); evaluating it keeps both models on the same sampler RNG stream.
    tv.transform.eval()
    torch.manual_seed(123)
    got = ours.loss(
        images, [{"polyboxes": from_xyxy(b), "labels": lb} for b, lb in zip(boxes, labels)]
    )
    torch.manual_seed(123)
    ref = tv(images, [{"boxes": b, "labels": lb} for b, lb in zip(boxes, labels)])
    pairs = {
        "loss_rpn_objectness": "loss_objectness",
        "loss_rpn_polybox": "loss_rpn_box_reg",
        "loss_classifier": "loss_classifier",
        "loss_polybox": "loss_box_reg",
    }
    for ours_key, tv_key in pairs.items():
        a, b = got[ours_key].item(), ref[tv_key].item()
        assert b > 1e-4, f"{tv_key} is {b}: the comparison would be vacuous"
        assert a == pytest.approx(b, rel=1e-5, abs=1e-7), (ours_key, a, tv_key, b)


def test_proposals_and_detections_match_torchvision(
    pair: tuple[PolyDetector, FasterRCNN],
) -> None:
    ours, tv = pair
    images, _, _ = _data()
    ours.eval()
    tv.eval()
    with torch.no_grad():
        image_list, _ = tv.transform(images)
        features = tv.backbone(image_list.tensors)
        tv_boxes, _ = tv.rpn(image_list, features)
        batch, _, _ = ours.preprocess(images)
        assert torch.equal(batch.tensors, image_list.tensors)
        out = ours.rpn(batch, list(ours.backbone(batch.tensors).values()))
        props = ours.rpn.propose(out, batch.image_sizes, training=False)
        tv_dets = tv(images)
    ours_dets = ours.predict(images)
    for i in range(len(images)):
        assert props.boxes[i].shape == tv_boxes[i].shape
        assert props.boxes[i].shape[0] > 50
        torch.testing.assert_close(props.boxes[i], tv_boxes[i], rtol=0, atol=1e-4)
        # The proposals really moved off the anchors (centre deltas are not zero).
        assert not torch.equal(props.boxes[i], props.boxes[i].round())
        ours_det, tv_det = ours_dets[i], tv_dets[i]
        assert ours_det["scores"].numel() == tv_det["scores"].numel() > 10
        torch.testing.assert_close(ours_det["scores"], tv_det["scores"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours_det["labels"], tv_det["labels"])
        torch.testing.assert_close(
            hull_xyxy(ours_det["polyboxes"]), tv_det["boxes"], rtol=0, atol=1e-3
        )
