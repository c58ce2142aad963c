"""Plots of an evaluation (PNG, matplotlib's object-oriented API): PR curves, AP by size,
TP/FP score histograms and the confusion matrix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from polydet.eval.metrics import FP, SIZES, TP, Evaluation, threshold_key


def plot_all(ev: Evaluation, out: Path) -> list[Path]:
    """PR curves, AP by size, TP/FP score histograms and the confusion matrix, as PNGs."""
    paths = [
        _plot_pr(ev, out / "pr_curves.png"),
        _plot_scores(ev, out / "score_hist.png"),
        _plot_confusion(ev, out / "confusion.png"),
    ]
    if "map50_95/small" in ev.metrics:
        paths.append(_plot_sizes(ev, out / "ap_by_size.png"))
    return paths


def _figure(w: float = 6.0, h: float = 4.5) -> Any:
    # The object-oriented API (no pyplot): no global backend state, safe in worker threads.
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=100, layout="constrained")


def _plot_pr(ev: Evaluation, path: Path) -> Path:
    fig = _figure()
    ax = fig.add_subplot()
    tk = threshold_key(ev.metrics["iou_threshold"])
    for name, cv in ev.curves.items():
        ap = ev.metrics.get(f"ap{tk}/{name}")
        label = f"{name} (AP{tk} {ap:.3f})" if ap is not None else f"{name} (no ground truth)"
        ax.plot(np.r_[0.0, cv["recall"]], np.r_[1.0, cv["precision"]], label=label)
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02))
    ax.set_title(f"Precision-recall at IoU > {ev.metrics['iou_threshold']:g}")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize="small")
    fig.savefig(path)
    return path


def _plot_sizes(ev: Evaluation, path: Path) -> Path:
    fig = _figure()
    ax = fig.add_subplot()
    x = np.arange(len(SIZES))
    for k, (key, label) in enumerate([("map50_95", "AP50:95"), ("map50_coco", "AP50")]):
        vals = [ev.metrics[f"{key}/{s}"] for s in SIZES]
        ax.bar(x + (k - 0.5) * 0.38, [v or 0.0 for v in vals], 0.38, label=label)
    ax.set_xticks(x, [f"{s}\n({ev.metrics[f'num_gt/{s}']} objects)" for s in SIZES])
    ax.set(ylabel="AP (COCO-style)", ylim=(0, 1), title="AP by object size")
    ax.legend()
    fig.savefig(path)
    return path


def _plot_scores(ev: Evaluation, path: Path) -> Path:
    fig = _figure()
    ax = fig.add_subplot()
    scores = np.concatenate([cv["score"] for cv in ev.curves.values()] or [np.zeros(0)])
    outcome = np.concatenate([ev.det_outcome[o] for o in ev.det_order] or [np.zeros(0)])
    lo, hi = (float(scores.min()), float(scores.max())) if scores.size else (0.0, 1.0)
    bins = np.linspace(min(lo, 0.0), max(hi, 1.0), 41)
    ax.hist(
        scores[outcome == TP], bins, alpha=0.6, label=f"true positives ({(outcome == TP).sum()})"
    )
    ax.hist(
        scores[outcome == FP], bins, alpha=0.6, label=f"false positives ({(outcome == FP).sum()})"
    )
    ax.set(xlabel="score", ylabel="detections", title="Scores of true and false positives")
    ax.legend()
    fig.savefig(path)
    return path


def _plot_confusion(ev: Evaluation, path: Path) -> Path:
    C = len(ev.classes)
    fig = _figure(1.6 + 0.7 * (C + 1), 1.2 + 0.6 * (C + 1))
    ax = fig.add_subplot()
    m = ev.confusion
    ax.imshow(np.log1p(m), cmap="Blues")
    for (r, c), v in np.ndenumerate(m):
        ax.text(c, r, str(v), ha="center", va="center", fontsize="small")
    ax.set_xticks(range(C + 1), [*ev.classes, "missed"], rotation=45, ha="right")
    # The last row holds every false positive that matched no object of any class above the
    # IoU threshold, not only `confusion/fp_background`: say what it adds up.
    ax.set_yticks(range(C + 1), [*ev.classes, "no object"])
    ax.set(xlabel="predicted", ylabel="true")
    ax.set_title(f"Confusion at score >= {ev.metrics['confusion/score_thresh']:g}")
    parts = [
        f"{ev.metrics.get(f'confusion/fp_{kind}', 0)} {kind}"
        for kind in ("background", "mislocalised", "duplicate")
    ]
    fig.text(0.01, 0.01, "no object = " + " + ".join(parts), fontsize="small")
    fig.savefig(path)
    return path
