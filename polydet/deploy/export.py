"""Deployable models: ``polydet export --model PATH_OR_URI --format onnx|torchscript --out DIR``.

:class:`ExportableDetector` wraps a :class:`~polydet.model.PolyDetector` as one function of
a padded batch ``images [B, 3, H, W]`` (float32 in [0, 1], any B, H, W) returning

* ``polyboxes [B, K, 10]`` float32, canonical, in the input images' pixels;
* ``scores [B, K]`` float32, best first; rows past an image's detections have score 0;
* ``labels [B, K]`` int64 (classes from 1; 0 on padding rows);
* ``first_corner [B, K]`` int64: the heading, the index (0-3) into the polybox's canonical
  ring of the corner the object is listed from (:mod:`polydet.geometry.heading`), predicted
  by the heading head on each detection's hull as in eager mode; -1 on padding rows and for
  a model without the head;
* ``heading [B, K]`` float32: degrees in [0, 360) from the centre to the middle of the first
  edge (:func:`~polydet.geometry.heading.heading_degrees`); NaN where ``first_corner`` is -1;

with ``K = model.roi.detections_per_img``. Resizing (torchvision's test-time rule, computed in
float64 as eager mode does), normalisation and padding happen inside the graph, and so do
decode, clip and both NMS stages: the post-processing is
:mod:`polydet.model.inference`, the same code :meth:`PolyDetector.predict` runs.

How: ``torch.jit.trace`` records the wrapper once; ``--format torchscript`` saves that
trace (``model.ts``, load with ``torch.jit.load`` after ``import torchvision``, whose
``nms`` / ``roi_align`` operators it calls), ``--format onnx`` exports the same trace with
the TorchScript-based ONNX exporter (``model.onnx``, opset 17: proposal NMS becomes
``NonMaxSuppression``, RoIAlign ``RoiAlign``, polygon NMS plain tensor operators; no custom
operator). ``torch.export`` / the dynamo ONNX exporter were not used: they need every size
to be symbolic, and this graph has data-dependent sizes (``nonzero`` pairs, NMS output) and a
float64 floor in the resize rule, where a trace records them as they are.

Every export is checked against the eager model on sample images (:func:`check_parity`);
an export that fails is not written. Exports written before the heading have only the first
three outputs; :mod:`polydet.deploy.onnx_runtime` runs them with the heading unknown.
``DIR`` also gets ``classes.json``, ``config.json``
(the model section, classes and anchors it was built from) and ``export.json`` (format,
versions, the parity report).
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polydet.core.config import Config, to_dict
from polydet.core.errors import ModelError
from polydet.deploy.onnx_runtime import (
    INPUT,
    MODEL_FILE,
    OUTPUTS,
    OnnxModel,
    read_config,
    session,
    unpad,
)
from polydet.geometry.heading import UNKNOWN, heading_degrees, scale_first_corner
from polydet.geometry.polybox import hull_xyxy
from polydet.model import PolyDetector, load_model
from polydet.model.heading import predict_first_corner
from polydet.model.inference import (
    detect_batched,
    rpn_levels,
    select_proposals,
    to_input_pixels,
)

FORMATS = ("onnx", "torchscript")
FILES = {"onnx": MODEL_FILE, "torchscript": "model.ts"}
OPSET = 17
# Parity rule (tests and the export check): each eager detection scoring at least
# PARITY_MIN_SCORE has a match with the same label, polygon IoU >= PARITY_IOU and a score
# within PARITY_SCORE_TOL, and the same first_corner (no tolerance: the heading head's
# argmax on the same hull); detection counts per image differ by at most PARITY_COUNT.
PARITY_MIN_SCORE = 0.05
PARITY_IOU = 0.99
PARITY_SCORE_TOL = 1e-3
PARITY_COUNT = 1
# A missing detection whose score, or whose suppressor's IoU, is this close to the threshold
# that decided it is borderline (compare_detections), not a difference in the graph.
PARITY_BORDER = 1e-3
PARITY_SHOWN = 5  # failures listed in a parity report


class ParityError(ModelError):
    """An export whose detections differ from the eager model's (``.parity``: the report of
    :func:`compare_detections`); the message shows the failures, not the matches."""

    def __init__(self, path: Path, parity: dict[str, Any]) -> None:
        counts = ", ".join(
            f"{k} {parity.get(k)}"
            for k in ("checked", "unmatched", "borderline", "first_corner_mismatch",
                      "max_count_diff")
        )  # fmt: skip
        lines = [f"{path}: the export does not match the eager model ({counts})"]
        for f in parity.get("failures", []):
            closest = f.get("closest")
            near = (
                f"closest of its label: IoU {closest['iou']}, score {closest['score']}, "
                f"first corner {closest['first_corner']}"
                if closest
                else "nothing of its label"
            )
            lines.append(
                f"  image {f['image']}: {f['kind']} label {f['label']} score {f['score']} "
                f"first corner {f['first_corner']}; {near}"
            )
        super().__init__("\n".join(lines))
        self.parity = parity


class ExportableDetector(nn.Module):
    """``images [B, 3, H, W]`` in [0, 1] -> ``(polyboxes [B, K, 10], scores [B, K],
    labels [B, K], first_corner [B, K], heading [B, K])`` (module docstring); shares its
    modules (weights) with ``model``."""

    def __init__(self, model: PolyDetector) -> None:
        super().__init__()
        self.model = model
        self.register_buffer(
            "mean", torch.tensor(model.transform.image_mean, dtype=torch.float32)[:, None, None]
        )
        self.register_buffer(
            "std", torch.tensor(model.transform.image_std, dtype=torch.float32)[:, None, None]
        )

    def resize(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Normalised, resized and padded batch, the resized ``(h, w)`` and the input
        ``(h, w)`` (int64 ``[2]``): torchvision's test-time rule, as ``PolyDetector``."""
        cfg = self.model.cfg
        hw = torch._shape_as_tensor(images)[2:]  # traced, not a constant
        # torchvision's eager arithmetic: Python floats, i.e. float64 throughout, kept in
        # 1-D float64 tensors. The ONNX exporter types 0-d tensors as scalars and had cast
        # (160 / min side) to float32: 131 px x float32(160 / 131) floored to 159, not 160, a
        # different input to the whole model on a 97 x 131 image (tests/test_export.py).
        hw64 = hw.to(torch.float64)
        limits = torch.tensor([cfg.min_size, cfg.max_size], dtype=torch.float64)
        scale = (limits / hw64.sort().values).amin(0, keepdim=True)  # [1]
        new = torch.floor(hw64 * scale).to(torch.int64)
        x = (images - self.mean) / self.std
        divisor = self.model.transform.size_divisible
        pad = (new + divisor - 1) // divisor * divisor - new
        if torch.jit.is_tracing():
            size = (new[0], new[1])
            pads = (pad.new_zeros(()), pad[1], pad.new_zeros(()), pad[0])
        else:
            size = (int(new[0]), int(new[1]))
            pads = (0, int(pad[1]), 0, int(pad[0]))
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return F.pad(x, pads), new, hw

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        model, cfg = self.model, self.model.cfg
        batch, new, hw = self.resize(images)
        num_b = images.shape[0]
        sizes = new.to(torch.float32)[None].expand(num_b, 2)
        originals = hw.to(torch.float32)[None].expand(num_b, 2)
        features = model.backbone(batch)
        levels = rpn_levels(model.rpn, batch, model.rpn_features(features))
        boxes, _, _, valid = select_proposals(
            levels, sizes, model.rpn.coder, cfg.rpn.pre_nms_top_n_test,
            cfg.rpn.post_nms_top_n_test, cfg.rpn.score_thresh, cfg.rpn.nms_thresh,
        )  # fmt: skip
        poly, scores, labels, found, stage_first = detect_batched(
            model.roi_heads, features, boxes, valid, sizes, batch.shape[-2:]
        )
        out = to_input_pixels(poly, sizes, originals)
        unknown = torch.full_like(labels, UNKNOWN)
        if stage_first is None and model.roi_heads.heading is None:  # no heading head
            first = unknown
        else:
            if stage_first is not None:  # the quad stage's heading, model pixels
                first = stage_first
            else:  # as PolyRoIHeads.detect: the head on each detection's hull, model pixels
                first, _ = predict_first_corner(
                    model.roi_heads, features, hull_xyxy(poly), batch.shape[-2:]
                )
            first = torch.where(found, first, unknown)
            # Through the scale back to the input pixels, as eager mode does (which skips
            # it where the sizes match: so does this).
            ratio = originals.to(poly.dtype) / sizes.to(poly.dtype)  # [B, 2] (h, w)
            mapped = scale_first_corner(poly, out, first, ratio[:, 1:2], ratio[:, 0:1])
            first = torch.where((sizes == originals).all(-1)[:, None], first, mapped)
        return out, scores, labels, first, heading_degrees(out, first)


