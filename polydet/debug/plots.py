"""The drawings of the debugging report (:mod:`polydet.debug.report`): loss curves, matching and
encoding statistics, example images with anchors, proposals and detections, and crops of
the worst false positives and missed objects (PNG, matplotlib's object-oriented API)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from torchvision.ops import box_iou

from polydet.core.config import Config
from polydet.debug.analysis import IOU_BINS, TERMS, loss_terms, scaled_targets, smoothing_window
from polydet.eval.metrics import FP, FP_KINDS, GT_KINDS, Detections, Evaluation, GroundTruth
from polydet.geometry.polybox import hull_xyxy, scale, to_corners

# Crops of worst false positives and of missed objects drawn.
MAX_CROPS = 8
# Top proposals, and at most this many detections (best first), drawn per example image.
DRAWN_PROPOSALS = 10
DRAWN_DETECTIONS = 20
DRAWN_IMAGES = 8  # example images drawn (the statistics use all debug.num_images)

# --- drawing -----------------------------------------------------------------------------------


def _figure(w: float = 7.0, h: float = 4.5) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=100, layout="constrained")


def plot_losses(history: pd.DataFrame, path: Path) -> Path:
    """Each loss term over steps (train solid, validation dashed) and each term's share."""
    fig = _figure(8, 7)
    ax, ax2 = fig.subplots(2, 1, sharex=True)
    train = history[history["split"] == "train"].sort_values("step")
    val = history[history["split"] == "val"].sort_values("step")
    terms = loss_terms(history)
    cols = terms + (["loss"] if "loss" in history.columns else [])
    for k, c in enumerate(cols):
        color = f"C{k}"
        y = train[c].where(np.isfinite(train[c]))
        smooth = y.rolling(smoothing_window(len(train)), min_periods=1).mean()
        ax.plot(train["step"], y, color=color, alpha=0.25, lw=0.8)
        ax.plot(train["step"], smooth, color=color, lw=1.6, label=c)
        if len(val) and c in val.columns:
            ax.plot(val["step"], val[c], color=color, ls="--", marker="o", ms=3)
    positive = train[cols].to_numpy(np.float64)
    if np.isfinite(positive).any() and (positive[np.isfinite(positive)] > 0).all():
        ax.set_yscale("log")
    ax.set(ylabel="loss", title="Loss terms (train: solid, smoothed; validation: dashed)")
    ax.legend(fontsize="small", ncol=2)
    ax.grid(alpha=0.3)
    if terms:
        vals = np.nan_to_num(train[terms].to_numpy(np.float64), nan=0.0, posinf=0.0)
        tot = vals.sum(axis=1, keepdims=True)
        share = np.divide(vals, tot, out=np.zeros_like(vals), where=tot > 0)
        ax2.stackplot(train["step"], share.T, labels=terms, alpha=0.8)
        ax2.set(ylim=(0, 1), ylabel="share of total", xlabel="step", title="Share of each term")
        ax2.legend(fontsize="small", loc="upper right")
    fig.savefig(path)
    return path


def plot_matching(stats: dict[str, Any], path: Path) -> Path:
    """Positives per ground truth, best anchor IoU per ground truth, anchor IoU histograms."""
    fig = _figure(10, 7)
    (a, b), (c, d) = fig.subplots(2, 2)
    # Counts 0..29, then one bar for 30 or more (low-quality floods reach hundreds).
    npos = np.minimum([r["positives"] for r in stats["ground_truth_table"]], 30)
    hist = np.bincount(npos.astype(np.int64), minlength=31) if npos.size else np.zeros(31)
    a.bar(range(31), hist, color="C2")
    a.set_xticks([0, 10, 20, 30], ["0", "10", "20", "30+"])
    a.set(xlabel="positive anchors", ylabel="ground truths", title="Positives per ground truth")
    best = [r["best_anchor_iou"] for r in stats["ground_truth_table"]]
    b.hist(best, IOU_BINS, color="C1")
    for x, name in ((stats["bg_iou_thresh"], "bg"), (stats["fg_iou_thresh"], "fg")):
        b.axvline(x, color="k", ls="--", lw=1)
        b.text(x, b.get_ylim()[1] * 0.95, f" {name}", va="top")
    b.set(xlabel="best anchor IoU (hull)", ylabel="ground truths", title="Best anchor per object")
    h = stats["iou_histogram"]
    centres = (IOU_BINS[:-1] + IOU_BINS[1:]) / 2
    c.bar(centres, h["positive"], width=0.045, color="C2", label="positive")
    c.set(xlabel="IoU with best ground truth", ylabel="anchors", title="Positive anchors")
    d.bar(centres, h["negative"], width=0.045, color="C3", label="negative")
    d.set(xlabel="IoU with best ground truth", ylabel="anchors", title="Negative anchors")
    if sum(h["negative"]) > 0:
        d.set_yscale("log")
    fig.savefig(path)
    return path


