"""Prediction on image files: ``polydet predict IMAGE_OR_DIR --model PATH_OR_URI``.

``predict_paths`` runs a trained model (a file, or an MLflow ``models:/`` / ``runs:/`` URI) on
one image or every image of a directory and writes, under ``out_dir``:

* ``Task1_<class>.txt``: DOTA Task1 results (``image_id score x1 y1 ... x4 y4``), which
  ``polydet evaluate --format dota`` reads;
* ``detections.json``: per image its size, whether it was tiled, and each detection's class,
  score, polybox and corners;
* ``images/<image_id>.png``: the image with its polyboxes drawn.

Images larger than ``data.tile.size`` (when ``data.tile.enabled``: the model was then trained
on tiles of that size) are cut into the same overlapping tiles as ``polydet prepare`` cuts,
each tile is detected on its own and the detections are merged back with polygon NMS
(``evaluate.tile_merge``); images and tiles run in batches of ``evaluate.batch_size`` with
bounded memory (:mod:`polydet.deploy.batched`), through test-time augmentation when
``evaluate.tta.enabled`` (:mod:`polydet.eval.tta`).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw
from torch import Tensor

from polydet.core.config import Config, TileConfig
from polydet.core.errors import DataError, ModelError
from polydet.core.files import write_text
from polydet.data.formats import write_task1
from polydet.data.images import open_image, rgb_image
from polydet.deploy.batched import detect_stream, open_source, size_of
from polydet.eval.evaluate import resolve_model
from polydet.eval.tta import with_tta
from polydet.geometry import heading, polybox
from polydet.model import PolyDetector, load_model
from polydet.model.device import resolve_device

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
# Distinct outline colours, one per class (cycled).
PALETTE = [
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
]  # fmt: skip


def list_images(source: Path) -> list[Path]:
    """``source`` itself if it is a file, else the image files directly inside it (sorted)."""
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise DataError(f"{source}: no such image file or directory")
    found = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not found:
        raise DataError(f"{source}: no images ({', '.join(IMAGE_SUFFIXES)}) in this directory")
    return found


def _image_ids(paths: list[Path]) -> list[str]:
    """File stems (whitespace would break Task1 lines); full names where stems collide."""
    stems = [p.stem for p in paths]
    ids = [p.name if stems.count(p.stem) > 1 else p.stem for p in paths]
    return ["_".join(i.split()) for i in ids]


def detect(
    model: PolyDetector,
    image: Tensor,
    tile: TileConfig,
    score_thresh: float,
    batch_size: int = 8,
) -> tuple[dict[str, Tensor], int]:
    """Detections of one image ``[3, H, W]`` in its pixels, and the number of tiles used
    (:func:`polydet.deploy.batched.detect_stream`, merged at the model's ``roi.nms_thresh``)."""
    stream = detect_stream(model, [(0, image)], tile, score_thresh, batch_size,
                           model.cfg.roi.nms_thresh)  # fmt: skip
    _, det, n = next(iter(stream))
    return det, n


def draw(image_path: Path, det: dict[str, Tensor], classes: list[str], out: Path) -> Path:
    """Save ``image_path`` with the detections' polyboxes, classes and scores drawn."""
    with open_image(image_path) as im:  # as displayed, as the detections are
        canvas = im if im.mode == "RGB" else rgb_image(im)  # drawn on: no copy of a big image
        _draw(canvas, det, classes, out)
    return out


def _draw(canvas: Image.Image, det: dict[str, Tensor], classes: list[str], out: Path) -> None:
    pen = ImageDraw.Draw(canvas)
    width = max(1, round(max(canvas.size) / 256))
    corners = _corners(det).tolist()
    # Lowest score first so the most confident outlines end up on top.
    for i in reversed(range(len(corners))):
        label = int(det["labels"][i])
        colour = PALETTE[(label - 1) % len(PALETTE)]
        pts = [tuple(p) for p in corners[i]]
        pen.line([*pts, pts[0]], fill=colour, width=width)
        name = classes[label - 1] if 1 <= label <= len(classes) else str(label)
        pen.text(pts[0], f"{name} {float(det['scores'][i]):.2f}", fill=colour)
        if "first_corner" in det and int(det["first_corner"][i]) >= 0:
            # The heading: the first edge drawn thicker, a line from the centre to its middle.
            centre = tuple(det["polyboxes"][i, :2].tolist())
            mid = ((pts[0][0] + pts[1][0]) / 2, (pts[0][1] + pts[1][1]) / 2)
            pen.line([pts[0], pts[1]], fill=colour, width=3 * width)
            pen.line([centre, mid], fill=colour, width=width)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out, format="PNG")