# --- running an export ------------------------------------------------------------------


class OnnxDetector(OnnxModel):
    """An exported ``model.onnx`` with :meth:`PolyDetector.predict`'s interface (torch
    tensors in and out) on ONNX Runtime: :class:`polydet.deploy.onnx_runtime.OnnxModel`, whose
    ``device`` picks the providers (CUDA first when present and allowed, else CPU)."""

    def predict(self, images: Sequence[Tensor]) -> list[dict[str, Tensor]]:
        """Per image ``{"polyboxes" [K, 10], "scores" [K], "labels" [K]}`` (padding dropped);
        images of the same size run as one batch."""
        arrays = [image.detach().float().cpu().numpy() for image in images]
        return [
            {k: torch.from_numpy(v.copy()) for k, v in det.items()} for det in self.detect(arrays)
        ]


# --- parity -------------------------------------------------------------------------------


def compare_detections(
    reference: Sequence[dict[str, Tensor]],
    other: Sequence[dict[str, Tensor]],
    score_thresh: float | None = None,
    nms_thresh: float | None = None,
) -> dict[str, Any]:
    """How far ``other`` is from ``reference`` (per image lists of detections): every
    reference detection scoring >= :data:`PARITY_MIN_SCORE` needs a detection of ``other``
    with the same label, polygon IoU >= :data:`PARITY_IOU` and a score within
    :data:`PARITY_SCORE_TOL`, and that match must have the same ``first_corner`` (the
    heading; -1 where a side has none); counts per image may differ by :data:`PARITY_COUNT`.

    A decision that sits on a threshold is not a difference in the graph: a missing
    detection is *borderline*, and excused, when its score is within :data:`PARITY_BORDER`
    of ``score_thresh`` or of :data:`PARITY_MIN_SCORE`, or when ``other`` has a
    higher-scoring detection of its label that overlaps it by an IoU within
    :data:`PARITY_BORDER` of ``nms_thresh`` (float rounding decided the suppression).

    Returns ``{"ok", "checked", "unmatched", "borderline", "first_corner_mismatch",
    "max_count_diff", "min_iou", "max_score_diff", "failures"}``: ``min_iou`` and
    ``max_score_diff`` over the matched detections, ``failures`` (at most
    :data:`PARITY_SHOWN`) what each unexcused miss or heading mismatch was: image, label,
    score, and the closest detection of its label on the other side (IoU, score)."""
    from polydet.geometry.ops import pairwise_iou

    checked = unmatched = border = mismatch = 0
    max_count, min_iou, max_score = 0, 1.0, 0.0
    failures: list[dict[str, Any]] = []
    lows = [PARITY_MIN_SCORE] + ([score_thresh] if score_thresh is not None else [])
    for n, (ref, oth) in enumerate(zip(reference, other, strict=True)):
        max_count = max(max_count, abs(len(ref["scores"]) - len(oth["scores"])))
        keep = ref["scores"] >= PARITY_MIN_SCORE
        rp, rs, rl = ref["polyboxes"][keep], ref["scores"][keep], ref["labels"][keep]
        rf = _first_corner(ref)[keep]
        checked += int(keep.sum())
        if rp.shape[0] == 0:
            continue
        op, os_, ol = oth["polyboxes"].cpu(), oth["scores"].cpu(), oth["labels"].cpu()
        of = _first_corner(oth)
        if op.shape[0]:
            iou = pairwise_iou(rp.cpu().double(), op.cpu().double()).float()
        else:
            iou = torch.zeros(rp.shape[0], 0)
        for i in range(rp.shape[0]):
            same = ol == rl[i]
            ok = same & ((os_ - rs[i]).abs() <= PARITY_SCORE_TOL)
            cand = torch.where(ok, iou[i], torch.zeros_like(iou[i]))
            best = int(cand.argmax()) if cand.numel() else -1
            if best >= 0 and bool(ok[best]) and float(cand[best]) >= PARITY_IOU:
                if int(of[best]) != int(rf[i]):
                    mismatch += 1
                    failures.append(_failure(n, i, rl, rs, rf, iou, same, os_, of, "heading"))
                min_iou = min(min_iou, float(cand[best]))
                max_score = max(max_score, abs(float(os_[best]) - float(rs[i])))
                continue
            near_low = any(abs(float(rs[i]) - t) <= PARITY_BORDER for t in lows)
            suppressor = same & (os_ > rs[i])
            near_nms = nms_thresh is not None and bool(
                (suppressor & ((iou[i] - nms_thresh).abs() <= PARITY_BORDER)).any()
            )
            if near_low or near_nms:
                border += 1
                continue
            unmatched += 1
            failures.append(_failure(n, i, rl, rs, rf, iou, same, os_, of, "missing"))
    return {
        "ok": unmatched == 0 and mismatch == 0 and max_count <= PARITY_COUNT,
        "checked": checked,
        "unmatched": unmatched,
        "borderline": border,
        "first_corner_mismatch": mismatch,
        "max_count_diff": max_count,
        "min_iou": min_iou,
        "max_score_diff": max_score,
        "failures": failures[:PARITY_SHOWN],
    }