def plot_encoding(stats: dict[str, Any], path: Path) -> Path:
    """Mean +- std of each encoded term, targets against predicted deltas, RPN and RoI."""
    fig = _figure(10, 6)
    axes = fig.subplots(2, 1, sharex=True)
    x = np.arange(10)
    for ax, (tkey, dkey), stage in zip(
        axes,
        (("encoded_rpn_targets", "rpn_deltas"), ("encoded_roi_targets", "roi_deltas")),
        ("RPN", "RoI"),
    ):
        for off, key, label in ((-0.15, tkey, "targets"), (0.15, dkey, "predicted")):
            s = stats[key]
            mean = np.array([np.nan if v is None else v for v in s["mean"]])
            std = np.array([np.nan if v is None else v for v in s["std"]])
            ax.errorbar(
                x + off, mean, yerr=std, fmt="o", capsize=3, label=f"{label} (n={s['count']})"
            )
        ax.axhline(0, color="k", lw=0.8)
        ax.axhspan(-1, 1, color="C2", alpha=0.08)
        ax.set(ylabel="value", title=f"{stage} encoding: mean +- std per term")
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
    axes[-1].set_xticks(x, TERMS)
    fig.savefig(path)
    return path


def plot_objectness(stats: dict[str, Any], path: Path) -> Path:
    """Histogram of the top-N proposals' objectness."""
    fig = _figure(6, 3.5)
    ax = fig.add_subplot()
    centres = (IOU_BINS[:-1] + IOU_BINS[1:]) / 2
    ax.bar(centres, stats["objectness"]["histogram"], width=0.045)
    ax.set(xlabel="objectness", ylabel="proposals", title=f"Top-{stats['top_n']} proposals")
    fig.savefig(path)
    return path


def _poly(ax: Any, polyboxes: Tensor, color: str, lw: float = 1.5, ls: str = "-") -> None:
    from matplotlib.patches import Polygon

    for c in to_corners(polyboxes.reshape(-1, 10).float()).numpy():
        ax.add_patch(Polygon(c, closed=True, fill=False, ec=color, lw=lw, ls=ls))


def _rect(ax: Any, boxes: Tensor, color: str, lw: float = 1.0, ls: str = "-") -> None:
    from matplotlib.patches import Rectangle

    for x0, y0, x1, y1 in boxes.reshape(-1, 4).tolist():
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec=color, lw=lw, ls=ls))


def draw_example(
    image: Tensor,
    gt: Tensor,
    best_anchors: Tensor,
    proposals: Tensor,
    detections: dict[str, Tensor],
    classes: Sequence[str],
    score_thresh: float,
    path: Path,
    title: str,
) -> Path:
    """One image ``[3, H, W]`` with ground truths (green), each one's best anchor (orange,
    dashed), top proposals (blue) and the best detections above ``score_thresh`` (red, at
    most ``DRAWN_DETECTIONS``); all in the image's pixels."""
    h, w = image.shape[-2:]
    fig = _figure(max(4.0, 6.0 * w / max(h, w)), max(4.0, 6.0 * h / max(h, w)))
    ax = fig.add_subplot()
    ax.imshow(image.permute(1, 2, 0).clamp(0, 1).numpy())
    _poly(ax, proposals, "tab:blue", lw=0.8)
    _rect(ax, best_anchors, "orange", lw=1.2, ls="--")
    _poly(ax, gt, "lime", lw=2.0)
    keep = torch.nonzero(detections["scores"] >= score_thresh).flatten()
    keep = keep[detections["scores"][keep].argsort(descending=True)[:DRAWN_DETECTIONS]]
    _poly(ax, detections["polyboxes"][keep], "red", lw=1.5)
    for p, s, lab in zip(
        detections["polyboxes"][keep], detections["scores"][keep], detections["labels"][keep]
    ):
        name = classes[int(lab) - 1] if 0 < int(lab) <= len(classes) else str(int(lab))
        ax.text(
            float(p[0]),
            float(p[1]),
            f"{name} {float(s):.2f}",
            color="red",
            fontsize=10,
            bbox={"facecolor": "white", "alpha": 0.7, "pad": 1, "edgecolor": "none"},
        )
    ax.set(xlim=(0, w), ylim=(h, 0), title=title)
    ax.axis("off")
    fig.savefig(path)
    return path


