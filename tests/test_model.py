"""The polybox detector: shapes, empty images, extreme shapes, matching, resizing, model files,
backbones and weights. Tiny models (32-channel FPN) on 64-128 px images keep this fast."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from helpers import quad, tiny_cfg
from torch import nn
from torchvision.models import resnet18
from torchvision.models.detection import _utils as det_utils
from torchvision.ops import FrozenBatchNorm2d, box_iou

from polydet.core.errors import ModelError
from polydet.geometry.polybox import canonicalize, hull_xyxy, scale, to_corners
from polydet.model import PolyDetector, build_model, load_model, save_model

KEYS = {
    "loss_rpn_objectness",
    "loss_rpn_polybox",
    "loss_classifier",
    "loss_polybox",
    "loss_polybox_iou",
    "loss_refine",
    "loss_heading",  # the heading head (model.roi.heading_loss_weight > 0 by default)
    "loss_quality",  # the localisation-quality branch (zero without it)
    "loss_quad_classifier",  # the quad-aligned second stage (zero with the hull stage)
    "loss_quad_polybox",
}


def target(*polyboxes: torch.Tensor, labels: list[int] | None = None) -> dict[str, torch.Tensor]:
    p = torch.stack(polyboxes) if polyboxes else torch.zeros(0, 10)
    lb = torch.tensor(labels if labels is not None else [1] * len(polyboxes), dtype=torch.int64)
    return {"polyboxes": p, "labels": lb}


@pytest.fixture(scope="module")
def _built() -> PolyDetector:
    torch.manual_seed(0)
    return build_model(tiny_cfg())


@pytest.fixture
def model(_built: PolyDetector) -> PolyDetector:
    """A fresh copy per test: training-mode losses update BatchNorm statistics and tests
    switch train/eval, so no test sees what an earlier one did to the model."""
    return copy.deepcopy(_built)


def _finite(losses: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(v)) for v in losses.values())


def test_loss_and_predict_shapes_with_empty_images(model: PolyDetector) -> None:
    model.train()
    images = [torch.rand(3, 128, 96), torch.rand(3, 100, 128)]
    targets = [target(quad(50, 60, 40, 25, 20), quad(30, 30, 20, 20, 0), labels=[1, 2]), target()]
    losses = model.loss(images, targets)
    assert set(losses) == KEYS and _finite(losses)
    assert all(v.dim() == 0 for v in losses.values())
    model.zero_grad()
    sum(losses.values()).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.rpn.head.polybox_pred.weight.grad.abs().sum() > 0

    model.eval()
    out = model.predict(images)
    assert len(out) == 2
    for det, image in zip(out, images):
        k = det["scores"].shape[0]
        assert det["polyboxes"].shape == (k, 10) and det["labels"].shape == (k,)
        assert det["labels"].dtype == torch.int64
        assert ((det["labels"] >= 1) & (det["labels"] <= 2)).all()
        assert (det["scores"][:-1] >= det["scores"][1:]).all()
        torch.testing.assert_close(canonicalize(det["polyboxes"]), det["polyboxes"])
        h, w = image.shape[-2:]
        corners = to_corners(det["polyboxes"])
        assert (corners[..., 0] >= -1e-3).all() and (corners[..., 0] <= w + 1e-3).all()
        assert (corners[..., 1] >= -1e-3).all() and (corners[..., 1] <= h + 1e-3).all()


def test_batch_without_any_object_has_zero_regression_losses(model: PolyDetector) -> None:
    model.train()
    losses = model.loss([torch.rand(3, 128, 128)] * 2, [target(), target()])
    assert _finite(losses)
    assert losses["loss_rpn_polybox"].item() == 0.0 and losses["loss_polybox"].item() == 0.0
    assert losses["loss_polybox_iou"].item() == 0.0
    assert losses["loss_rpn_objectness"].item() > 0 and losses["loss_classifier"].item() > 0
    sum(losses.values()).backward()


def test_loss_finite_at_extreme_aspect_ratios(model: PolyDetector) -> None:
    model.train()
    thin = [quad(64, 64, 90, 3, 0), quad(64, 64, 90, 3, 37), quad(40, 70, 3, 90, 0)]
    losses = model.loss([torch.rand(3, 128, 128)], [target(*thin, labels=[1, 2, 1])])
    assert _finite(losses)
    model.zero_grad()
    sum(losses.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_mixed_precision_keeps_losses_and_outputs_in_float32(model: PolyDetector) -> None:
    """AMP safety, checked with CPU bfloat16 autocast (no GPU here)."""
    model.train()
    images = [torch.rand(3, 128, 128), torch.rand(3, 128, 128)]
    targets = [target(quad(50, 50, 40, 30, 20), quad(90, 90, 30, 30, 0), labels=[1, 2]), target()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model.loss(images, targets)
    assert set(losses) == KEYS and _finite(losses)
    assert all(v.dtype == torch.float32 for v in losses.values())
    sum(losses.values()).backward()
    model.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        det = model.predict(images)[0]
    assert det["polyboxes"].dtype == torch.float32 and det["scores"].dtype == torch.float32


def test_degenerate_ground_truth_does_not_make_every_anchor_positive(model: PolyDetector) -> None:
    """The allow_low_quality_matches pitfall: a ground truth that overlaps no anchor."""
    model.train()
    normal = quad(64, 64, 32, 32, 0)
    point = torch.tensor([70.0, 40.0] + [0.0] * 8)  # all 4 corners on one point: area 0
    gts = torch.stack([normal, point])
    batch, _, _ = model.preprocess([torch.rand(3, 128, 128)])
    out = model.rpn(batch, list(model.backbone(batch.tensors).values()))
    anchors = out.anchors
    quality = box_iou(hull_xyxy(gts), anchors)
    assert quality[1].max() == 0  # really overlaps nothing

    # torchvision's matcher turns every anchor positive for such a ground truth ...
    tv = det_utils.Matcher(0.7, 0.3, allow_low_quality_matches=True)(quality.clone())
    assert (tv >= 0).all()
    # ... ours keeps exactly the anchors of the real box: IoU > 0.7 or its best.
    match = model.rpn.match(anchors, [gts])
    expected = (quality[0] > 0.7) | (quality[0] == quality[0].max())
    assert torch.equal(match.labels[0] == 1, expected)
    assert (match.matched_gt[0][match.labels[0] == 1] == 0).all()
    assert 0 < int(expected.sum()) < 20

    losses = model.loss([torch.rand(3, 128, 128)], [target(normal, point, labels=[1, 2])])
    assert _finite(losses)


def test_targets_are_resized_and_predictions_mapped_back(model: PolyDetector) -> None:
    model.eval()
    big = torch.rand(3, 256, 192)  # resized by 0.5 to 128 x 96
    gt = target(quad(100, 120, 60, 30, 25))
    batch, targets, originals = model.preprocess([big], [gt])
    assert batch.image_sizes == [(128, 96)] and originals == [(256, 192)]
    torch.testing.assert_close(targets[0]["polyboxes"], scale(gt["polyboxes"], 0.5, 0.5))
    small = torch.nn.functional.interpolate(
        big[None], size=(128, 96), mode="bilinear", align_corners=False
    )[0]
    got, ref = model.predict([big])[0], model.predict([small])[0]
    assert ref["scores"].numel() > 0
    torch.testing.assert_close(got["scores"], ref["scores"])
    # float32 coordinates of a few hundred px, scaled by 2: rounding of a few 1e-5 px
    torch.testing.assert_close(
        got["polyboxes"], scale(ref["polyboxes"], 2.0, 2.0), rtol=1e-5, atol=1e-4
    )


def test_loss_in_eval_mode_keeps_batchnorm_statistics(model: PolyDetector) -> None:
    model.eval()
    buffers = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    images, targets = [torch.rand(3, 128, 128)], [target(quad(60, 60, 40, 40, 10))]
    torch.manual_seed(5)
    first = model.loss(images, targets)
    torch.manual_seed(5)
    second = model.loss(images, targets)
    assert set(first) == KEYS and all(v.requires_grad for v in first.values())
    for k in KEYS:
        assert first[k].item() == second[k].item()
    for k, v in model.state_dict().items():
        if k in buffers:
            assert torch.equal(v, buffers[k]), k
    assert not model.training


def test_inspect_reports_consistent_matching(model: PolyDetector) -> None:
    model.train()
    gts = [target(quad(60, 50, 50, 30, 15), quad(30, 90, 24, 24, 0), labels=[1, 2]), target()]
    images = [torch.rand(3, 128, 128), torch.rand(3, 128, 128)]
    report = model.inspect(images, gts)
    assert model.training  # restored
    assert set(report["losses"]) == KEYS
    num_anchors = report["anchors"][0].shape[0]
    for i in range(2):
        labels = report["anchor_labels"][i]
        assert labels.shape == (num_anchors,) and report["anchor_ious"][i].shape == labels.shape
        pos = torch.where(labels == 1)[0]
        assert report["encoded_rpn_targets"][i].shape == (pos.numel(), 10)
        assert report["rpn_deltas"][i].shape == (pos.numel(), 10)
        # Decoding the reported targets on their anchors gives the matched ground truths.
        gt = gts[i]["polyboxes"][report["matched_gt"][i][pos]]
        anchors = report["anchors"][i][pos]
        decoded = model.rpn.coder.decode(report["encoded_rpn_targets"][i], anchors)
        torch.testing.assert_close(canonicalize(decoded), gt, rtol=0, atol=1e-3)
        assert (report["anchor_ious"][i][pos] > 0).all()
        k = report["proposals"][i].shape[0]
        assert report["proposal_scores"][i].shape == (k,)
        assert report["proposal_polyboxes"][i].shape == (k, 10)
        assert report["encoded_roi_targets"][i].shape == report["roi_deltas"][i].shape
        assert set(report["detections"][i]) == {
            "polyboxes", "scores", "labels", "first_corner", "heading",
        }  # fmt: skip
    assert report["encoded_rpn_targets"][0].shape[0] >= 2  # each object has its best anchor
    assert report["encoded_roi_targets"][0].shape[0] >= 2  # ground-truth hulls are RoIs
    assert report["encoded_rpn_targets"][1].shape[0] == 0
    assert report["image_sizes"][0]["scale_x"] == 1.0


def test_save_load_round_trip(tmp_path: Path) -> None:
    cfg = tiny_cfg("model.returned_layers=[3, 4]", "anchors.sizes=[[32], [64], [128]]")
    anchors = {"sizes": [[24, 48], [96, 128], [160, 200]], "aspect_ratios": [0.5, 1.0, 2.0]}
    torch.manual_seed(1)
    model = build_model(cfg, anchors=anchors)
    assert model.rpn.head.cls_logits.out_channels == 6
    assert model.rpn.head.polybox_pred.out_channels == 60
    model.train()
    model.loss([torch.rand(3, 128, 128)], [target(quad(60, 60, 50, 40, 30))])  # moves BN stats
    model.eval()
    path = save_model(model, tmp_path / "sub" / "model.pt", cfg, ["a", "b"], anchors)
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "polydet-model/1" and raw["classes"] == ["a", "b"]
    assert raw["anchors"] == anchors and raw["model"]["returned_layers"] == [3, 4]

    loaded = load_model(path)
    assert not loaded.training and loaded.classes == ["a", "b"] and loaded.cfg == cfg
    for (k, v), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    images = [torch.rand(3, 128, 128)]
    a, b = model.predict(images)[0], loaded.predict(images)[0]
    assert a["scores"].numel() > 0
    for key in a:
        assert torch.equal(a[key], b[key])


def test_model_files_carry_their_own_classes_and_anchors_and_old_ones_load(
    tmp_path: Path,
) -> None:
    """params.yaml derives model.num_classes / anchor_sizes / aspect_ratios; a model file still
    states them (it rebuilds without params.yaml), so files of older versions, whose model
    section lacks the keys added since, load with the behaviour they were trained with."""
    cfg = tiny_cfg("anchors.sizes=[[20], [40], [80], [160]]", "anchors.aspect_ratios=[1.0]")
    torch.manual_seed(3)
    path = save_model(build_model(cfg), tmp_path / "model.pt", cfg, ["a", "b"], None)
    payload = torch.load(path, weights_only=True)
    section = payload["model"]
    assert section["num_classes"] == 3  # a, b + background
    assert section["anchor_sizes"] == [[20], [40], [80], [160]]
    assert section["aspect_ratios"] == [1.0]
    # As written before fine_roi_level, order-free losses, the IoU loss and refinement existed.
    del section["fine_roi_level"]
    for head in ("rpn", "roi"):
        del section[head]["order_free"], section[head]["loss_weight"]
    for key in (
        "sampling_ratio",
        "iou_loss_weight",
        "refine_steps",
        "refine_candidates",
        "vote_iou",
        "quality_loss_weight",
        "quality_power",
    ):
        del section["roi"][key]
    torch.save(payload, tmp_path / "old.pt")
    old = load_model(tmp_path / "old.pt")
    assert old.cfg.num_classes == 3 and old.cfg.anchor_sizes == ((20,), (40,), (80,), (160,))
    assert (old.cfg.fine_roi_level, old.cfg.rpn.order_free, old.cfg.roi.loss_weight) == (
        False,
        False,
        1.0,
    )
    roi = old.cfg.roi
    assert (roi.sampling_ratio, roi.refine_steps, roi.refine_candidates, roi.vote_iou) == (
        2,
        0,
        0,
        0,
    )
    assert (roi.quality_loss_weight, roi.quality_power, old.roi_heads.quality) == (0, 0, None)
    assert old.rpn.head.cls_logits.out_channels == 1  # one size x one ratio per location
    assert old.roi_heads.box_predictor.cls_score.out_features == 3


def test_model_file_bytes_depend_only_on_its_content(tmp_path: Path) -> None:
    """Identical weights give identical files whatever the file (or temp file) is called:
    DVC then sees an unchanged output and the registry an already registered model."""
    import zipfile

    cfg = tiny_cfg()
    torch.manual_seed(2)
    first = save_model(build_model(cfg), tmp_path / "a" / "model.pt", cfg, ["a", "b"], None)
    again = save_model(load_model(first), tmp_path / "b" / "renamed.pt", cfg, ["a", "b"], None)
    assert first.read_bytes() == again.read_bytes()
    assert {n.split("/")[0] for n in zipfile.ZipFile(first).namelist()} == {"archive"}
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "b", "model.pt", "renamed.pt"]


def test_load_model_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pt"
    with pytest.raises(ModelError, match="nope.pt"):
        load_model(missing)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00not a zip file at all" * 10)
    with pytest.raises(ModelError, match="corrupt.pt"):
        load_model(corrupt)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(ModelError, match="foreign.pt.*not a polydet model"):
        load_model(foreign)


def test_from_scratch_backbone_has_trainable_batchnorm(model: PolyDetector) -> None:
    norms = [
        m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d | FrozenBatchNorm2d)
    ]
    assert norms and all(isinstance(m, nn.BatchNorm2d) for m in norms)
    assert all(p.requires_grad for p in model.parameters())
    features = model.backbone(torch.rand(1, 3, 128, 128))
    assert list(features) == ["0", "1", "2", "pool"]
    assert [f.shape[-1] for f in features.values()] == [16, 8, 4, 2]  # strides 8..64
    assert all(f.shape[1] == 32 for f in features.values())


def test_pretrained_weights_file_and_missing_weights(tmp_path: Path, monkeypatch) -> None:
    torch.manual_seed(3)
    trunk = resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(trunk.state_dict(), path)
    model = build_model(tiny_cfg(f"model.weights={path}", "model.trainable_layers=2"))
    body = model.backbone.body
    assert torch.equal(body.conv1.weight, trunk.conv1.weight)
    assert torch.equal(body.layer4[1].bn2.running_var, trunk.layer4[1].bn2.running_var)
    assert isinstance(body.bn1, FrozenBatchNorm2d)
    assert not body.layer2[0].conv1.weight.requires_grad
    assert body.layer3[0].conv1.weight.requires_grad and body.layer4[0].conv1.weight.requires_grad

    # A torchvision name must already be in the hub cache: a clear error, no download.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(ModelError, match="resnet18-f37072fd.pth"):
        build_model(tiny_cfg("model.weights=IMAGENET1K_V1"))
    with pytest.raises(ModelError, match="missing.pth"):
        build_model(tiny_cfg(f"model.weights={tmp_path / 'missing.pth'}"))
    with pytest.raises(ModelError, match="unknown torchvision weights"):
        build_model(tiny_cfg("model.weights=NOT_A_WEIGHT"))


@pytest.mark.parametrize("backbone", ["mobilenet_v3_fpn", "resnet50_fpn"])
def test_other_backbones(backbone: str) -> None:
    torch.manual_seed(0)
    model = build_model(
        tiny_cfg(f"model.backbone={backbone}", "model.min_size=64", "model.max_size=64")
    )
    model.train()
    losses = model.loss([torch.rand(3, 64, 64)], [target(quad(30, 30, 24, 16, 30))])
    assert set(losses) == KEYS and _finite(losses)
    norms = [
        m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d | FrozenBatchNorm2d)
    ]
    assert norms and all(isinstance(m, nn.BatchNorm2d) for m in norms)


def test_anchor_levels_must_match_the_backbone() -> None:
    with pytest.raises(ModelError, match="FPN levels"):
        build_model(tiny_cfg(), anchors={"sizes": [[16], [32]], "aspect_ratios": [1.0]})
    with pytest.raises(ModelError, match="same, non-zero number"):
        build_model(
            tiny_cfg(),
            anchors={"sizes": [[16], [32, 40], [64], [128]], "aspect_ratios": [1.0]},
        )


def test_fine_roi_level_pools_small_objects_at_stride_4_and_hides_it_from_the_rpn() -> None:
    torch.manual_seed(0)
    fine = build_model(tiny_cfg("model.fine_roi_level=true"))
    plain = build_model(tiny_cfg())
    images = [torch.rand(3, 128, 128)]
    batch, _, _ = fine.preprocess(images)
    feats = fine.backbone(batch.tensors)
    assert list(feats) == ["0", "1", "2", "3", "pool"]
    assert feats["0"].shape[-1] == 128 // 4  # ResNet layer 1: stride 4
    # The RPN sees exactly the levels (and so the anchors) of the model without it.
    rpn_levels = [f.shape[-2:] for f in fine.rpn_features(feats)]
    plain_feats = plain.backbone(batch.tensors)
    assert rpn_levels == [f.shape[-2:] for f in plain.rpn_features(plain_feats)]
    assert fine.roi_heads.box_roi_pool.featmap_names == ["0", "1", "2", "3"]
    # torchvision's level mapper sends a 20 px RoI to the stride-4 level: pooled from a
    # pyramid whose level "0" alone is non-zero, it is non-zero.
    marked = {k: torch.full_like(f, float(k == "0")) for k, f in feats.items()}
    small = [torch.tensor([[10.0, 10.0, 30.0, 30.0]])]
    pooled = fine.roi_heads.box_roi_pool(marked, small, batch.image_sizes)
    assert torch.allclose(pooled, torch.ones_like(pooled))
    losses = fine.loss(images, [target(quad(60, 60, 30, 20, 30))])
    assert all(torch.isfinite(v) for v in losses.values())
    with pytest.raises(ModelError, match="fine_roi_level"):
        build_model(tiny_cfg("model.fine_roi_level=true", "model.backbone=mobilenet_v3_fpn"))
