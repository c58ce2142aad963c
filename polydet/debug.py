"""Debugging reports: why does a detector not learn?

``debug_report(cfg, model)`` writes one self-contained report for a model and a dataset
split (``report.md`` with PNG plots, ``report.html`` with the plots embedded, and the
numbers as ``debug.json``) under ``cfg.debug.out``. It covers:

- **Loss design** (``history.csv`` / ``nonfinite.json`` of ``cfg.train.out``): each loss
  term over the steps, train and validation; each term's share of the total; when and
  where a loss became non-finite.
- **Matching and IoU** (``PolyDetector.inspect`` on ``cfg.debug.num_images`` images): per
  ground truth its positive anchors and best anchor IoU (hull box IoU, as the RPN matches);
  ground truths without a positive anchor (with size and aspect); IoU histograms of
  positive and negative anchors; RPN recall of the ground truths by the top-N proposals.
- **Encoding**: mean and standard deviation of the 10 encoded target terms of positive
  anchors and RoIs, and of the predicted deltas (targets should sit near 0, unit-ish scale).
- **Drawn examples**: ground truths, each one's best anchor, top proposals and detections;
  the worst false positives and the missed objects.
- **Findings**: known pathologies flagged automatically (:class:`Thresholds`).

The analysis (``analyze_*``: tensors, inspect-dicts and tables in, numbers and findings out)
is separate from the drawing (``plot_*``, ``draw_*``) and the report writing, so that the
findings can be tested without a trained model.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from torchvision.ops import box_iou

from polydet import evaluate as ev
from polydet.config import Config
from polydet.errors import DataError
from polydet.polybox import hull_xyxy, scale, to_corners

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
# Crops of worst false positives and of missed objects drawn.
MAX_CROPS = 8
# Top proposals, and at most this many detections (best first), drawn per example image.
DRAWN_PROPOSALS = 10
DRAWN_DETECTIONS = 20

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


def _window(n: int) -> int:
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
    w = _window(n)
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
    if n >= th.min_steps:
        for c in cols:
            s = stats["terms"][c]
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
    from polydet.ops import pairwise_iou

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
            findings.append(
                Finding(
                    "target_mean",
                    "warning",
                    f"{stage} encoded targets are far from zero mean in {', '.join(biased)} "
                    f"(|mean| > {th.target_mean_max}): a unit or sign mistake in the coder, "
                    "or anchors systematically offset from the objects.",
                    {"stage": stage, "terms": biased, "mean": s["mean"]},
                )
            )
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
        smooth = y.rolling(_window(len(train)), min_periods=1).mean()
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
        ax.text(float(p[0]), float(p[1]), f"{name} {float(s):.2f}", color="red", fontsize=7)
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


# --- the report --------------------------------------------------------------------------------


Block = tuple[str, Any]  # ("h1"|"h2"|"p"|"ul"|"table"|"img", content)


def render_markdown(blocks: Sequence[Block], base: Path) -> str:
    """Markdown of report blocks; images are linked relative to ``base`` (the report's
    directory)."""
    out = []
    for kind, c in blocks:
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + c)
        elif kind == "p":
            out.append(c)
        elif kind == "ul":
            out.append("\n".join(f"- {x}" for x in c))
        elif kind == "table":
            head, *rows = c
            out.append(
                "\n".join(
                    ["| " + " | ".join(map(str, head)) + " |", "|" + " --- |" * len(head)]
                    + [
                        "| " + " | ".join(_cell(v).replace("|", "\\|") for v in r) + " |"
                        for r in rows
                    ]
                )
            )
        elif kind == "img":
            out.append(f"![{c.stem}]({c.relative_to(base).as_posix()})")
    return "\n\n".join(out) + "\n"


def render_html(blocks: Sequence[Block], title: str) -> str:
    """A single HTML file: images embedded as base64 PNG (self-contained)."""
    body = []
    for kind, c in blocks:
        if kind in ("h1", "h2", "h3"):
            body.append(f"<{kind}>{html.escape(c)}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{html.escape(c)}</p>")
        elif kind == "ul":
            body.append("<ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in c) + "</ul>")
        elif kind == "table":
            head, *rows = c
            th_ = "".join(f"<th>{html.escape(str(h))}</th>" for h in head)
            tr = "".join(
                "<tr>" + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in r) + "</tr>"
                for r in rows
            )
            body.append(f"<table><tr>{th_}</tr>{tr}</table>")
        elif kind == "img":
            data = base64.b64encode(c.read_bytes()).decode("ascii")
            body.append(
                f'<p><img alt="{html.escape(c.stem)}" src="data:image/png;base64,{data}"></p>'
            )
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px;"
        "text-align:right}img{max-width:100%}"
    )
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n"
    )


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _json_default(x: Any) -> Any:
    if isinstance(x, np.integer | np.floating):
        return x.item()
    if isinstance(x, np.ndarray | Tensor):
        return x.tolist()
    return str(x)


ICONS = {"error": "ERROR", "warning": "WARNING", "info": "info"}


def _report_blocks(
    title: str,
    findings: Sequence[Finding],
    losses: dict[str, Any],
    matching: dict[str, Any] | None,
    encoding: dict[str, Any] | None,
    plots: dict[str, Path | None],
    examples: Sequence[Path],
) -> list[Block]:
    blocks: list[Block] = [("h1", title), ("h2", "Findings")]
    if findings:
        blocks.append(("ul", [f"{ICONS[f.severity]} [{f.code}] {f.message}" for f in findings]))
    else:
        blocks.append(("p", "No known pathology detected."))
    blocks.append(("h2", "Loss design"))
    if losses.get("terms"):
        rows = [["term", "early", "late", "best", "best step", "late share", "val last"]]
        for c, s in losses["terms"].items():
            rows.append(
                [
                    c,
                    s["early"],
                    s["late"],
                    s["best"],
                    s["best_step"],
                    s.get("late_share"),
                    s.get("val_last"),
                ]
            )
        blocks.append(("table", rows))
    else:
        blocks.append(("p", "No training history (history.csv) was found."))
    if plots.get("losses"):
        blocks.append(("img", plots["losses"]))
    if matching is not None:
        blocks.append(("h2", "Matching and IoU"))
        ppg = matching["positives_per_gt"]
        blocks.append(
            (
                "table",
                [
                    [
                        "images",
                        "ground truths",
                        "positives / image",
                        "positives / GT (median)",
                        "best anchor IoU (mean)",
                        f"GT below fg {matching['fg_iou_thresh']}",
                        f"GT below bg {matching['bg_iou_thresh']}",
                    ],
                    [
                        matching["images"],
                        matching["ground_truths"],
                        matching["positives_per_image"],
                        ppg["median"],
                        matching["best_anchor_iou"]["mean"],
                        matching["best_anchor_iou"]["below_fg"],
                        matching["best_anchor_iou"]["below_bg"],
                    ],
                ],
            )
        )
        weak = [
            r
            for r in matching["ground_truth_table"]
            if r["positives"] == 0 or r["best_anchor_iou"] < matching["fg_iou_thresh"]
        ]
        if weak:
            blocks.append(
                ("h3", "Ground truths without a positive anchor, or below the fg threshold")
            )
            keys = [
                "image_id",
                "index",
                "class",
                "width",
                "height",
                "aspect",
                "best_anchor_iou",
                "positives",
            ]
            blocks.append(("table", [keys] + [[r[k] for k in keys] for r in weak[:MAX_LISTED]]))
        keys = [
            "image_id",
            "ground_truths",
            "positives",
            "negatives",
            "ignored",
            "proposals",
            "recall@0.5",
        ]
        blocks.append(("h3", "Per image (anchors: positive / negative / ignored)"))
        blocks.append(("table", [keys] + [[r[k] for k in keys] for r in matching["per_image"]]))
        rec = matching["rpn_recall"]
        blocks.append(("h3", f"RPN recall of the top-{matching['top_n']} proposals"))
        blocks.append(
            (
                "table",
                [
                    ["polygon IoU 0.5", "polygon IoU 0.7", "hull IoU 0.5", "hull IoU 0.7"],
                    [rec["poly@0.5"], rec["poly@0.7"], rec["hull@0.5"], rec["hull@0.7"]],
                ],
            )
        )
        for key in ("matching", "objectness"):
            if plots.get(key):
                blocks.append(("img", plots[key]))
    if encoding is not None:
        blocks.append(("h2", "Encoding"))
        blocks.append(
            (
                "p",
                "Mean and standard deviation of each encoded term; targets should "
                "sit near 0 with a unit-ish scale, and predictions should follow them. Rows "
                "equal to their reference (ground truths added as their own RoIs) are left out.",
            )
        )
        rows = [["group", "n", *TERMS]]
        for key, label in ENCODING_GROUPS.items():
            s = encoding[key]
            rows.append([label + " mean", s["count"], *s["mean"]])
            rows.append([label + " std", s["count"], *s["std"]])
        blocks.append(("table", rows))
        if plots.get("encoding"):
            blocks.append(("img", plots["encoding"]))
    if examples:
        blocks.append(("h2", "Examples"))
        blocks.append(
            (
                "p",
                "Green: ground truth; orange dashed: best anchor of each; blue: top "
                f"{DRAWN_PROPOSALS} proposals; red: detections with their scores.",
            )
        )
        blocks += [("img", p) for p in examples]
    for key, label in (("worst_fp", "Worst false positives"), ("missed", "Missed objects")):
        if plots.get(key):
            blocks += [("h2", label), ("img", plots[key])]
    return blocks


def debug_report(cfg: Config, model: str | None = None) -> dict[str, Any]:
    """Write the debugging report of a model on ``cfg.debug.split`` (module docstring).

    ``model``: as :func:`polydet.evaluate.evaluate_model` (default ``cfg.train.out/model.pt``).
    Returns a summary: the findings, the main numbers and the files written.
    """
    th = Thresholds()
    dcfg = cfg.debug
    out = Path(dcfg.out)
    out.mkdir(parents=True, exist_ok=True)
    train_out = Path(cfg.train.out)
    history = read_history(train_out / "history.csv")
    nonfinite = None
    nf_path = train_out / "nonfinite.json"
    if nf_path.is_file():
        try:
            nonfinite = json.loads(nf_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{nf_path}: not JSON ({e})") from e
    loss_stats, findings = analyze_losses(history, nonfinite, th)
    plots: dict[str, Path | None] = {}
    if history is not None and len(history):
        plots["losses"] = plot_losses(history, out / "losses.png")

    path = ev.resolve_model(cfg, model)
    net = ev.load_checked_model(cfg, path)
    records = ev.load_split(cfg, dcfg.split)[: dcfg.num_images]
    from polydet.data.dataset import load_image

    images = [load_image(r.path, (r.width, r.height)) for r in records]
    targets = [
        {"polyboxes": r.polyboxes, "labels": r.labels, "difficult": r.difficult} for r in records
    ]
    device = next(net.parameters()).device
    result = _inspect_batched(net, images, targets, device, cfg.evaluate.batch_size)
    rpn = net.cfg.rpn
    classes = list(cfg.data.classes)
    ids = [r.image_id for r in records]
    matching, mf = analyze_matching(
        result,
        targets,
        rpn.fg_iou_thresh,
        rpn.bg_iou_thresh,
        dcfg.top_n_proposals,
        ids,
        classes,
        th,
    )
    encoding, ef = analyze_encoding(result, th)
    findings += mf + ef
    plots["matching"] = plot_matching(matching, out / "matching.png")
    plots["objectness"] = plot_objectness(matching, out / "objectness.png")
    plots["encoding"] = plot_encoding(encoding, out / "encoding.png")

    # Detections on these images, judged by the evaluator: worst false positives, misses.
    gt = ev.ground_truth_of(records)
    dets = _detections_of(result["detections"])
    evaluation = ev.evaluate_detections(
        ids,
        classes,
        gt,
        dets,
        cfg.evaluate.iou_threshold,
        score_thresh=cfg.evaluate.score_thresh,
        coco=False,
    )
    examples = _draw_examples(result, images, targets, records, classes, cfg, out)
    plots["worst_fp"], plots["missed"] = _draw_worst(evaluation, images, gt, dets, classes, out)

    title = f"polydet debug report: {path} on {dcfg.split} ({len(records)} images)"
    blocks = _report_blocks(title, findings, loss_stats, matching, encoding, plots, examples)
    (out / "report.md").write_text(render_markdown(blocks, out))
    (out / "report.html").write_text(render_html(blocks, title))
    summary = {
        "model": str(path),
        "split": dcfg.split,
        "images": len(records),
        "findings": [asdict(f) for f in findings],
        "num_errors": sum(f.severity == "error" for f in findings),
        "num_warnings": sum(f.severity == "warning" for f in findings),
        "losses": loss_stats,
        "inspect_losses": result["losses"],
        "matching": matching,
        "encoding": encoding,
        "evaluation": {
            k: v
            for k, v in evaluation.metrics.items()
            if not k.startswith(("recall_at", "score_at", "npos/"))
        },
    }
    (out / "debug.json").write_text(json.dumps(summary, indent=2, default=_json_default) + "\n")
    return {
        "out": str(out),
        "report": str(out / "report.html"),
        "model": str(path),
        "split": dcfg.split,
        "images": len(records),
        "num_errors": summary["num_errors"],
        "num_warnings": summary["num_warnings"],
        "findings": [f"{f.severity}: [{f.code}] {f.message}" for f in findings],
        "rpn_recall@0.5": matching["rpn_recall"]["poly@0.5"],
        "positives_per_gt_median": matching["positives_per_gt"]["median"],
    }


def _inspect_batched(
    net: Any, images: list[Tensor], targets: list[dict], device: torch.device, batch_size: int
) -> dict[str, Any]:
    """``net.inspect`` over batches, per-image lists concatenated, losses image-weighted."""
    merged: dict[str, Any] = {}
    loss_sum: dict[str, float] = {}
    for s in range(0, len(images), batch_size):
        imgs = [im.to(device) for im in images[s : s + batch_size]]
        tgts = [
            {"polyboxes": t["polyboxes"].to(device), "labels": t["labels"].to(device)}
            for t in targets[s : s + batch_size]
        ]
        r = net.inspect(imgs, tgts)
        for k, v in r.items():
            if k == "losses":
                for name, x in v.items():
                    loss_sum[name] = loss_sum.get(name, 0.0) + x * len(imgs)
            else:
                merged.setdefault(k, []).extend(v)
    merged["losses"] = {k: v / len(images) for k, v in loss_sum.items()}
    return merged


def _detections_of(dets: Sequence[dict[str, Tensor]]) -> ev.Detections:
    return ev.Detections(
        image=np.repeat(np.arange(len(dets)), [len(d["scores"]) for d in dets]).astype(np.int64),
        label=np.concatenate([d["labels"].numpy() - 1 for d in dets]).astype(np.int64)
        if dets
        else np.zeros(0, np.int64),
        score=np.concatenate([d["scores"].double().numpy() for d in dets]) if dets else np.zeros(0),
        polyboxes=np.concatenate([d["polyboxes"].double().numpy().reshape(-1, 10) for d in dets])
        if dets
        else np.zeros((0, 10)),
    )


def _draw_examples(
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
    for i, (image, rec) in enumerate(zip(images, records)):
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


def _draw_worst(
    evaluation: ev.Evaluation,
    images: list[Tensor],
    gt: ev.GroundTruth,
    dets: ev.Detections,
    classes: Sequence[str],
    out: Path,
) -> tuple[Path | None, Path | None]:
    """Crops of the highest-scoring false positives and of missed ground truths."""

    def context(img: int) -> Tensor:
        return torch.from_numpy(gt.polyboxes[gt.image == img]).float()

    fp = np.flatnonzero(evaluation.det_outcome == ev.FP)
    fp = fp[np.argsort(-dets.score[fp], kind="stable")][:MAX_CROPS]
    crops = []
    for k in fp:
        kind = evaluation.det_fp_kind[k]
        why = ev.FP_KINDS[kind] if kind >= 0 else "below operating point"
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
            f"{classes[gt.label[k]]}: {ev.GT_KINDS[evaluation.gt_kind[k]]}",
        )
        for k in missed
    ]
    return worst, draw_crops(crops, out / "missed_objects.png", "Missed objects (red)")
