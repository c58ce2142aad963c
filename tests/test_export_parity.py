"""The export's parity rule (polydet.deploy.export.compare_detections) and the graph's resize
against torchvision's, on ONNX Runtime."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.models.detection.transform import _resize_image_and_masks

from polydet.deploy.export import (
    PARITY_BORDER,
    ExportableDetector,
    ParityError,
    compare_detections,
)
from polydet.geometry.polybox import from_xyxy


def _dets(boxes: list[list[float]], scores: list[float], labels: list[int]) -> dict:
    return {
        "polyboxes": from_xyxy(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)),
        "scores": torch.tensor(scores, dtype=torch.float32),
        "labels": torch.tensor(labels, dtype=torch.int64),
    }


def _overlap_box(iou: float) -> list[float]:
    """A box [0, 0, w, 10] whose IoU with [0, 0, 10, 10] is ``iou`` (w = 10 / iou)."""
    return [0.0, 0.0, 10.0 / iou, 10.0]


def test_identical_detections_pass() -> None:
    ref = _dets([[0, 0, 10, 10], [20, 20, 40, 30]], [0.9, 0.4], [1, 2])
    report = compare_detections([ref], [ref])
    assert report["ok"] and report["checked"] == 2 and report["failures"] == []
    assert report["unmatched"] == report["borderline"] == 0


def test_a_score_at_the_threshold_is_borderline() -> None:
    """A detection the other runtime drops whose score sits at the threshold within float
    tolerance is excused; the same detection well above it is a failure."""
    kept = _dets([[0, 0, 10, 10]], [0.9], [1])
    for thresh in (0.05, 0.3):
        ref = _dets([[0, 0, 10, 10], [50, 50, 60, 60]], [0.9, thresh + PARITY_BORDER / 2], [1, 1])
        report = compare_detections([ref], [kept], score_thresh=0.3)
        assert report["ok"] and report["borderline"] == 1, report
    ref = _dets([[0, 0, 10, 10], [50, 50, 60, 60]], [0.9, 0.45], [1, 1])
    report = compare_detections([ref], [kept], score_thresh=0.3)
    assert not report["ok"] and report["unmatched"] == 1 and report["borderline"] == 0
    (failure,) = report["failures"]
    assert failure["kind"] == "missing" and failure["score"] == pytest.approx(0.45)
    assert failure["closest"]["iou"] == 0.0  # the other detection of its label, far away


def test_a_suppression_at_the_nms_threshold_is_borderline() -> None:
    """Suppressed on the other side by a higher-scoring detection of its label whose IoU is
    the NMS threshold to float tolerance: excused. At a clearly higher IoU the eager model
    would have suppressed it too, so its presence there and absence here is a failure; a
    suppressor of another label never excuses."""
    nms = 0.3
    winner = [0.0, 0.0, 10.0, 10.0]
    for iou, label, ok in ((nms + PARITY_BORDER / 4, 1, True), (0.5, 1, False),
                           (nms + PARITY_BORDER / 4, 2, False)):  # fmt: skip
        ref = _dets([winner, _overlap_box(iou)], [0.9, 0.6], [1, label])
        other = _dets([winner], [0.9], [1])
        report = compare_detections([ref], [other], score_thresh=0.05, nms_thresh=nms)
        assert report["ok"] is ok, (iou, label, report)


def test_a_moved_detection_fails_and_the_message_shows_it(tmp_path: Path) -> None:
    """A real difference (a detection moved, its score changed) fails, and the error names
    it with its closest counterpart instead of the matched detections' perfect figures."""
    ref = _dets([[0, 0, 10, 10], [30, 30, 50, 44]], [0.9, 0.337], [1, 3])
    other = _dets([[0, 0, 10, 10], [30, 30, 50, 46]], [0.9, 0.317], [1, 3])
    report = compare_detections([ref], [other], score_thresh=0.05, nms_thresh=0.3)
    assert not report["ok"] and report["unmatched"] == 1
    assert report["min_iou"] == pytest.approx(1.0)  # the matched one: perfect
    message = str(ParityError(tmp_path / "model.onnx", report))
    assert "unmatched 1" in message
    assert "missing label 3 score 0.337" in message
    assert "IoU 0.875, score 0.317" in message  # 280 / 320


def test_heading_mismatch_is_a_failure() -> None:
    ref = {**_dets([[0, 0, 10, 10]], [0.9], [1]), "first_corner": torch.tensor([1])}
    other = {**_dets([[0, 0, 10, 10]], [0.9], [1]), "first_corner": torch.tensor([2])}
    report = compare_detections([ref], [other])
    assert not report["ok"] and report["first_corner_mismatch"] == 1
    assert report["failures"][0]["kind"] == "heading"


class _Resize(torch.nn.Module):
    def __init__(self, wrapper: ExportableDetector) -> None:
        super().__init__()
        self.wrapper = wrapper

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, new, _ = self.wrapper.resize(images)
        return batch, new


def test_graph_resize_gives_torchvision_sizes_and_pixels() -> None:
    """The exported resize on ONNX Runtime against torchvision's eager resize (the model's
    ``GeneralizedRCNNTransform`` rule) over sizes where float32 arithmetic rounds a side
    down: 97 x 131 at 160 px became 118 x 159 in the graph before the fix."""
    ort = pytest.importorskip("onnxruntime")
    from polydet.core.config import load_config
    from polydet.model import build_model

    cfg = load_config(Path(__file__).parents[1] / "params.yaml").model
    model = build_model(cfg).eval()
    module = _Resize(ExportableDetector(model)).eval()
    buf = io.BytesIO()
    torch.onnx.export(
        module, (torch.rand(1, 3, 64, 64),), buf, dynamo=False, opset_version=17,
        input_names=["images"], output_names=["batch", "new"],
        dynamic_axes={"images": {0: "b", 2: "h", 3: "w"}, "batch": {0: "b", 2: "H", 3: "W"}},
    )  # fmt: skip
    session = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    sizes = [(97, 131), (131, 97), (37, 1000), (250, 251), (160, 160), (63, 517), (3, 7)]
    # every width whose float32 scale rounds differently from float64's, at a fixed height
    sizes += [
        (h, w) for h, w in ((97, w) for w in range(98, 400))
        if math.floor(w * np.float32(cfg.max_size / w)) != math.floor(w * (cfg.max_size / w))
    ][:8]  # fmt: skip
    assert (97, 131) in sizes
    g = torch.Generator().manual_seed(0)
    for h, w in sizes:
        image = torch.rand(3, h, w, generator=g)
        expected = _resize_image_and_masks(
            model.transform.normalize(image), cfg.min_size, cfg.max_size
        )[0]
        batch, new = session.run(None, {"images": image[None].numpy()})
        assert tuple(new) == tuple(expected.shape[-2:]), (h, w, new)
        got = batch[0, :, : new[0], : new[1]]
        # the kernels round differently (ORT computes its scale in float32): 1e-4 of a value
        np.testing.assert_allclose(got, expected.numpy(), rtol=0, atol=1e-3, err_msg=str((h, w)))
