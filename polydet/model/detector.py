"""The two-stage polybox detector: transform -> backbone -> RPN -> RoI heads.

:class:`PolyDetector` has explicit entry points whose behaviour does not depend on
``model.training``:

- :meth:`PolyDetector.loss` always runs the training path (training top-n proposals,
  matching and sampling), so it also gives validation losses in eval mode; BatchNorm follows
  the module's mode as usual (running statistics in eval mode, untouched by ``loss``).
- :meth:`PolyDetector.predict` always runs the inference path (test top-n, post-processing);
  call ``model.eval()`` first so that BatchNorm uses its running statistics.
- :meth:`PolyDetector.inspect` returns the intermediate tensors for the debug report.

``forward(images, targets)`` is :meth:`loss`, so that ``DistributedDataParallel`` and hooks
wrap the training step. Images are resized and normalised with torchvision's
``GeneralizedRCNNTransform`` parts; polyboxes are scaled by the same factors (x and y terms
separately, then re-canonicalised) and predictions are scaled back to the input image.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.transform import (
    GeneralizedRCNNTransform,
    _resize_image_and_masks,
)

from polydet.core.config import ConfigError, ModelConfig, check_model_config, plain
from polydet.core.errors import ModelError
from polydet.geometry import heading
from polydet.geometry.coder import polybox_loss
from polydet.geometry.polybox import canonicalize, scale
from polydet.model.backbone import build_backbone
from polydet.model.roi_heads import PolyRoIHeads
from polydet.model.rpn import PolyRPN, PolyRPNHead

# torchvision's ImageNet statistics (what its pretrained backbones expect).
IMAGE_MEAN = [0.485, 0.456, 0.406]
IMAGE_STD = [0.229, 0.224, 0.225]


def resolve_anchors(
    cfg: ModelConfig, anchors: Mapping[str, Any] | None
) -> tuple[tuple[tuple[float, ...], ...], tuple[tuple[float, ...], ...]]:
    """Anchor sizes and aspect ratios (h / w) per FPN level, from ``anchors`` (the anchors
    stage's ``anchors.json``) or else the config. Ratios may be one list for all levels or
    one list per level; every level must give the same number of anchors per location."""
    if anchors is None:
        sizes_raw, ratios_raw = cfg.anchor_sizes, cfg.aspect_ratios
    else:
        try:
            sizes_raw, ratios_raw = anchors["sizes"], anchors["aspect_ratios"]
        except (KeyError, TypeError) as e:
            raise ModelError(
                f"anchors: expected 'sizes' and 'aspect_ratios', got {anchors!r}"
            ) from e
    sizes = tuple(tuple(float(s) for s in level) for level in sizes_raw)
    per_level = len(ratios_raw) > 0 and isinstance(ratios_raw[0], list | tuple)
    if per_level:
        ratios = tuple(tuple(float(r) for r in level) for level in ratios_raw)
    else:
        ratios = (tuple(float(r) for r in ratios_raw),) * len(sizes)
    levels = len(cfg.returned_layers) + 1
    if len(sizes) != levels or len(ratios) != levels:
        raise ModelError(
            f"anchors: {len(sizes)} size levels and {len(ratios)} ratio levels, but the "
            f"backbone has {levels} FPN levels (model.returned_layers + the pooled level)"
        )
    counts = {len(s) * len(r) for s, r in zip(sizes, ratios)}
    if len(counts) != 1 or 0 in counts:
        raise ModelError(
            f"anchors: every FPN level needs the same, non-zero number of anchors per "
            f"location (the RPN head is shared); got sizes {sizes} and ratios {ratios}"
        )
    if any(v <= 0 for level in sizes + ratios for v in level):
        raise ModelError(f"anchors: sizes and ratios must be positive: {sizes}, {ratios}")
    return sizes, ratios


class PolyDetector(nn.Module):
    """Faster R-CNN for polyboxes; see the module docstring for the entry points."""

    def __init__(
        self,
        backbone: nn.Module,
        rpn: PolyRPN,
        roi_heads: PolyRoIHeads,
        transform: GeneralizedRCNNTransform,
        cfg: ModelConfig,
        anchors: dict[str, Any],
    ) -> None:
        super().__init__()
        self.transform = transform
        self.backbone = backbone
        self.rpn = rpn
        self.roi_heads = roi_heads
        self.cfg = cfg
        self.anchors = anchors  # {"sizes", "aspect_ratios"} as given, for save_model
        self.classes: list[str] | None = None  # set by load_model

    def rpn_features(self, features: Mapping[str, Tensor]) -> list[Tensor]:
        """The FPN levels the RPN sees: all of them, except the stride-4 level that
        ``model.fine_roi_level`` adds for RoIAlign alone (anchors there would cost ~4x the
        RPN's work for objects the stride-8 level already proposes)."""
        levels = list(features.values())
        return levels[1:] if self.cfg.fine_roi_level else levels

    # --- input / output ----------------------------------------------------------------

    def resize_factor(self, height: int, width: int) -> float:
        """The scale at which the model sees a ``height`` x ``width`` image (torchvision's
        rule: the shorter side to ``min_size``, the longer at most ``max_size``)."""
        return min(self.cfg.min_size / min(height, width), self.cfg.max_size / max(height, width))

    def _resize(self, image: Tensor) -> Tensor:
        """torchvision's test-time resize (the training one draws a random size)."""
        h, w = image.shape[-2:]
        factor = self.resize_factor(h, w)
        if factor == 1.0:  # bilinear resampling at scale 1 is the identity
            return image
        return _resize_image_and_masks(image, self.cfg.min_size, self.cfg.max_size)[0]

    def preprocess(
        self,
        images: Sequence[Tensor],
        targets: Sequence[Mapping[str, Tensor]] | None = None,
    ) -> tuple[ImageList, list[dict[str, Tensor]], list[tuple[int, int]]]:
        """Normalise, resize and batch images ``[3, H, W]`` in [0, 1]; scale the targets'
        polyboxes to the resized images. Returns the batch, the targets on the model's
        device and the original ``(H, W)`` sizes."""
        if len(images) == 0:
            raise ValueError("expected at least one image")
        if targets is not None and len(targets) != len(images):
            raise ValueError(f"{len(images)} images but {len(targets)} targets")
        device = self.rpn.head.cls_logits.weight.device
        resized, originals, out_targets = [], [], []
        for i, image in enumerate(images):
            if image.dim() != 3 or image.shape[0] != 3 or not image.is_floating_point():
                raise ValueError(
                    f"image {i}: expected a float [3, H, W] tensor, got "
                    f"{image.dtype} {tuple(image.shape)}"
                )
            h, w = int(image.shape[-2]), int(image.shape[-1])
            image = self._resize(self.transform.normalize(image.to(device)))
            resized.append(image)
            originals.append((h, w))
            if targets is None:
                continue
            polyboxes, labels = targets[i]["polyboxes"], targets[i]["labels"]
            if polyboxes.dim() != 2 or polyboxes.shape[1] != 10:
                raise ValueError(
                    f"target {i}: polyboxes must be [N, 10], got {tuple(polyboxes.shape)}"
                )
            if labels.shape != polyboxes.shape[:1] or labels.dtype != torch.int64:
                raise ValueError(f"target {i}: labels must be int64 [N] matching the polyboxes")
            polyboxes = polyboxes.to(device=device, dtype=torch.float32)
            new_h, new_w = image.shape[-2:]
            first = targets[i].get("first_corner")  # heading hook (issue 15)
            if (new_h, new_w) != (h, w):
                old, polyboxes = polyboxes, scale(polyboxes, new_w / w, new_h / h)
                if first is not None:
                    first = heading.scale_first_corner(
                        old, polyboxes, first.to(device), new_w / w, new_h / h
                    )
            out = {"polyboxes": polyboxes, "labels": labels.to(device)}
            if first is not None:
                out["first_corner"] = first.to(device)
            out_targets.append(out)
        batch = self.transform.batch_images(resized, size_divisible=self.transform.size_divisible)
        sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in resized]
        return ImageList(batch, sizes), out_targets, originals

    @staticmethod
    def _to_original(
        detections: list[dict[str, Tensor]],
        sizes: list[tuple[int, int]],
        originals: list[tuple[int, int]],
    ) -> list[dict[str, Tensor]]:
        """Scale detections from the model's input pixels back to the input images'."""
        for det, (h, w), (h0, w0) in zip(detections, sizes, originals):
            if (h, w) != (h0, w0):
                old, det["polyboxes"] = det["polyboxes"], scale(det["polyboxes"], w0 / w, h0 / h)
                if "first_corner" in det:  # heading hook (issue 15)
                    det["first_corner"] = heading.scale_first_corner(
                        old, det["polyboxes"], det["first_corner"], w0 / w, h0 / h
                    )
            if "first_corner" in det:
                det["heading"] = heading.heading_degrees(det["polyboxes"], det["first_corner"])
        return detections

    # --- entry points ------------------------------------------------------------------

    def forward(
        self, images: Sequence[Tensor], targets: Sequence[Mapping[str, Tensor]]
    ) -> dict[str, Tensor]:
        """The same as :meth:`loss` (the training step, for DDP and hooks)."""
        return self.loss(images, targets)

    def loss(
        self, images: Sequence[Tensor], targets: Sequence[Mapping[str, Tensor]]
    ) -> dict[str, Tensor]:
        """Scalar losses ``loss_rpn_objectness``, ``loss_rpn_polybox``, ``loss_classifier``,
        ``loss_polybox`` for images ``[3, H, W]`` in [0, 1] and targets
        ``{"polyboxes": [N, 10] (image pixels), "labels": [N] int64 (from 1)}``."""
        image_list, gts, _ = self.preprocess(images, targets)
        features = self.backbone(image_list.tensors)
        out = self.rpn(image_list, self.rpn_features(features))
        losses, _ = self.rpn.loss(out, [t["polyboxes"] for t in gts])
        proposals = self.rpn.propose(out, image_list.image_sizes, training=True)
        roi_losses, _, _ = self.roi_heads.loss(
            features, proposals.boxes, image_list.image_sizes, gts
        )
        losses.update(roi_losses)
        return losses

    @torch.no_grad()
    def predict(self, images: Sequence[Tensor]) -> list[dict[str, Tensor]]:
        """Per image ``{"polyboxes": [K, 10], "scores": [K], "labels": [K]}`` in that image's
        pixels, best first."""
        image_list, _, originals = self.preprocess(images)
        features = self.backbone(image_list.tensors)
        out = self.rpn(image_list, self.rpn_features(features))
        proposals = self.rpn.propose(out, image_list.image_sizes, training=False)
        detections = self.roi_heads.detect(features, proposals.boxes, image_list.image_sizes)
        return self._to_original(detections, image_list.image_sizes, originals)

    @torch.no_grad()
    def inspect(
        self, images: Sequence[Tensor], targets: Sequence[Mapping[str, Tensor]]
    ) -> dict[str, Any]:
        """Intermediate results for the debug report (eval mode, no grad, CPU tensors).

        Per image lists (coordinates in the model's input pixels, see ``image_sizes``):
        ``anchors [A, 4]`` xyxy, ``anchor_ious [A]`` (best hull IoU with any ground truth),
        ``anchor_labels [A]`` (1 / 0 / -1 ignored), ``matched_gt [A]``,
        ``encoded_rpn_targets [P, 10]`` and ``rpn_deltas [P, 10]`` of the P positive anchors,
        ``proposals [K, 4]``, ``proposal_scores [K]``, ``proposal_polyboxes [K, 10]`` (the
        test-time proposals; the polyboxes canonicalised, the boxes their hulls), ``encoded_roi_targets [Q, 10]`` and ``roi_deltas [Q, 10]`` of the
        Q positive sampled RoIs (true class), ``detections`` (as :meth:`predict`, in the input
        image's pixels); plus ``losses`` (as :meth:`loss`, floats) and ``image_sizes``
        (``{"height", "width", "original_height", "original_width", "scale_x", "scale_y"}``,
        resized = original * scale).
        """
        was_training = self.training
        self.eval()
        try:
            image_list, gts, originals = self.preprocess(images, targets)
            sizes = image_list.image_sizes
            features = self.backbone(image_list.tensors)
            out = self.rpn(image_list, self.rpn_features(features))
            losses, match = self.rpn.loss(out, [t["polyboxes"] for t in gts])
            train_props = self.rpn.propose(out, sizes, training=True)
            roi_losses, samples, roi_out = self.roi_heads.loss(
                features, train_props.boxes, sizes, gts
            )
            losses.update(roi_losses)
            props = self.rpn.propose(out, sizes, training=False)
            detections = self._to_original(
                self.roi_heads.detect(features, props.boxes, sizes), sizes, originals
            )
        finally:
            self.train(was_training)

        report: dict[str, Any] = {
            k: []
            for k in (
                "anchors",
                "anchor_ious",
                "anchor_labels",
                "matched_gt",
                "encoded_rpn_targets",
                "rpn_deltas",
                "proposals",
                "proposal_scores",
                "proposal_polyboxes",
                "encoded_roi_targets",
                "roi_deltas",
            )
        }
        pos_counts = [int((labels > 0).sum()) for labels in samples.labels]
        roi_targets = roi_out.targets.split(pos_counts)
        roi_deltas = roi_out.pos_deltas.split(pos_counts)
        for i, gt in enumerate(gts):
            pos = torch.where(match.labels[i] > 0)[0]
            gt_pos = gt["polyboxes"][match.matched_gt[i][pos]]
            _, rpn_targets = polybox_loss(  # the targets the loss used (chosen corner roll)
                out.deltas[i, pos].float(),
                gt_pos.float(),
                out.anchors[pos],
                self.rpn.coder,
                self.cfg.rpn.order_free,
            )
            per_image = {
                "anchors": out.anchors,
                "anchor_ious": match.ious[i],
                "anchor_labels": match.labels[i],
                "matched_gt": match.matched_gt[i],
                "encoded_rpn_targets": rpn_targets,
                "rpn_deltas": out.deltas[i, pos].float(),
                "proposals": props.boxes[i],
                "proposal_scores": props.scores[i],
                "proposal_polyboxes": canonicalize(props.polyboxes[i]),
                "encoded_roi_targets": roi_targets[i],
                "roi_deltas": roi_deltas[i],
            }
            for key, value in per_image.items():
                report[key].append(value.detach().cpu())
        report["detections"] = [{k: v.cpu() for k, v in d.items()} for d in detections]
        report["losses"] = {k: float(v) for k, v in losses.items()}
        report["image_sizes"] = [
            {
                "height": h,
                "width": w,
                "original_height": h0,
                "original_width": w0,
                "scale_x": w / w0,
                "scale_y": h / h0,
            }
            for (h, w), (h0, w0) in zip(sizes, originals)
        ]
        return report


def _build(cfg: ModelConfig, anchors: Mapping[str, Any] | None, load_weights: bool) -> PolyDetector:
    try:
        check_model_config(cfg)
    except ConfigError as e:
        raise ModelError(str(e)) from e
    backbone = build_backbone(cfg, load_weights=load_weights)
    sizes, ratios = resolve_anchors(cfg, anchors)
    generator = AnchorGenerator(sizes, ratios)
    head = PolyRPNHead(backbone.out_channels, generator.num_anchors_per_location()[0])
    rpn = PolyRPN(generator, head, cfg.rpn)
    # Like torchvision, the pooled extra level feeds the RPN but not RoIAlign.
    featmap_names = [str(i) for i in range(len(cfg.returned_layers) + cfg.fine_roi_level)]
    roi_heads = PolyRoIHeads(featmap_names, backbone.out_channels, cfg.num_classes, cfg.roi)
    transform = GeneralizedRCNNTransform(cfg.min_size, cfg.max_size, IMAGE_MEAN, IMAGE_STD)
    given = plain_anchors(
        anchors or {"sizes": cfg.anchor_sizes, "aspect_ratios": cfg.aspect_ratios}
    )
    return PolyDetector(backbone, rpn, roi_heads, transform, cfg, given)


def plain_anchors(anchors: Mapping[str, Any]) -> dict[str, Any]:
    """``{"sizes", "aspect_ratios"}`` of ``anchors`` as plain lists (model files, exports)."""
    return {"sizes": plain(anchors["sizes"]), "aspect_ratios": plain(anchors["aspect_ratios"])}


def build_model(
    cfg: ModelConfig, anchors: Mapping[str, Any] | None = None, *, load_weights: bool = True
) -> PolyDetector:
    """The detector for ``cfg`` (``cfg.model`` of :func:`polydet.config.load_config`).

    ``anchors``: ``{"sizes": [[int, ...] per level], "aspect_ratios": [float, ...]}`` from the
    anchors stage (model input pixels, ratios h / w), else the config's anchors. Pretrained
    weights named by ``cfg.weights`` are loaded (a :class:`ModelError` if missing) unless
    ``load_weights`` is false (a model file's state dict holds every weight).
    """
    return _build(cfg, anchors, load_weights=load_weights)
