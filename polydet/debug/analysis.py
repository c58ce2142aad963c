"""The analysis behind the debugging report (:mod:`polydet.debug.report`): tensors, ``inspect``
dicts and tables in, numbers and :class:`Finding` s out, testable without a trained model.

- :func:`analyze_losses`: each loss term of ``history.csv`` early / late / best, its share
  of the total; non-finite, dominating, rising, stalled losses and overfitting.
- :func:`analyze_matching`: positive anchors and best anchor IoU per ground truth, anchor
  IoU histograms, RPN recall of the top-N proposals, objectness collapse.
- :func:`analyze_encoding`: mean and std of the 10 encoded target terms and predicted
  deltas of positive anchors and RoIs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from torchvision.ops import box_iou

from polydet.core.errors import DataError
from polydet.geometry.polybox import hull_xyxy, scale

# Names of the 10 polybox terms, in order (encoded terms keep the positions).
TERMS = ("xc", "yc", "dx1", "dy1", "dx2", "dy2", "dx3", "dy3", "dx4", "dy4")
ENCODING_GROUPS = {
    "encoded_rpn_targets": "RPN targets (positive anchors)",
    "rpn_deltas": "RPN predicted deltas (positive anchors)",
    "encoded_roi_targets": "RoI targets (positive RoIs)",
    "roi_deltas": "RoI predicted deltas (positive RoIs)",
}
IOU_BINS = np.linspace(0.0, 1.0, 21)
# Ground truths listed by name in the findings / report (the counts cover all of them).
MAX_LISTED = 20
Severity = Literal["error", "warning", "info"]


@dataclass(frozen=True)
class Thresholds:
    """Limits of the automatic findings (defaults chosen for Faster R-CNN-style training)."""

    dominant_share: float = 0.8  # one loss term above this share of the total
    rising_ratio: float = 1.5  # late loss mean above this x its best smoothed value
    stalled_ratio: float = 0.95  # late / early total loss above this = not learning
    min_steps: int = 20  # fewer logged steps: no trend findings
    min_positives_per_gt: float = 2.0  # median positive anchors per ground truth
    min_positives_per_image: float = 8.0  # mean over images with objects
    max_positive_share: float = 0.25  # positives above this share of an image's anchors
    target_mean_max: float = 1.0  # |mean| of an encoded target term
    target_std_min: float = 0.05  # std of an encoded target term: unit mistakes are 10x off
    target_std_max: float = 5.0
    delta_std_ratio_max: float = 10.0  # predicted deltas' std / targets' std
    collapse_low: float = 0.05  # objectness "near 0"
    collapse_high: float = 0.99  # objectness "near 1"
    collapse_share: float = 0.95  # share of top proposals near 0 (or 1) to call a collapse
    min_rpn_recall: float = 0.5  # at IoU 0.5 by the top-N proposals
    min_samples: int = 10  # fewer values: no statistics finding


@dataclass(frozen=True)
class Finding:
    """One flagged pathology: a stable ``code``, how bad, what it means, the numbers."""

    code: str
    severity: Severity
    message: str
    evidence: dict[str, Any] = field(default_factory=dict)


def _target_mean_finding(stage: str, s: dict[str, Any], biased: list[str], limit: float) -> Finding:
    """Off-centre encoded targets: what was measured, and what to try.

    Centre terms off zero point at the references or the coder (actionable: a warning).
    Corner terms alone off zero, with a centred centre, come from the encoding itself (for a
    rotated object the corners lie away from the reference box's own corners): a note.
    """
    n = s["count"] - s["nonfinite"]
    means = ", ".join(f"{t} {s['mean'][TERMS.index(t)]:+.2f}" for t in biased)
    measured = (
        f"{stage}: the mean encoded regression target over {n} positive samples is "
        f"{means} (flagged when |mean| > {limit}); the regressor must first learn that "
        "constant shift."
    )
    evidence = {"stage": stage, "terms": biased, "mean": s["mean"], "samples": n}
    if {"xc", "yc"} & set(biased):
        return Finding(
            "target_mean",
            "warning",
            measured + " Try: compare the anchors with the objects (anchors report: fitted "
            "sizes and aspect ratios, coverage), and check the coder on one object (encode "
            "then decode must give it back; an offset left in pixels or a sign flip shows).",
            evidence,
        )
    return Finding(
        "target_mean",
        "info",
        measured + " Only corner terms are off while the centre is centred: this comes from "
        "the encoding (corners relative to the reference box's own corners are offset for "
        "any rotated object), not from a bug. Try: the coder's corner weights or the "
        "stage's polybox loss_weight if the polybox loss stalls; otherwise nothing to fix.",
        evidence,
    )


# --- the dataset ------------------------------------------------------------------------------


def dataset_findings(
    objects_per_split: dict[str, int], images_per_split: dict[str, int]
) -> list[Finding]:
    """A dataset without objects (or a split without them) teaches only "background"."""
    empty = [s for s, n in images_per_split.items() if n and not objects_per_split.get(s)]
    if not empty:
        return []
    total = sum(objects_per_split.values())
    if total == 0 or "train" in empty:
        what = "the dataset has no objects at all" if total == 0 else "the train split has none"
        return [
            Finding(
                "no_objects",
                "error",
                f"{what}: every training image is background, so the detector can only learn "
                "to find nothing. Check data.classes and the label files (the prepare stage's "
                "import_issues.txt lists what was dropped).",
                {"objects_per_split": objects_per_split, "images_per_split": images_per_split},
            )
        ]
    return [
        Finding(
            "split_without_objects",
            "warning",
            f"split(s) {', '.join(empty)} have images but no objects: their losses and AP "
            "say nothing about detection.",
            {"objects_per_split": objects_per_split, "images_per_split": images_per_split},
        )
    ]


# --- loss design -----------------------------------------------------------------------------


def read_history(path: Path) -> pd.DataFrame | None:
    """``history.csv`` as a table (``None`` when absent or empty: a run that died before its
    first step). Missing columns are tolerated: ``split`` defaults to ``train``; loss
    columns are numeric (NaN/inf kept)."""
    if not path.is_file():
        return None
    try:
        df = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read training history ({e})") from e
    if "step" not in df.columns:
        raise DataError(f"{path}: no 'step' column (columns: {list(df.columns)})")
    if "split" not in df.columns:
        df["split"] = "train"
    for c in df.columns:
        if c == "loss" or c.startswith("loss_") or c in ("step", "lr", "epoch"):
            df[c] = pd.to_numeric(df[c], errors="coerce")
    return df


def loss_terms(history: pd.DataFrame) -> list[str]:
    """The loss component columns (``loss_*``), in file order."""
    return [c for c in history.columns if c.startswith("loss_")]


def smoothing_window(n: int) -> int:
    """Rolling-mean window for a loss curve of ``n`` points (a tenth of them, at least 1)."""
    return max(1, n // 10)


def analyze_losses(
    history: pd.DataFrame | None, nonfinite: dict | None, th: Thresholds = Thresholds()
) -> tuple[dict[str, Any], list[Finding]]:
    """Per loss term: early / late / best smoothed means and late share of the total; findings
    for non-finite values, a dominating term, a rising term, a stalled total, overfitting."""
    findings: list[Finding] = []
    stats: dict[str, Any] = {"available": history is not None}
    if nonfinite is not None:
        terms = nonfinite.get("nonfinite_terms") or nonfinite.get("terms") or nonfinite.get("term")
        terms = [terms] if isinstance(terms, str) else list(terms or [])
        ids = [str(i) for i in nonfinite.get("image_ids", [])]
        stats["nonfinite"] = {"step": nonfinite.get("step"), "terms": terms, "image_ids": ids}
        findings.append(
            Finding(
                "nonfinite_loss",
                "error",
                f"training stopped on a non-finite loss at step {nonfinite.get('step')}: "
                f"{', '.join(terms) or 'total'}, on images {', '.join(ids[:8]) or '?'}. Look "
                "for degenerate boxes in those images, a learning rate too high for the "
                "warm-up, or targets far from unit scale (Encoding).",
                stats["nonfinite"],
            )
        )
    if history is None:
        findings.append(
            Finding("no_history", "info", "no training history found: loss sections skipped")
        )
        return stats, findings
    train = history[history["split"] == "train"].sort_values("step")
    val = history[history["split"] == "val"].sort_values("step")
    terms = loss_terms(history)
    total = "loss" if "loss" in history.columns else None
    stats.update({"train_steps": int(len(train)), "val_points": int(len(val)), "terms": {}})
    cols = terms + ([total] if total else [])
    # Non-finite values logged in the history itself.
    if nonfinite is None and len(train):
        bad = ~np.isfinite(train[cols].to_numpy(np.float64))
        if bad.any():
            r, c = np.argwhere(bad)[0]
            step = int(train["step"].iloc[r])
            findings.append(
                Finding(
                    "nonfinite_loss",
                    "error",
                    f"{cols[c]} is not finite at step {step} of history.csv",
                    {"step": step, "terms": [cols[c]]},
                )
            )
    n = len(train)
    if n == 0:
        return stats, findings
    w = smoothing_window(n)
    late_total = 0.0
    for c in cols:
        x = train[c].to_numpy(np.float64)
        x = np.where(np.isfinite(x), x, np.nan)
        smooth = pd.Series(x).rolling(w, min_periods=1).mean().to_numpy()
        best = int(np.nanargmin(smooth)) if np.isfinite(smooth).any() else 0
        s = {
            "early": _nanmean(x[:w]),
            "late": _nanmean(x[-w:]),
            "best": float(smooth[best]) if np.isfinite(smooth[best]) else None,
            "best_step": int(train["step"].iloc[best]),
        }
        if len(val) and c in val.columns:
            v = val[c].to_numpy(np.float64)
            s["val_first"], s["val_last"] = _finite_or_none(v[0]), _finite_or_none(v[-1])
            s["val_best"] = _nanmin(v)
        stats["terms"][c] = s
        if c != total:
            late_total += s["late"] or 0.0
    for c in terms:
        late = stats["terms"][c]["late"] or 0.0
        stats["terms"][c]["late_share"] = late / late_total if late_total > 0 else None
    if len(terms) >= 2 and late_total > 0:
        top = max(terms, key=lambda c: stats["terms"][c]["late_share"] or 0.0)
        share = stats["terms"][top]["late_share"]
        if share > th.dominant_share:
            findings.append(
                Finding(
                    "loss_dominant",
                    "warning",
                    f"{top} makes {share:.0%} of the loss late in training: the other terms "
                    "barely steer the gradient. Check its scale (coder weights, the "
                    "normalisation by sampled anchors) or reweight the terms.",
                    {"term": top, "share": share},
                )
            )
    # The quad stage learns from the first stage's output: its positives are the first
    # stage's quads within polygon IoU 0.5 of an object, few early in training and up to half
    # of its samples later, and its losses are sums over positives divided by the samples. So
    # they rise while the first stage improves: a note with the reason, not a divergence.
    quad_stage = "loss_quad_polybox" in cols and bool(
        np.nanmax(np.abs(train["loss_quad_polybox"].to_numpy(np.float64)), initial=0.0) > 0
    )
    cascade = {"loss_quad_classifier", "loss_quad_polybox", "loss_heading"} if quad_stage else set()
    if n >= th.min_steps:
        for c in cols:
            s = stats["terms"][c]
            if c in cascade and s["best"] and s["late"] and s["late"] > th.rising_ratio * s["best"]:
                findings.append(
                    Finding(
                        "cascade_loss_rising",
                        "info",
                        f"{c} rose to {s['late']:.4g} over the last {w} steps from "
                        f"{s['best']:.4g} at step {s['best_step']}: a quad-stage term, whose "
                        "positives (first-stage quads within IoU 0.5 of an object) grow in "
                        "number as the first stage learns; judge it by the evaluation's AP75.",
                        {"term": c, "late": s["late"], "best": s["best"]},
                    )
                )
                continue
            if s["best"] and s["late"] and s["late"] > th.rising_ratio * s["best"]:
                findings.append(
                    Finding(
                        "loss_rising",
                        "warning",
                        f"{c} is diverging: {s['late']:.4g} over the last {w} steps against "
                        f"{s['best']:.4g} at step {s['best_step']}. A learning rate too "
                        "high, or a term with exploding targets.",
                        {"term": c, "late": s["late"], "best": s["best"]},
                    )
                )
        if total:
            s = stats["terms"][total]
            if s["early"] and s["late"] is not None and s["late"] > th.stalled_ratio * s["early"]:
                findings.append(
                    Finding(
                        "loss_stalled",
                        "warning",
                        f"the total loss is not decreasing ({s['early']:.4g} -> "
                        f"{s['late']:.4g} over {n} logged steps): check the learning rate, "
                        "the matching (positives per ground truth) and the encoding.",
                        {"early": s["early"], "late": s["late"]},
                    )
                )
            if len(val) >= 3 and total in val.columns:
                v = val[total].to_numpy(np.float64)
                vbest = _nanmin(v)
                if vbest and v[-1] > 1.2 * vbest and (s["late"] or 0) < (s["early"] or 0):
                    findings.append(
                        Finding(
                            "overfitting",
                            "info",
                            f"validation loss rose from {vbest:.4g} to {v[-1]:.4g} while "
                            "the training loss fell: more data or augmentation, fewer epochs.",
                            {"val_best": vbest, "val_last": float(v[-1])},
                        )
                    )
    return stats, findings


def _nanmean(x: np.ndarray) -> float | None:
    x = x[np.isfinite(x)]
    return float(x.mean()) if x.size else None


def _nanmin(x: np.ndarray) -> float | None:
    x = x[np.isfinite(x)]
    return float(x.min()) if x.size else None


def _finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


# --- matching and IoU ----------------------------------------------------------------------


def scaled_targets(targets: Sequence[dict], image_sizes: Sequence[dict]) -> list[Tensor]:
    """Ground-truth polyboxes ``[G, 10]`` in the model's input pixels (as the model scales)."""
    out = []
    for t, s in zip(targets, image_sizes):
        p = t["polyboxes"].float()
        if (s["scale_x"], s["scale_y"]) != (1.0, 1.0):
            p = scale(p, s["scale_x"], s["scale_y"])
        out.append(p)
    return out


def analyze_matching(
    inspect: dict[str, Any],
    targets: Sequence[dict],
    fg_iou_thresh: float,
    bg_iou_thresh: float,
    top_n: int,
    image_ids: Sequence[str] | None = None,
    classes: Sequence[str] | None = None,
    th: Thresholds = Thresholds(),
) -> tuple[dict[str, Any], list[Finding]]:
    """Anchor matching, proposal recall and objectness of an ``inspect`` result.

    ``targets``: per image ``{"polyboxes" [G, 10] (input image pixels), "labels" [G]}``
    (optionally ``"difficult" [G]``), the ones given to ``inspect``.
    """
    from polydet.geometry.ops import pairwise_iou

    n_img = len(inspect["anchors"])
    image_ids = list(image_ids or [str(i) for i in range(n_img)])
    gts = scaled_targets(targets, inspect["image_sizes"])
    pos_per_gt, best_iou, per_image, gt_rows = [], [], [], []
    pos_ious, neg_ious, scores = [], [], []
    recall_hits = {"poly@0.5": 0, "poly@0.7": 0, "hull@0.5": 0, "hull@0.7": 0}
    num_eval_gt = 0
    for i in range(n_img):
        anchors = inspect["anchors"][i].float()
        labels = inspect["anchor_labels"][i]
        matched = inspect["matched_gt"][i].long()
        ious = inspect["anchor_ious"][i].float()
        gt = gts[i]
        pos = labels == 1
        pos_ious.append(ious[pos])
        neg_ious.append(ious[labels == 0])
        per_image.append(
            {
                "image_id": image_ids[i],
                "ground_truths": int(gt.shape[0]),
                "positives": int(pos.sum()),
                "negatives": int((labels == 0).sum()),
                "ignored": int((labels == -1).sum()),
                "anchors": int(anchors.shape[0]),
                "proposals": int(inspect["proposals"][i].shape[0]),
                "recall@0.5": None,
            }
        )
        order = inspect["proposal_scores"][i].float().argsort(descending=True)[:top_n]
        scores.append(inspect["proposal_scores"][i].float()[order])
        if gt.shape[0] == 0:
            continue
        hull = hull_xyxy(gt)
        quality = box_iou(hull, anchors)  # [G, A]: what the RPN's matcher sees
        best = quality.max(dim=1).values if anchors.shape[0] else torch.zeros(gt.shape[0])
        npos = torch.bincount(matched[pos], minlength=gt.shape[0])[: gt.shape[0]]
        pos_per_gt.append(npos)
        best_iou.append(best)
        # Sizes back in the original image's pixels (what the user annotated).
        sx, sy = inspect["image_sizes"][i]["scale_x"], inspect["image_sizes"][i]["scale_y"]
        w = ((hull[:, 2] - hull[:, 0]) / sx).tolist()
        h = ((hull[:, 3] - hull[:, 1]) / sy).tolist()
        lab = targets[i]["labels"].tolist()
        for g in range(gt.shape[0]):
            gt_rows.append(
                {
                    "image_id": image_ids[i],
                    "index": g,
                    "class": classes[lab[g] - 1] if classes else int(lab[g]),
                    "width": round(w[g], 1),
                    "height": round(h[g], 1),
                    "aspect": round(h[g] / w[g], 3) if w[g] > 0 else None,
                    "best_anchor_iou": round(float(best[g]), 4),
                    "positives": int(npos[g]),
                }
            )
        # RPN recall by the top-N test-time proposals (non-difficult ground truths).
        keep = ~targets[i].get("difficult", torch.zeros(gt.shape[0], dtype=torch.bool)).bool()
        num_eval_gt += int(keep.sum())
        props = inspect["proposal_polyboxes"][i].float()[order]
        boxes = inspect["proposals"][i].float()[order]
        if props.shape[0] and keep.any():
            poly = pairwise_iou(props, gt[keep]).max(dim=0).values
            hb = box_iou(boxes, hull[keep]).max(dim=0).values
            for t in (0.5, 0.7):
                recall_hits[f"poly@{t}"] += int((poly >= t).sum())
                recall_hits[f"hull@{t}"] += int((hb >= t).sum())
            per_image[-1]["recall@0.5"] = float((poly >= 0.5).float().mean())
        elif keep.any():
            per_image[-1]["recall@0.5"] = 0.0

    npos = torch.cat(pos_per_gt) if pos_per_gt else torch.zeros(0, dtype=torch.long)
    best = torch.cat(best_iou) if best_iou else torch.zeros(0)
    pos_iou, neg_iou = torch.cat(pos_ious), torch.cat(neg_ious)
    top_scores = torch.cat(scores) if scores else torch.zeros(0)
    with_gt = [r for r in per_image if r["ground_truths"] > 0]
    stats: dict[str, Any] = {
        "images": n_img,
        "ground_truths": int(npos.numel()),
        "fg_iou_thresh": fg_iou_thresh,
        "bg_iou_thresh": bg_iou_thresh,
        "positives_per_image": _mean_or_none([r["positives"] for r in with_gt]),
        "positives_per_gt": {
            "mean": _mean_or_none(npos.tolist()),
            "median": float(npos.float().median()) if npos.numel() else None,
            "min": int(npos.min()) if npos.numel() else None,
            "max": int(npos.max()) if npos.numel() else None,
        },
        "best_anchor_iou": {
            "mean": _mean_or_none(best.tolist()),
            "min": float(best.min()) if best.numel() else None,
            "below_fg": int((best < fg_iou_thresh).sum()),
            "below_bg": int((best < bg_iou_thresh).sum()),
        },
        "iou_histogram": {
            "bins": IOU_BINS.tolist(),
            "positive": np.histogram(pos_iou.numpy(), IOU_BINS)[0].tolist(),
            "negative": np.histogram(neg_iou.numpy(), IOU_BINS)[0].tolist(),
        },
        "rpn_recall": {
            k: (v / num_eval_gt if num_eval_gt else None) for k, v in recall_hits.items()
        },
        "top_n": top_n,
        "objectness": {
            "mean": _mean_or_none(top_scores.tolist()),
            "share_low": float((top_scores < th.collapse_low).float().mean())
            if top_scores.numel()
            else None,
            "share_high": float((top_scores > th.collapse_high).float().mean())
            if top_scores.numel()
            else None,
            "histogram": np.histogram(top_scores.numpy(), IOU_BINS)[0].tolist(),
        },
        "per_image": per_image,
        "ground_truth_table": gt_rows,
    }
    return stats, _matching_findings(stats, gt_rows, with_gt, th)


def _mean_or_none(x: Sequence[float]) -> float | None:
    return float(np.mean(x)) if len(x) else None


def _matching_findings(
    stats: dict[str, Any], gt_rows: list[dict], with_gt: list[dict], th: Thresholds
) -> list[Finding]:
    out: list[Finding] = []
    n = len(gt_rows)
    fg, bg = stats["fg_iou_thresh"], stats["bg_iou_thresh"]
    unreachable = [r for r in gt_rows if r["best_anchor_iou"] < bg]
    if unreachable:
        out.append(
            Finding(
                "gt_unreachable",
                "error",
                f"{len(unreachable)} of {n} ground truths overlap no anchor above the negative "
                f"threshold (best hull IoU < {bg}): only the low-quality rule makes an anchor "
                "positive for them, and its regression target is far from zero. Anchor sizes "
                "or aspect ratios do not fit these objects (run `polydet anchors`).",
                {"count": len(unreachable), "ground_truths": unreachable[:MAX_LISTED]},
            )
        )
    weak = [r for r in gt_rows if bg <= r["best_anchor_iou"] < fg]
    if n and len(weak) / n > 0.25:
        out.append(
            Finding(
                "gt_low_anchor_iou",
                "warning",
                f"{len(weak)} of {n} ground truths reach no anchor at the positive threshold "
                f"({fg}); each gets only its best anchors as positives. Denser sizes or "
                "ratios, or a lower rpn.fg_iou_thresh.",
                {"count": len(weak), "ground_truths": weak[:MAX_LISTED]},
            )
        )
    none = [r for r in gt_rows if r["positives"] == 0]
    if none:
        out.append(
            Finding(
                "gt_without_positive",
                "error",
                f"{len(none)} of {n} ground truths have no positive anchor at all: the RPN "
                "is never taught to find them (degenerate or tiny boxes, or anchors that "
                "miss them entirely).",
                {"count": len(none), "ground_truths": none[:MAX_LISTED]},
            )
        )
    med = stats["positives_per_gt"]["median"]
    if med is not None and med < th.min_positives_per_gt:
        out.append(
            Finding(
                "few_positives_per_gt",
                "warning",
                f"a ground truth has a median of {med:g} positive anchors: the RPN sees very "
                "few examples of each object. More sizes/ratios or a lower fg threshold.",
                {"median": med},
            )
        )
    ppi = stats["positives_per_image"]
    if ppi is not None and ppi < th.min_positives_per_image:
        out.append(
            Finding(
                "few_positives_per_image",
                "warning",
                f"only {ppi:.1f} positive anchors per image with objects: the objectness "
                "loss is dominated by negatives (risk of collapse to 0).",
                {"mean": ppi},
            )
        )
    flooded = [r for r in with_gt if r["positives"] > th.max_positive_share * r["anchors"]]
    if flooded:
        out.append(
            Finding(
                "too_many_positives",
                "error",
                f"{len(flooded)} images have more than {th.max_positive_share:.0%} of their "
                "anchors positive: a ground truth that overlaps nothing (zero IoU ties) or "
                "anchors far larger than the objects make almost everything positive.",
                {"images": [r["image_id"] for r in flooded[:MAX_LISTED]]},
            )
        )
    obj = stats["objectness"]
    if obj["share_low"] is not None and obj["share_low"] >= th.collapse_share:
        out.append(
            Finding(
                "objectness_collapse_low",
                "error",
                f"{obj['share_low']:.0%} of the top-{stats['top_n']} proposals score below "
                f"{th.collapse_low}: objectness has collapsed to 0 (too few positives, or a "
                "positive/negative imbalance in the sampler).",
                {"share_low": obj["share_low"]},
            )
        )
    elif obj["share_high"] is not None and obj["share_high"] >= th.collapse_share:
        out.append(
            Finding(
                "objectness_collapse_high",
                "error",
                f"{obj['share_high']:.0%} of the top-{stats['top_n']} proposals score above "
                f"{th.collapse_high}: objectness says 'object' everywhere (positives flood "
                "the sampler, or negatives are mislabelled).",
                {"share_high": obj["share_high"]},
            )
        )
    rec = stats["rpn_recall"]["poly@0.5"]
    if rec is not None and rec < th.min_rpn_recall:
        out.append(
            Finding(
                "low_rpn_recall",
                "warning",
                f"the top-{stats['top_n']} proposals reach only {rec:.0%} of the ground "
                "truths at polygon IoU 0.5 (the second stage cannot find the rest).",
                {"recall@0.5": rec, "hull_recall@0.5": stats["rpn_recall"]["hull@0.5"]},
            )
        )
    return out


# --- encoding ----------------------------------------------------------------------------------


def _rows(parts: Sequence[Tensor]) -> Tensor:
    """Per-image ``[P_i, 10]`` tensors as one float64 ``[P, 10]``."""
    return torch.cat([p.double().reshape(-1, 10) for p in parts]) if parts else torch.zeros(0, 10)


def _term_stats(x: Tensor, trivial: int) -> dict[str, Any]:
    """Count, non-finite rows, and per-term mean / std ``[10]`` of the finite rows."""
    finite = torch.isfinite(x).all(dim=1)
    xf = x[finite].double()
    return {
        "count": int(x.shape[0]),
        "trivial": trivial,
        "nonfinite": int((~finite).sum()),
        "mean": xf.mean(0).tolist() if xf.shape[0] else [None] * 10,
        "std": xf.std(0, unbiased=False).tolist() if xf.shape[0] else [None] * 10,
    }


def analyze_encoding(
    inspect: dict[str, Any], th: Thresholds = Thresholds()
) -> tuple[dict[str, Any], list[Finding]]:
    """Per group (RPN/RoI targets and predicted deltas) and term: count, mean, std.

    Rows whose target is exactly 0 (a ground truth added to the proposals as its own RoI,
    as torchvision does) are left out of the statistics, with their deltas: they say
    nothing about the encoding's scale. ``stats[group]["trivial"]`` counts them.
    """
    stats: dict[str, Any] = {}
    findings: list[Finding] = []
    for key, delta_key in (
        ("encoded_rpn_targets", "rpn_deltas"),
        ("encoded_roi_targets", "roi_deltas"),
    ):
        t, d = (_rows(inspect.get(k, [])) for k in (key, delta_key))
        trivial = (t.abs() <= 1e-6).all(dim=1)
        keep = ~trivial
        stats[key] = _term_stats(t[keep], int(trivial.sum()))
        stats[delta_key] = _term_stats(d[keep] if d.shape[0] == t.shape[0] else d, 0)
    for key, delta_key in (
        ("encoded_rpn_targets", "rpn_deltas"),
        ("encoded_roi_targets", "roi_deltas"),
    ):
        s, d = stats[key], stats[delta_key]
        stage = "RPN" if key.startswith("encoded_rpn") else "RoI"
        if s["nonfinite"] or d["nonfinite"]:
            findings.append(
                Finding(
                    "nonfinite_encoding",
                    "error",
                    f"{stage}: {s['nonfinite']} encoded targets and {d['nonfinite']} predicted "
                    "deltas are not finite (zero-size reference boxes or overflow in exp).",
                    {"stage": stage, "targets": s["nonfinite"], "deltas": d["nonfinite"]},
                )
            )
        if s["count"] - s["nonfinite"] < th.min_samples:
            continue
        mean, std = np.array(s["mean"]), np.array(s["std"])
        biased = [TERMS[k] for k in np.flatnonzero(np.abs(mean) > th.target_mean_max)]
        if biased:
            findings.append(_target_mean_finding(stage, s, biased, th.target_mean_max))
        big = [TERMS[k] for k in np.flatnonzero(std > th.target_std_max)]
        small = [TERMS[k] for k in np.flatnonzero(std < th.target_std_min)]
        if big or small:
            findings.append(
                Finding(
                    "target_scale",
                    "warning",
                    f"{stage} encoded targets are off unit scale: std "
                    + (f"> {th.target_std_max} in {', '.join(big)} " if big else "")
                    + (f"< {th.target_std_min} in {', '.join(small)} " if small else "")
                    + "(coder weights, offsets not divided by the reference size, or "
                    "references so unlike the objects that every target is the same).",
                    {"stage": stage, "too_large": big, "too_small": small, "std": s["std"]},
                )
            )
        if d["count"] - d["nonfinite"] >= th.min_samples:
            dstd = np.array(d["std"])
            wild = [
                TERMS[k]
                for k in range(10)
                if dstd[k] > th.delta_std_ratio_max * max(std[k], th.target_std_min)
            ]
            if wild:
                findings.append(
                    Finding(
                        "delta_scale",
                        "warning",
                        f"{stage} predicted deltas spread far more than their targets in "
                        f"{', '.join(wild)}: the regression head is unstable (learning rate, "
                        "or a loss term whose weight is too high).",
                        {"stage": stage, "terms": wild, "std": d["std"]},
                    )
                )
    return stats, findings