def _failure(
    image: int, i: int, labels: Tensor, scores: Tensor, first: Tensor, iou: Tensor,
    same: Tensor, other_scores: Tensor, other_first: Tensor, kind: str,
) -> dict[str, Any]:  # fmt: skip
    """One line of :func:`compare_detections`' ``failures``."""
    row = torch.where(same, iou[i], torch.full_like(iou[i], -1.0)) if iou.shape[1] else iou[i]
    out: dict[str, Any] = {
        "kind": kind, "image": image, "label": int(labels[i]),
        "score": round(float(scores[i]), 6), "first_corner": int(first[i]),
    }  # fmt: skip
    if row.numel() and float(row.max()) >= 0:
        j = int(row.argmax())
        out["closest"] = {
            "iou": round(float(row[j]), 6),
            "score": round(float(other_scores[j]), 6),
            "first_corner": int(other_first[j]),
        }
    return out


def _first_corner(det: dict[str, Tensor]) -> Tensor:
    """``first_corner [K]`` of detections (int64 on the CPU), -1 where there is none."""
    first = det.get("first_corner")
    if first is None:
        return torch.full(det["scores"].shape, -1, dtype=torch.int64)
    return torch.as_tensor(first).cpu().long()


def sample_images(seed: int = 0) -> list[Tensor]:
    """Images for the export's own parity check: a few sizes and aspect ratios (the
    resize is part of the graph), smooth random patterns."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for h, w in ((256, 256), (200, 320), (97, 131)):
        coarse = torch.rand(1, 3, max(2, h // 16), max(2, w // 16), generator=g)
        smooth = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)[0]
        out.append((smooth + 0.1 * torch.rand(3, h, w, generator=g)).clamp(0, 1))
    return out


def check_parity(
    model: PolyDetector, predict: Callable[[list[Tensor]], list[dict[str, Tensor]]],
    images: Sequence[Tensor],
) -> dict[str, Any]:  # fmt: skip
    """:func:`compare_detections` of ``predict`` against the eager ``model.predict``, one
    image at a time (the exported graph takes one image size per batch)."""
    model.eval()
    eager, other = [], []
    for image in images:
        eager.extend(model.predict([image]))
        other.extend(predict([image]))
    eager = [{k: v.cpu() for k, v in d.items()} for d in eager]
    roi = model.cfg.roi
    return compare_detections(eager, other, roi.score_thresh, roi.nms_thresh)


# --- export --------------------------------------------------------------------------------


def _trace(wrapper: ExportableDetector, example: Tensor) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings of shape-only Python checks
        return torch.jit.trace(wrapper, (example,), check_trace=False)


def export_model(
    model: PolyDetector,
    out_dir: str | Path,
    fmt: str,
    classes: Sequence[str],
    anchors: dict[str, Any] | None = None,
    check_images: Sequence[Tensor] | None = None,
) -> dict[str, Any]:
    """Export ``model`` (eval mode, CPU) as ``fmt`` into ``out_dir``, check it against the
    eager model on ``check_images`` (default :func:`sample_images`) and write the metadata.
    Raises a :class:`ModelError` (and writes nothing) when the check fails. Returns the
    contents of ``export.json``."""
    if fmt not in FORMATS:
        raise ModelError(f"unknown export format {fmt!r} (expected one of {', '.join(FORMATS)})")
    out = Path(out_dir)
    model = model.cpu().eval()
    images = list(check_images) if check_images is not None else sample_images()
    wrapper = ExportableDetector(model).eval()
    model.predict(images[:1])  # sets RoIAlign's level scales before tracing
    example = images[0][None]
    tmp = out / f".{FILES[fmt]}.tmp"
    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        if fmt == "torchscript":
            _trace(wrapper, example).save(str(tmp))
            loaded = torch.jit.load(str(tmp))

            def run(batch: list[Tensor]) -> list[dict[str, Tensor]]:
                with torch.no_grad():
                    return unpad(loaded(torch.stack(batch)))
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    wrapper, (example,), str(tmp), dynamo=False, opset_version=OPSET,
                    input_names=[INPUT], output_names=list(OUTPUTS),
                    dynamic_axes={INPUT: {0: "batch", 2: "height", 3: "width"},
                                  **{o: {0: "batch"} for o in OUTPUTS}},
                )  # fmt: skip
            ort_session = session(tmp, device="cpu")  # as the eager model it is checked against

            def run(batch: list[Tensor]) -> list[dict[str, Tensor]]:
                raw = ort_session.run(list(OUTPUTS), {INPUT: torch.stack(batch).numpy()})
                return [{k: torch.from_numpy(v) for k, v in d.items()} for d in unpad(raw)]

        parity = check_parity(model, run, images)
    if not parity["ok"]:
        tmp.unlink(missing_ok=True)
        raise ParityError(out / FILES[fmt], parity)
    tmp.replace(out / FILES[fmt])
    classes = [str(c) for c in classes]
    (out / "classes.json").write_text(json.dumps(classes, indent=1) + "\n")
    config = {"model": to_dict(model.cfg), "classes": classes, "anchors": anchors or model.anchors}
    (out / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    import onnxruntime

    info = {
        "format": fmt,
        "file": FILES[fmt],
        "input": {"name": INPUT, "shape": ["B", 3, "H", "W"], "dtype": "float32", "range": [0, 1]},
        "outputs": {
            "polyboxes": ["B", model.cfg.roi.detections_per_img, 10],
            "scores": ["B", model.cfg.roi.detections_per_img],
            "labels": ["B", model.cfg.roi.detections_per_img],
            "first_corner": ["B", model.cfg.roi.detections_per_img],
            "heading": ["B", model.cfg.roi.detections_per_img],
        },
        "opset": OPSET if fmt == "onnx" else None,
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "parity": parity,
        "parity_images": [list(im.shape[-2:]) for im in images],
    }
    (out / "export.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def export(cfg: Config, model: str | None, fmt: str, out_dir: str | Path) -> dict[str, Any]:
    """``polydet export``: load ``model`` (a file, a ``models:/`` / ``runs:/`` URI, or
    ``None`` for ``{train.out}/model.pt``) and :func:`export_model` it."""
    from polydet.eval.evaluate import resolve_model

    path = resolve_model(cfg, model)
    net = load_model(path, device="cpu")
    classes = list(net.classes or cfg.data.classes)
    info = export_model(net, out_dir, fmt, classes)
    return {**info, "model": str(path), "out": str(Path(out_dir) / FILES[fmt])}


# --- the register stage ---------------------------------------------------------------------

REGISTRY_PARITY_IMAGES = 4  # images of the evaluation split the register stage checks on


@dataclass
class RegistryExport:
    """What the register stage logs about the ONNX export of the model it registers."""

    artifacts: dict[str, str]  # {"onnx": export directory}, or {} when not logged
    runtime: str  # the pyfunc's default runtime: "onnx" when the export is inside, else "torch"
    status: str  # the version's tag polydet.onnx: "parity ok" or "not logged: <why>"
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


def parity_images(cfg: Config) -> tuple[list[Tensor], str]:
    """The register stage's parity images and a description of them: up to
    :data:`REGISTRY_PARITY_IMAGES` prepared images of the evaluation split (``images.csv``,
    sorted by id), and one non-square :func:`sample_images` image (another input size: the
    resize is in the graph)."""
    import csv

    from polydet.data.dataset import load_image

    table = Path(cfg.data.out) / "images.csv"
    rows: list[dict[str, str]] = []
    if table.is_file():
        with table.open(newline="") as f:
            rows = [r for r in csv.DictReader(f) if r.get("split") == cfg.evaluate.split]
    paths = [Path(r["path"]) for r in sorted(rows, key=lambda r: r.get("image_id", ""))]
    paths = [p for p in paths if p.is_file()][:REGISTRY_PARITY_IMAGES]
    images = [load_image(p) for p in paths] + sample_images()[1:2]
    return images, f"{cfg.evaluate.split}:{len(paths)}+sample:1"


def export_for_registry(cfg: Config, model_path: str | Path, out_dir: str | Path) -> RegistryExport:
    """Export ``model_path`` to ONNX in ``out_dir`` and check it on :func:`parity_images`,
    for the register stage to log inside the pyfunc model.

    An export that fails the parity check (or cannot be made) is not logged: the model is
    then registered without it (default runtime ``torch``), with a warning on stderr and the
    reason in ``status``. The parity figures are returned either way, as metrics
    ``onnx/parity_<key>`` (``ok`` as 1/0) and ``onnx/export_seconds``."""
    started = time.perf_counter()
    images, described = parity_images(cfg)
    params = {"onnx.opset": str(OPSET), "onnx.parity_images": described}
    parity: dict[str, Any] | None = None
    error = ""
    try:
        net = load_model(model_path, device="cpu")
        classes = list(net.classes or cfg.data.classes)
        parity = export_model(net, out_dir, "onnx", classes, check_images=images)["parity"]
    except ParityError as e:
        parity, error = e.parity, f"failed the parity check against the eager model: {e}"
    except Exception as e:  # noqa: BLE001 - any failure of the export must not stop registering
        error = f"the export failed: {type(e).__name__}: {e}"
    metrics = {f"onnx/parity_{k}": float(v) for k, v in (parity or {}).items() if k != "failures"}
    metrics["onnx/export_seconds"] = round(time.perf_counter() - started, 3)
    if error:
        print(
            f"polydet register: warning: the ONNX export of {model_path} {error}; the model "
            "is registered without it (runtime torch only)",
            file=sys.stderr,
        )
        return RegistryExport({}, "torch", f"not logged: {error}"[:5000], params, metrics)
    return RegistryExport({"onnx": str(out_dir)}, "onnx", "parity ok", params, metrics)


__all__ = [
    "ExportableDetector",
    "OnnxDetector",
    "ParityError",
    "RegistryExport",
    "check_parity",
    "compare_detections",
    "export",
    "export_for_registry",
    "export_model",
    "parity_images",
    "read_config",
]