def draw_crops(
    crops: Sequence[tuple[Tensor, Tensor, Tensor, str]], path: Path, title: str
) -> Path | None:
    """A grid of crops ``(image [3,H,W], box [10] in red, context ground truths [G,10] in
    green, caption)`` around each box."""
    if not crops:
        return None
    cols = min(4, len(crops))
    rows = math.ceil(len(crops) / cols)
    fig = _figure(3.0 * cols, 3.2 * rows)
    fig.suptitle(title)
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax, (image, box, context, caption) in zip(axes, crops, strict=False):
        h, w = image.shape[-2:]
        x0, y0, x1, y1 = hull_xyxy(box.float()).tolist()
        m = max(24.0, 0.5 * max(x1 - x0, y1 - y0))
        ax.imshow(image.permute(1, 2, 0).clamp(0, 1).numpy())
        _poly(ax, context, "lime", lw=1.5)
        _poly(ax, box, "red", lw=2.0)
        ax.set(xlim=(max(0, x0 - m), min(w, x1 + m)), ylim=(min(h, y1 + m), max(0, y0 - m)))
        ax.set_title(caption, fontsize=8)
        ax.axis("off")
    for ax in axes[len(crops) :]:
        ax.axis("off")
    fig.savefig(path)
    return path


# --- the worst detections and the examples of the report ---------------------------------


def draw_examples(
    result: dict[str, Any],
    images: list[Tensor],
    targets: list[dict],
    records: Sequence[Any],
    classes: Sequence[str],
    cfg: Config,
    out: Path,
) -> list[Path]:
    """Example images with the best anchor of each ground truth and the top proposals
    (mapped back from the model's input pixels to the image's)."""
    paths = []
    (out / "examples").mkdir(exist_ok=True)
    gts = scaled_targets(targets, result["image_sizes"])
    for i, (image, rec) in enumerate(zip(images[:DRAWN_IMAGES], records)):
        s = result["image_sizes"][i]
        back = torch.tensor([1 / s["scale_x"], 1 / s["scale_y"]] * 2)
        anchors = result["anchors"][i].float()
        best = torch.zeros(0, 4)
        if gts[i].shape[0] and anchors.shape[0]:
            best = anchors[box_iou(hull_xyxy(gts[i]), anchors).argmax(dim=1)] * back
        order = result["proposal_scores"][i].argsort(descending=True)[:DRAWN_PROPOSALS]
        props = result["proposal_polyboxes"][i][order].float()
        props = scale(props, 1 / s["scale_x"], 1 / s["scale_y"]) if props.shape[0] else props
        name = rec.image_id.replace("/", "_")
        paths.append(
            draw_example(
                image,
                targets[i]["polyboxes"],
                best,
                props,
                result["detections"][i],
                classes,
                cfg.evaluate.score_thresh,
                out / "examples" / f"{i:02d}_{name}.png",
                rec.image_id,
            )
        )
    return paths


def draw_worst(
    evaluation: Evaluation,
    images: list[Tensor],
    gt: GroundTruth,
    dets: Detections,
    classes: Sequence[str],
    out: Path,
) -> tuple[Path | None, Path | None]:
    """Crops of the highest-scoring false positives and of missed ground truths."""

    def context(img: int) -> Tensor:
        return torch.from_numpy(gt.polyboxes[gt.image == img]).float()

    fp = np.flatnonzero(evaluation.det_outcome == FP)
    fp = fp[np.argsort(-dets.score[fp], kind="stable")][:MAX_CROPS]
    crops = []
    for k in fp:
        kind = evaluation.det_fp_kind[k]
        why = FP_KINDS[kind] if kind >= 0 else "below operating point"
        crops.append(
            (
                images[dets.image[k]],
                torch.from_numpy(dets.polyboxes[k]),
                context(int(dets.image[k])),
                f"{classes[dets.label[k]]} {dets.score[k]:.2f} ({why})",
            )
        )
    worst = draw_crops(crops, out / "worst_false_positives.png", "Highest-scoring false positives")
    missed = np.flatnonzero(evaluation.gt_kind > 0)[:MAX_CROPS]  # not "detected", not difficult
    crops = [
        (
            images[gt.image[k]],
            torch.from_numpy(gt.polyboxes[k]),
            context(int(gt.image[k])),
            f"{classes[gt.label[k]]}: {GT_KINDS[evaluation.gt_kind[k]]}",
        )
        for k in missed
    ]
    return worst, draw_crops(crops, out / "missed_objects.png", "Missed objects (red)")