def predict_paths(
    cfg: Config,
    input: Path,
    model: str | None = None,
    out_dir: Path = Path("outputs/predict"),
    score_thresh: float = 0.3,
    runtime: str = "torch",
) -> dict[str, Any]:
    """Detect polyboxes in an image or a directory of images; write Task1, JSON and PNGs.

    ``model``: a model file, a ``models:/NAME@ALIAS`` / ``runs:/`` URI, or ``None`` for
    ``{train.out}/model.pt``; with ``runtime="onnx"``, a directory written by ``polydet
    export --format onnx`` (or its ``model.onnx``) or a registered model's URI (its logged
    export), run on ONNX Runtime (:class:`polydet.deploy.export.OnnxDetector`, providers for
    ``train.device``). Only detections scoring at least
    ``score_thresh`` are kept.
    Returns a JSON-able summary (counts per class, files written).
    """
    started = time.perf_counter()
    paths = list_images(Path(input))
    if runtime == "onnx":
        from polydet.deploy.export import OnnxDetector
        from polydet.deploy.onnx_runtime import export_dir

        if model is None:
            raise ModelError("--runtime onnx needs --model DIR (the output of `polydet export`)")
        net: Any = OnnxDetector(export_dir(model), device=cfg.train.device)
        model_path, device = net.path, torch.device("cpu")  # ONNX Runtime copies the input
    elif runtime == "torch":
        model_path = resolve_model(cfg, model)
        device = resolve_device(cfg.train.device)
        net = load_model(model_path, device=device)
    else:
        raise ModelError(f"unknown runtime {runtime!r} (expected torch or onnx)")
    classes = list(net.classes or cfg.data.classes)
    net = with_tta(net, cfg.evaluate.tta)
    out_dir = Path(out_dir)

    detections: dict[str, dict[str, Tensor]] = {}
    records: list[dict[str, Any]] = []
    tiled = 0
    skipped: list[dict[str, str]] = []
    where: dict[str, tuple[Path, int, int]] = {}

    def images() -> Any:  # each image open until its last tile is cut
        for path, image_id in zip(paths, _image_ids(paths)):
            try:
                with open_source(path) as image:
                    where[image_id] = (path, *size_of(image))
                    yield image_id, image
            except DataError as e:  # one bad file (a text file named .png) skips that file
                if len(paths) == 1:
                    raise
                print(f"polydet predict: warning: skipped {e}", file=sys.stderr)
                skipped.append({"path": str(path), "reason": str(e)})

    ecfg = cfg.evaluate
    merge = ecfg.tile_merge == "class_agnostic"
    stream = detect_stream(net, images(), cfg.data.tile, score_thresh, ecfg.batch_size,
                           net.cfg.roi.nms_thresh, merge, cfg.train.amp)  # fmt: skip
    for image_id, det, n_tiles in stream:
        path, w, h = where.pop(image_id)
        tiled += n_tiles > 1
        detections[image_id] = det
        draw(path, det, classes, out_dir / "images" / f"{image_id}.png")
        records.append(_record(image_id, path, (w, h), det, classes, n_tiles))

    if not records:
        raise DataError(f"{input}: none of the {len(paths)} images could be read")
    task1 = write_task1(out_dir, detections, classes)
    per_class = {c: 0 for c in classes}
    for det in detections.values():
        for label in det["labels"].tolist():
            per_class[classes[label - 1]] += 1
    summary = {
        "model": str(model_path),
        "device": str(device),
        "runtime": runtime,
        **({"provider": net.provider} if runtime == "onnx" else {}),
        "images": len(records),
        "skipped": skipped,
        "tiled_images": tiled,
        "detections": sum(per_class.values()),
        "per_class": per_class,
        "score_thresh": score_thresh,
        "seconds": round(time.perf_counter() - started, 3),
        "out": str(out_dir),
        "task1": [str(p) for p in task1],
        "json": str(out_dir / "detections.json"),
        "drawn": str(out_dir / "images"),
    }
    doc = {"summary": summary, "classes": classes, "images": records}
    write_text(out_dir / "detections.json", json.dumps(doc, indent=1) + "\n")
    return summary


def _record(
    image_id: str,
    path: Path,
    size: tuple[int, int],
    det: dict[str, Tensor],
    classes: list[str],
    n_tiles: int,
) -> dict[str, Any]:
    corners = _corners(det).tolist()
    first = det.get("first_corner")
    head = (
        heading.heading_degrees(det["polyboxes"].double(), first).tolist()
        if first is not None
        else None
    )
    return {
        "image_id": image_id,
        "path": str(path),
        "width": size[0],
        "height": size[1],
        "tiles": n_tiles,
        "detections": [
            {
                "label": int(label),
                "class": classes[int(label) - 1],
                "score": round(float(score), 6),
                "polybox": [round(v, 3) for v in box],
                "corners": [[round(x, 3), round(y, 3)] for x, y in c],
                **(
                    {"first_corner": int(first[i]), "heading": round(float(head[i]), 2)}
                    if head is not None and int(first[i]) >= 0
                    else {}
                ),
            }
            for i, (label, score, box, c) in enumerate(
                zip(
                    det["labels"].tolist(),
                    det["scores"].tolist(),
                    det["polyboxes"].tolist(),
                    corners,
                )
            )
        ],
    }


def _corners(det: dict[str, Tensor]) -> Tensor:
    """Corners ``[K, 4, 2]`` float64 of the detections: canonical, or from the predicted first
    corner on (the heading) when the model predicts one, as DOTA lists them."""
    corners = polybox.to_corners(det["polyboxes"].double())
    if "first_corner" in det:
        corners = heading.start_at_first(corners, det["first_corner"])
    return corners
