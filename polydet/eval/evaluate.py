"""The evaluation stage: a model's DOTA Task1 files, or any detector's, scored by polygon IoU.

``evaluate_model`` predicts on a split of the prepared dataset, writes the detections as
DOTA Task1 files and evaluates them *from those files*; ``evaluate_dota_dirs`` evaluates any
detector's Task1 files against DOTA ``labelTxt`` annotations. The metrics (DOTA Task1 AP,
VOC all-point, COCO-style AP by size, recall at precision, confusion) are defined and
computed in :mod:`polydet.eval.metrics`, the plots drawn by :mod:`polydet.eval.plots`; import
them from there. Files are parsed by :mod:`polydet.data.formats`.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from polydet.core.config import Config
from polydet.core.errors import DataError, ModelError
from polydet.core.files import write_text
from polydet.data import formats
from polydet.eval.metrics import (
    Detections,
    Evaluation,
    GroundTruth,
    evaluate_detections,
)
from polydet.eval.plots import plot_all
from polydet.geometry import polybox
from polydet.model.device import resolve_device

__all__ = [
    "detections_of",
    "evaluate_dota_dirs",
    "evaluate_model",
    "ground_truth_of",
    "load_checked_model",
    "load_dota_dirs",
    "load_split",
    "predict_records",
    "task1_detections",
    "resolve_model",
    "write_outputs",
]

# --- reading DOTA files --------------------------------------------------------------------------


_TASK1 = re.compile(r"^Task1_(.+)\.txt$")


def _corners_to_polyboxes(corners: np.ndarray) -> np.ndarray:
    """Corners ``[n, 8]`` -> polyboxes ``[n, 10]`` float64 with the corners *in the given
    order* (not canonical): the DOTA kit measures the polygon they trace, and so does the
    evaluation (``polydet.ops.pairwise_iou(..., mode="polygon")``)."""
    c = np.ascontiguousarray(corners, np.float64).reshape(-1, 4, 2)
    centre = c.mean(1)
    return np.concatenate([centre, (c - centre[:, None]).reshape(-1, 8)], 1)


def task1_detections(
    det_dir: Path, classes: Sequence[str], image_ids: Sequence[str], ann_dir: Path | None = None
) -> Detections:
    """Detections of ``classes`` from ``Task1_<class>.txt`` files (a missing file: none).

    Within a class, detections keep their line order (the kit's tie order relies on it). A
    detection on an image not in ``image_ids`` is an error naming the file and line.
    """
    iindex = {name: i for i, name in enumerate(image_ids)}
    d_img, d_lab, d_score, d_xy = [], [], [], []
    for c, name in enumerate(classes):
        path = Path(det_dir) / f"Task1_{name}.txt"
        if not path.is_file():
            continue
        ids, scores, corners = formats.read_task1_arrays(path)
        img = np.array([iindex.get(k, -1) for k in ids], np.int64)
        if (img < 0).any():
            k = int(np.argmax(img < 0))
            where = f"no annotation file in {ann_dir}" if ann_dir else "not an evaluated image"
            raise DataError(f"{path}:{k + 1}: image {ids[k]!r} has {where}")
        d_img.append(img)
        d_lab.append(np.full(len(ids), c, np.int64))
        d_score.append(scores)
        d_xy.append(corners)
    return Detections(
        image=np.concatenate(d_img) if d_img else np.zeros(0, np.int64),
        label=np.concatenate(d_lab) if d_lab else np.zeros(0, np.int64),
        score=np.concatenate(d_score) if d_score else np.zeros(0),
        polyboxes=_corners_to_polyboxes(np.concatenate(d_xy) if d_xy else np.zeros((0, 8))),
    )


def load_dota_dirs(
    det_dir: Path, ann_dir: Path, classes: Sequence[str] | None = None
) -> tuple[list[str], list[str], GroundTruth, Detections]:
    """Read DOTA ``labelTxt`` files and ``Task1_<class>.txt`` files into flat arrays.

    The images are the annotation files' stems (sorted); they are parsed by
    ``polydet.data.formats.read_dota_arrays`` as they are (no geometry checks, like the kit; a
    malformed line is a :class:`DataError` naming file and line, where the kit would skip
    or crash). ``classes=None``: every class named in an annotation or a Task1 file name.
    """
    det_dir, ann_dir = Path(det_dir), Path(ann_dir)
    for d in (det_dir, ann_dir):
        if not d.is_dir():
            raise DataError(f"{d}: not a directory")
    ann_files = sorted(ann_dir.glob("*.txt"))
    if not ann_files:
        raise DataError(f"{ann_dir}: no labelTxt (*.txt) files")
    image_ids = [p.stem for p in ann_files]
    img, names, corners, difficult = formats.read_dota_arrays(ann_files)
    for warning in annotation_warnings(ann_files, img, corners):
        print(f"polydet evaluate: warning: {warning}", file=sys.stderr)
    if classes is None:
        found = set(names) | {m.group(1) for p in det_dir.iterdir() if (m := _TASK1.match(p.name))}
        classes = sorted(found)
    classes = list(classes)
    cindex = {name: i for i, name in enumerate(classes)}
    label = np.array([cindex.get(n, -1) for n in names], np.int64)
    keep = label >= 0
    gt = GroundTruth(
        image=img[keep],
        label=label[keep],
        polyboxes=_corners_to_polyboxes(corners[keep]),
        difficult=difficult[keep],
        # DOTA lists each object from its head, and Task1 files each detection: the heading
        # of both is their first listed corner (README "Heading").
        first_corner=np.zeros(int(keep.sum()), np.int64),
    )
    dets = task1_detections(det_dir, classes, image_ids, ann_dir)
    dets = dataclasses.replace(dets, first_corner=np.zeros(dets.score.size, np.int64))
    return image_ids, classes, gt, dets


def annotation_warnings(
    ann_files: Sequence[Path], img: np.ndarray, corners: np.ndarray
) -> list[str]:
    """``file:line: ...`` for each ground truth whose quad is degenerate (zero area) or
    self-intersecting (a bow tie), as read by :func:`polydet.data.formats.read_dota_arrays`
    (``img [G]``, ``corners [G, 8]``). They are still scored as the DOTA kit scores them."""
    flags = polybox.check_corners(torch.from_numpy(corners).reshape(-1, 4, 2)).numpy()
    bad = np.flatnonzero(flags & (polybox.ZERO_AREA | polybox.SELF_INTERSECTING))
    out = []
    for i in bad:
        # The object's position within its file gives its line (read_dota keeps them).
        k = int(i - np.searchsorted(img, img[i]))
        path = ann_files[int(img[i])]
        line = formats.read_dota(path).objects[k].line
        what = "zero-area quad" if flags[i] & polybox.ZERO_AREA else "self-intersecting quad"
        out.append(f"{path}:{line}: {what}; scored as given, as the DOTA kit does")
    return out


def evaluate_dota_dirs(
    det_dir: Path | str,
    ann_dir: Path | str,
    classes: Sequence[str] | None = None,
    iou_threshold: float = 0.5,
) -> dict[str, Any]:
    """Evaluate any detector's DOTA Task1 files against DOTA ``labelTxt`` annotations.

    Returns the flat metrics (``map50``, ``ap50/<class>``, ...; module docstring). A class
    without a Task1 file has no detections (AP 0 if it has ground truth).
    """
    image_ids, classes, gt, dets = load_dota_dirs(Path(det_dir), Path(ann_dir), classes)
    return evaluate_detections(image_ids, classes, gt, dets, iou_threshold).metrics


# --- evaluating a model --------------------------------------------------------------------------


def resolve_model(cfg: Config, model: str | None) -> Path:
    """Model file: ``cfg.train.out/model.pt`` by default, a path, or a ``models:/``/``runs:/`` URI."""
    if model is None:
        path = Path(cfg.train.out) / "model.pt"
    elif model.startswith(("models:/", "runs:/")):
        from polydet.core.model_uri import resolve_model_path
        from polydet.core.store import get_tracking_uri

        path = Path(resolve_model_path(model, get_tracking_uri(cfg)))
    else:
        path = Path(model)
    if not path.is_file():
        raise ModelError(f"{path}: no such model file (train one with `polydet train`)")
    return path


def ground_truth_of(records: Sequence[Any]) -> GroundTruth:
    """Flat ground truths of ``polydet.data.dataset.Record`` s (image index = position)."""
    return GroundTruth(
        image=np.repeat(np.arange(len(records)), [len(r.labels) for r in records]).astype(np.int64),
        label=_cat([r.labels.numpy() - 1 for r in records], np.int64),
        polyboxes=_cat([r.polyboxes.double().numpy() for r in records], np.float64, 10),
        difficult=_cat([r.difficult.numpy() for r in records], bool),
        first_corner=_cat([r.first_corner.numpy() for r in records], np.int64),
    )


def detections_of(preds: Sequence[dict[str, torch.Tensor]]) -> Detections:
    """Flat detections of ``predict`` outputs, one per image (image index = position)."""
    return Detections(
        image=np.repeat(np.arange(len(preds)), [len(p["scores"]) for p in preds]).astype(np.int64),
        label=_cat([p["labels"].numpy() - 1 for p in preds], np.int64),
        score=_cat([p["scores"].double().numpy() for p in preds], np.float64),
        polyboxes=_cat([p["polyboxes"].double().numpy() for p in preds], np.float64, 10),
    )


def _cat(parts: list[np.ndarray], dtype: Any, width: int | None = None) -> np.ndarray:
    shape = (-1, width) if width else (-1,)
    if not parts:
        return np.zeros((0, width) if width else (0,), dtype)
    return np.concatenate([np.asarray(p).reshape(shape) for p in parts]).astype(dtype)


def load_split(cfg: Config, split: str) -> list[Any]:
    """Records of ``split`` of the prepared dataset (a :class:`DataError` when empty)."""
    from polydet.data.dataset import load_records

    records = load_records(cfg.data.out, split)
    if not records:
        raise DataError(f"{cfg.data.out}: split {split!r} has no images")
    bad = [r.image_id for r in records if not r.image_id or any(c.isspace() for c in r.image_id)]
    if bad:
        raise DataError(f"{cfg.data.out}/images.csv: image id {bad[0]!r} cannot be a Task1 id")
    return records


def load_checked_model(cfg: Config, path: Path) -> Any:
    """The model at ``path`` on ``cfg.train.device``, eval mode; its classes must be the data's."""
    from polydet.model import load_model

    net = load_model(path, device=resolve_device(cfg.train.device))
    if net.classes is not None and tuple(net.classes) != tuple(cfg.data.classes):
        raise ModelError(
            f"{path}: trained on classes {list(net.classes)}, "
            f"but data.classes is {list(cfg.data.classes)}"
        )
    return net


def predict_records(
    net: Any, records: Sequence[Any], batch_size: int
) -> tuple[dict[str, dict], int]:
    """``{image_id: predict output (CPU tensors)}`` for the records' images, and the number
    of detections dropped for a non-finite score or coordinate (a diverged model)."""
    from polydet.data.dataset import load_image

    preds: dict[str, dict] = {}
    dropped = 0
    if hasattr(net, "eval"):  # a torch module (an ONNX Runtime session has no mode)
        net.eval()
    for start in range(0, len(records), batch_size):
        batch = records[start : start + batch_size]
        images = [load_image(r.path, (r.width, r.height)) for r in batch]
        for r, p in zip(batch, net.predict(images)):
            p = {k: v.detach().cpu() for k, v in p.items()}
            ok = torch.isfinite(p["polyboxes"]).all(dim=1) & torch.isfinite(p["scores"])
            dropped += int((~ok).sum())
            preds[r.image_id] = {k: v[ok] for k, v in p.items()}
    return preds, dropped


def evaluate_model(cfg: Config, model: str | None = None, net: Any = None) -> dict[str, Any]:
    """Evaluate a model on ``cfg.evaluate.split`` of the prepared dataset ``cfg.data.out``.

    The predictions are written as DOTA Task1 files and evaluated *from those files*, so
    ``polydet evaluate --format dota`` on them gives the same numbers. Writes under
    ``cfg.evaluate.out``: ``metrics.json``, ``confusion.json``, ``pr.csv``,
    ``detections/Task1_<class>.txt`` and plots. Returns the metrics plus ``split``,
    ``model`` and ``out``.

    ``net``: another runtime of the model instead of the file ``model`` names, anything with
    ``predict(images)``, ``path`` and ``classes`` (``polydet evaluate --runtime onnx`` passes
    the export on ONNX Runtime, :class:`polydet.deploy.export.OnnxDetector`: the model as it
    ships, whose fixed-size graph takes no angle views).
    """
    ecfg = cfg.evaluate
    records = load_split(cfg, ecfg.split)
    from polydet.eval.tta import with_tta

    if net is not None:
        if net.classes is not None and list(net.classes) != list(cfg.data.classes):
            raise ModelError(
                f"{net.path}: made for classes {list(net.classes)}, "
                f"but data.classes is {list(cfg.data.classes)}"
            )
        path, net = net.path, with_tta(net, ecfg.tta)
    else:
        path = resolve_model(cfg, model)
        net = with_tta(load_checked_model(cfg, path), ecfg.tta)  # off unless tta.enabled
    preds, nonfinite = predict_records(net, records, ecfg.batch_size)
    out = Path(ecfg.out)
    classes = list(cfg.data.classes)
    det_dir = out / "detections"
    formats.write_task1(det_dir, preds, classes)
    image_ids = [r.image_id for r in records]
    dets = task1_detections(det_dir, classes, image_ids)
    if any("first_corner" in p for p in preds.values()):
        # The model predicts headings: its Task1 lines start at the predicted first corner.
        dets = dataclasses.replace(dets, first_corner=np.zeros(dets.score.size, np.int64))
    ev = evaluate_detections(
        image_ids,
        classes,
        ground_truth_of(records),
        dets,
        ecfg.iou_threshold,
        score_thresh=ecfg.score_thresh,
        size_bounds=ecfg.size_bounds,
        precision_targets=ecfg.precision_targets,
    )
    ev.metrics["num_nonfinite_detections"] = nonfinite  # left out: they would fail Task1
    ev.metrics["tta_views"] = len(getattr(net, "views", [None]))  # 1: the model alone
    write_outputs(ev, out)
    return {**ev.metrics, "split": ecfg.split, "model": str(path), "out": str(out)}


HEADLINE_METRICS = ("map50", "map75", "map50_95", "map_voc_all", "recall75")


def write_outputs(ev: Evaluation, out: Path) -> None:
    """``metrics.json``, ``confusion.json``, ``pr.csv`` and the plots of an evaluation."""
    out.mkdir(parents=True, exist_ok=True)
    # Atomic writes: a full disk or a read-only directory leaves the previous files whole.
    write_text(out / "metrics.json", json.dumps(ev.metrics, indent=2) + "\n")
    # The few numbers `dvc metrics show` / `dvc exp show` display (metrics.json is wide).
    headline = {k: ev.metrics[k] for k in HEADLINE_METRICS if k in ev.metrics}
    write_text(out / "headline.json", json.dumps(headline, indent=2) + "\n")
    names = [*ev.classes, "background"]
    write_text(
        out / "confusion.json",
        json.dumps(
            {
                "rows": names,
                "columns": [*ev.classes, "missed"],
                "matrix": ev.confusion.tolist(),
            },
            indent=2,
        )
        + "\n",
    )
    rows = ["class,score,precision,recall"]
    for name, cv in ev.curves.items():
        # Only the points where recall rises: the curve's vertices, at most one per object.
        step = np.flatnonzero(np.diff(np.r_[0.0, cv["recall"]]) > 0)
        rows += [
            f"{name},{cv['score'][i]:.6g},{cv['precision'][i]:.6g},{cv['recall'][i]:.6g}"
            for i in step
        ]
    write_text(out / "pr.csv", "\n".join(rows) + "\n")
    plot_all(ev, out)
