"""The metric maths of polygon-IoU evaluation: DOTA Task1 AP, VOC and COCO-style AP.

Every metric is computed per class and averaged over the classes that have at least one
non-difficult ground truth (a class without one has no defined AP: ``null``, left out of
the mean; the official kit would count it as 0).

* ``map50`` (``map{100·t}`` for another ``iou_threshold`` t): the DOTA Task1 metric, equal to
  the official development kit's ``voc_eval(..., use_07_metric=True)``. Detections of a class
  are sorted by score with ``np.argsort(-score)`` over their input (file line) order, exactly
  as the kit does, so that even tied scores are ordered alike. Each detection takes the
  ground truth of its image and class with the highest polygon IoU (the first one on ties);
  IoU > t with a non-difficult, not yet matched ground truth is a true positive, with an
  already matched one a false positive (duplicate), with a difficult one neither. Recall is
  over non-difficult ground truths; AP is the VOC07 11-point average.
* ``map_voc_all``: the same matching, all-point VOC AP (area under the precision envelope).
* ``map50_95`` (and ``map50_coco``, ``map75``, ``map50_95/{small,medium,large}``): COCO-style,
  as pycocotools computes it: per image and class the top 100 detections; at each IoU in
  0.50:0.05:0.95 a detection takes the unmatched ground truth with the highest IoU >= the
  threshold, preferring non-ignored ones; 101-point interpolated AP. Difficult ground truths
  are ignored and, as in the DOTA kit, may absorb any number of detections (like COCO's
  crowd regions, but with the ordinary IoU). For the size ranges (polygon area below
  ``size_bounds[0]²``, between, above ``size_bounds[1]²`` pixels²) ground truths outside the
  range are ignored, and so are unmatched detections outside it.
* ``recall75`` (and ``recall75/orient_<bucket>``) and ``mar100``: COCO-style recall with up to
  100 detections per image, at IoU 0.75 and averaged over 0.50:0.95 (pycocotools' AR@100),
  per class, then the class mean: the share of objects that some detection fits that well,
  the ceiling of ``map75`` whatever the ranking (localisation against ranking).
* ``map50_coco/orient_<bucket>``, ``map75/orient_<bucket>``: the same by orientation, buckets
  of ``|angle mod 90 - 45|`` (:data:`ORIENTATIONS`: ``diagonal`` 0-15 degrees, i.e. objects
  near 45 degrees where the canonical first corner switches, ``oblique`` 15-30, ``axis``
  30-45), as :func:`orientation_offset` measures it.
* ``dota_map75`` (``dota_ap75/<class>``): ``map50``'s rule (the kit's, VOC07 11-point) at IoU
  > 0.75, the strict figure users compare with the kit's. ``found75`` (per class ``/<class>``
  and per orientation bucket ``/orient_<bucket>``): the share of non-difficult objects that
  some detection of their class scoring ``>= score_thresh`` overlaps by polygon IoU >= 0.75,
  whatever the other detections (no one-to-one matching): how many objects the model draws
  tightly at the operating point.
* ``heading_acc45``, ``heading_acc10`` (per class ``/<class>`` and the mean over the classes
  with at least one): of the true positives at the operating point (IoU > t, ``score >=
  score_thresh``) whose ground truth has a known heading (``first_corner >= 0``: not a
  symmetric class), the share whose heading (:mod:`polydet.geometry.heading`: centre to the
  middle of the first edge) is within 45 / 10 degrees of the ground truth's;
  ``heading_count/<class>`` how many were measured. Only when both sides carry a first corner.
* ``recall_at_p{P}`` (per class and mean): the highest recall reached at precision >= P on
  the VOC curve at IoU t, with ``score_at_p{P}/<class>`` the score threshold that reaches it.
* ``confusion/*``: at the operating point ``score >= score_thresh``, each false positive is a
  ``duplicate`` (its ground truth was matched already), ``mislabelled`` (IoU > t with a ground
  truth of another class), ``mislocalised`` (0.1 <= IoU <= t with one of its class) or
  ``background``; each non-difficult ground truth is ``detected``, ``mislabelled`` (found
  only by a detection of another class), ``mislocalised`` (only overlapped, IoU >= 0.1, by
  detections of its class) or ``missed``. Because matching is greedy by score, the outcome
  of the detections above a threshold does not depend on those below it.

Polygons are measured as the kit's ``polyiou`` measures them, by
``polydet.ops.paired_iou(..., mode="polygon")``: the polygon the 4 corners trace in the
order given (a Task1 or labelTxt line's order; a model's canonical order), exactly for
convex and non-convex quads, and by the kit's winding-number rule for self-intersecting
ones (``polydet.ops`` docstring), so any Task1 file gets the kit's number. The IoUs of all overlapping same-image pairs of the whole
evaluation go through ``polydet.ops``' kernel in one batch (:func:`overlapping_pairs`);
matching is numpy, without a Python loop over detections.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from polydet.geometry import heading
from polydet.geometry.ops import iou_areas, paired_iou
from polydet.geometry.polybox import area as polybox_area

# COCO's constants (pycocotools Params): IoU thresholds, recall points, detections per image.
COCO_IOUS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1)
COCO_RECALLS = np.linspace(0.0, 1.0, int(np.round((1.0 - 0.0) / 0.01)) + 1)
COCO_MAX_DETS = 100
# Same-class overlap from which a false positive counts as a poor localisation, not background.
MISLOCALISED_IOU = 0.1
SIZES = ("small", "medium", "large")
# Orientation buckets of |angle mod 90 - 45| (degrees; :func:`orientation_offset`): objects
# near 45 degrees are where a quad's canonical first corner switches, so their AP shows
# whether the regression copes with it. Each bucket is 15 degrees wide.
ORIENTATIONS = {"diagonal": (0.0, 15.0), "oblique": (15.0, 30.0), "axis": (30.0, 45.0 + 1e-9)}
# Pairs per call of the intersection kernel: enough to amortise its ~100 tensor ops, few
# enough for its [4, 4, P] float64 temporaries to stay in cache (measured on 2 cores:
# 2k-4k pairs ~1 us/pair, 32k pairs ~3 us/pair).
_KERNEL_CHUNK = 1 << 12

# Detection outcomes at the DOTA threshold.
TP, FP, IGNORED = 1, 0, -1
FP_KINDS = ("duplicate", "mislabelled", "mislocalised", "background")
GT_KINDS = ("detected", "mislabelled", "mislocalised", "missed")


@dataclass(frozen=True)
class GroundTruth:
    """All ground truths of an evaluation, as flat arrays (``G`` objects)."""

    image: np.ndarray  # [G] int64, index into the image list
    label: np.ndarray  # [G] int64, class index 0..C-1
    polyboxes: np.ndarray  # [G, 10] float64, image pixels
    difficult: np.ndarray  # [G] bool
    # [G] int64 index into the stored corner order of the first corner (the heading), -1
    # unknown; None: no heading information (no heading metrics).
    first_corner: np.ndarray | None = None

    def __post_init__(self) -> None:
        _check_columns("ground truths", self.polyboxes, self.image, self.label, self.difficult)
        if self.first_corner is not None:
            _check_columns("ground truths", self.polyboxes, self.first_corner)


@dataclass(frozen=True)
class Detections:
    """All detections of an evaluation, as flat arrays (``D`` detections), in input order."""

    image: np.ndarray  # [D] int64, index into the image list
    label: np.ndarray  # [D] int64, class index 0..C-1
    score: np.ndarray  # [D] float64
    polyboxes: np.ndarray  # [D, 10] float64, image pixels
    first_corner: np.ndarray | None = None  # [D] as GroundTruth's; None: no heading predicted

    def __post_init__(self) -> None:
        _check_columns("detections", self.polyboxes, self.image, self.label, self.score)
        if self.first_corner is not None:
            _check_columns("detections", self.polyboxes, self.first_corner)


def _check_columns(what: str, polyboxes: np.ndarray, *cols: np.ndarray) -> None:
    if polyboxes.ndim != 2 or polyboxes.shape[1] != 10:
        raise ValueError(f"{what}: polyboxes must be [N, 10], got {list(polyboxes.shape)}")
    for c in cols:
        if c.shape != (polyboxes.shape[0],):
            raise ValueError(f"{what}: columns must be [{polyboxes.shape[0]}], got {list(c.shape)}")


@dataclass
class Evaluation:
    """The result of :func:`evaluate_detections`: metrics plus per-object outcomes."""

    metrics: dict[str, Any]  # flat keys (metrics.json)
    classes: tuple[str, ...]
    image_ids: tuple[str, ...]
    curves: dict[str, dict[str, np.ndarray]]  # per class: score, precision, recall [n]
    det_order: list[np.ndarray]  # per class: its detections' indices in curve order [n]
    det_outcome: np.ndarray  # [D] int8: TP, FP or IGNORED at iou_threshold
    # [D] best IoU with a ground truth of its class; 0 when below the smallest IoU a metric
    # reads (0.1 at score >= score_thresh, else min(iou_threshold, 0.5)).
    det_best_iou: np.ndarray
    det_fp_kind: np.ndarray  # [D] int8 index into FP_KINDS, -1 for true positives / ignored
    gt_kind: np.ndarray  # [G] int8 index into GT_KINDS at score_thresh (-1 for difficult)
    confusion: np.ndarray  # [C+1, C+1] rows: true class + background; cols: predicted + missed


# --- AP primitives (the kit's formulas) ----------------------------------------------------


def voc07_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC07 11-point AP of a PR curve ``[n]``, summed in the kit's order (same float result)."""
    ap = 0.0
    # np.arange(0, 1.1, 0.1) rather than round values: the kit compares recall with these
    # floats (0.30000000000000004 ...), which decides ties such as recall = 3/10.
    for t in np.arange(0.0, 1.1, 0.1):
        hit = recall >= t
        ap += (float(precision[hit].max()) if hit.any() else 0.0) / 11.0
    return ap


def voc_all_point_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """All-point VOC AP of a PR curve ``[n]``: area under the monotone precision envelope."""
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    i = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


# --- IoU of overlapping pairs ----------------------------------------------------------------


def _chunks(cost: np.ndarray, budget: int) -> list[tuple[int, int]]:
    """Consecutive ranges ``[a, b)`` whose summed ``cost`` stays within ``budget`` (an item
    above it alone)."""
    ends = np.cumsum(cost)
    out, a = [], 0
    while a < cost.size:
        base = ends[a - 1] if a else 0
        b = max(int(np.searchsorted(ends, base + budget, side="right")), a + 1)
        out.append((a, b))
        a = b
    return out


def overlapping_pairs(
    gt: GroundTruth,
    dets: Detections,
    num_images: int,
    min_iou: float,
    block: int = 1 << 22,
    min_iou_other: float | np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(detection, ground truth, IoU) of every same-image pair with IoU >= ``min_iou`` > 0.

    ``min_iou`` applies to pairs of the same class; ``min_iou_other`` (default: the same) to
    pairs of different classes. Either may be an array ``[D]`` per detection (``inf``: none).

    All classes at once, so that cross-class overlaps (mislabelled detections) come for
    free; sorted by (det, gt). The geometry is ``polydet.ops.paired_iou(mode="polygon")``
    (the kernel behind ``pairwise_iou``: the same numbers), applied to the candidate pairs of all
    images in one batch: one ``pairwise_iou`` call per image would spend ~1 ms
    each on kernel launch overhead alone. Candidates: the ground truths of the detection's
    image whose centre lies within the detection's x range widened by the image's widest
    half ground truth (a sorted-array range: no all-pairs matrix), then enclosing boxes
    that overlap and an upper bound of the IoU that reaches ``min_iou``; at most ``block``
    pairs are materialised at a time. Float64 throughout, as the kit.
    """
    same_t = np.broadcast_to(np.asarray(min_iou, np.float64), dets.score.shape)
    other_t = same_t if min_iou_other is None else np.asarray(min_iou_other, np.float64)
    other_t = np.broadcast_to(other_t, dets.score.shape)
    if (same_t <= 0).any() or (other_t <= 0).any():
        raise ValueError("min_iou must be > 0")
    empty = np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    if dets.score.size == 0 or gt.label.size == 0:
        return empty
    ii, jj = _box_overlaps(
        _boxes(dets.polyboxes), _boxes(gt.polyboxes), dets.image, gt.image, block
    )
    same = dets.label[ii] == gt.label[jj]
    t = np.where(same, same_t[ii], other_t[ii])
    keep = np.isfinite(t)
    ii, jj, t = ii[keep], jj[keep], t[keep]
    # Areas only of the boxes that have a candidate (often a fraction of detections).
    ud, ii = np.unique(ii, return_inverse=True)
    ug, jj = np.unique(jj, return_inverse=True)
    area_d, cover_d = iou_areas(torch.from_numpy(dets.polyboxes[ud]), mode="polygon")
    area_g, cover_g = iou_areas(torch.from_numpy(gt.polyboxes[ug]), mode="polygon")
    # |intersection| is at most the boxes' and the smaller cover (the area, unless a bow
    # tie): an IoU bound (a bow tie's union may be <= 0: then the pair is always kept).
    bd, bg = _boxes(dets.polyboxes[ud]), _boxes(gt.polyboxes[ug])
    iw = np.minimum(bd[2][ii], bg[2][jj]) - np.maximum(bd[0][ii], bg[0][jj])
    ih = np.minimum(bd[3][ii], bg[3][jj]) - np.maximum(bd[1][ii], bg[1][jj])
    a, b = area_d.numpy()[ii], area_g.numpy()[jj]
    ca, cb = cover_d.numpy()[ii], cover_g.numpy()[jj]
    upper = np.minimum(iw * ih, np.minimum(ca, cb))
    keep = np.flatnonzero((ca > 0) & (cb > 0) & (upper >= (1 - 1e-9) * t * (a + b - upper)))
    iou = paired_iou(
        torch.from_numpy(dets.polyboxes[ud]),
        torch.from_numpy(gt.polyboxes[ug]),
        (torch.from_numpy(ii[keep]), torch.from_numpy(jj[keep])),
        mode="polygon",
        chunk_size=_KERNEL_CHUNK,
    ).numpy()
    hit = iou >= t[keep]
    pd, pg, piou = ud[ii[keep][hit]], ug[jj[keep][hit]], iou[hit]
    o = np.lexsort((pg, pd))
    return pd[o], pg[o], piou[o]


def _boxes(polyboxes: np.ndarray) -> np.ndarray:
    """Enclosing boxes ``[4, N]`` (x1, y1, x2, y2 as rows: 1-D gathers are ~3x faster than
    row gathers) of polyboxes ``[N, 10]``; NaN for a box with a non-finite coordinate."""
    xs = polyboxes[:, :1] + polyboxes[:, 2::2]  # [N, 4]
    ys = polyboxes[:, 1:2] + polyboxes[:, 3::2]
    out = np.stack([xs.min(1), ys.min(1), xs.max(1), ys.max(1)])
    bad = ~np.isfinite(out).all(0)
    out[:, bad] = np.nan
    return out


def _box_overlaps(
    bd: np.ndarray, bg: np.ndarray, img_d: np.ndarray, img_g: np.ndarray, block: int
) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (detection, ground truth) of the same image whose boxes ``[4, N]`` overlap
    with a positive area, without an all-pairs matrix: ground truths sorted by (image, x
    centre) as one float key ``image * span + centre``; a detection's candidates are a range
    of that order (centres within its x range widened by its image's widest half box)."""
    ok_g = np.flatnonzero(np.isfinite(bg[0]) & (bg[2] > bg[0]) & (bg[3] > bg[1]))
    if ok_g.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    lo_x, hi_x = float(bg[0][ok_g].min()), float(bg[2][ok_g].max())
    half = np.zeros(int(max(img_d.max(initial=0), img_g.max(initial=0))) + 1)
    np.maximum.at(half, img_g[ok_g], (bg[2] - bg[0])[ok_g] / 2)
    span = (hi_x - lo_x) + 2 * float(half.max()) + 4.0
    key = img_g[ok_g] * span + ((bg[0] + bg[2])[ok_g] / 2 - lo_x)
    order = np.argsort(key, kind="stable")
    g_sorted, key = ok_g[order], key[order]
    d_ok = np.flatnonzero((bd[2] > lo_x) & (bd[0] < hi_x) & (bd[3] > bd[1]))  # NaN: False
    base = img_d[d_ok] * span - lo_x
    h = half[img_d[d_ok]] + 1.0  # a pixel of slack against the rounding of the float keys
    first = np.searchsorted(key, base + bd[0][d_ok] - h, side="left")
    cnt = np.searchsorted(key, base + bd[2][d_ok] + h, side="right") - first
    out_d, out_g = [], []
    for a, b in _chunks(cnt, block):
        c = cnt[a:b]
        ii = np.repeat(d_ok[a:b], c)
        start = np.cumsum(c) - c
        jj = g_sorted[np.arange(ii.size) - np.repeat(start - first[a:b], c)]
        iw = np.minimum(bd[2][ii], bg[2][jj]) - np.maximum(bd[0][ii], bg[0][jj])
        ih = np.minimum(bd[3][ii], bg[3][jj]) - np.maximum(bd[1][ii], bg[1][jj])
        # The float key can reach into a neighbouring image's range: check the image.
        ok = (iw > 0) & (ih > 0) & (img_d[ii] == img_g[jj])
        out_d.append(ii[ok])
        out_g.append(jj[ok])
    none = [np.zeros(0, np.int64)]
    return np.concatenate(out_d or none), np.concatenate(out_g or none)


def _segment_starts(keys: np.ndarray) -> np.ndarray:
    """Start positions of runs of equal values in a sorted array ``[n]``."""
    if keys.size == 0:
        return np.zeros(0, np.int64)
    return np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])


def _best_per_det(
    pd: np.ndarray, pg: np.ndarray, piou: np.ndarray, num_dets: int
) -> tuple[np.ndarray, np.ndarray]:
    """Best IoU ``[D]`` (0 without pair) and its ground truth ``[D]`` (-1), first gt on ties.

    Pairs must be sorted by (det, gt), which makes "first maximum" the kit's ``np.argmax``.
    """
    best_iou = np.zeros(num_dets)
    best_gt = np.full(num_dets, -1, np.int64)
    if pd.size:
        o = np.lexsort((pg, -piou, pd))
        first = o[_segment_starts(pd[o])]
        best_iou[pd[first]] = piou[first]
        best_gt[pd[first]] = pg[first]
    return best_iou, best_gt


# --- DOTA / VOC matching -----------------------------------------------------------------------


def kit_rank(label: np.ndarray, score: np.ndarray, num_classes: int) -> np.ndarray:
    """Position ``[D]`` of each detection in its class's ``np.argsort(-score)`` order (the kit's)."""
    rank = np.empty(label.shape[0], np.int64)
    for c in range(num_classes):
        idx = np.flatnonzero(label == c)
        rank[idx[np.argsort(-score[idx])]] = np.arange(idx.size)
    return rank


def voc_outcome(
    best_iou: np.ndarray,
    best_gt: np.ndarray,
    rank: np.ndarray,
    difficult: np.ndarray,
    iou_threshold: float,
) -> np.ndarray:
    """TP / FP / IGNORED ``[D]`` of the kit's greedy matching, without a loop over detections.

    A detection whose best ground truth has IoU > threshold is ignored if that ground truth
    is difficult, else a true positive when it is the first (by ``rank``) to claim it.
    """
    hit = best_iou > iou_threshold
    ignored = np.zeros_like(hit)
    ignored[hit] = difficult[best_gt[hit]]
    claim = np.flatnonzero(hit & ~ignored)
    claim = claim[np.lexsort((rank[claim], best_gt[claim]))]  # by gt, then rank
    out = np.full(best_iou.shape[0], FP, np.int8)
    out[claim[_segment_starts(best_gt[claim])]] = TP
    out[ignored] = IGNORED
    return out


# --- COCO matching -------------------------------------------------------------------------


def _coco_match(
    pd: np.ndarray,
    pg: np.ndarray,
    piou: np.ndarray,
    det_rank: np.ndarray,
    gt_ignore: np.ndarray,
    gt_reusable: np.ndarray,
    num_dets: int,
) -> np.ndarray:
    """Matched ground truth ``[R, T, D]`` (-1 for none) of pycocotools' greedy matching, for
    ``R`` ignore sets ``gt_ignore [R, G]`` (the size ranges) at once.

    ``pd, pg, piou``: same-class pairs with IoU >= 0.5 of kept detections, sorted by det.
    ``det_rank``: position of each detection in its (image, class) score order. Detections
    of the same rank belong to different (image, class) groups and so compete for no ground
    truth: one vectorized step per rank replaces pycocotools' loop over detections.
    ``gt_reusable [G]``: ground truths that may absorb any number of detections.
    """
    R, T = gt_ignore.shape[0], COCO_IOUS.size
    matched = np.full((R * T, num_dets), -1, np.int64)
    if pd.size == 0:
        return matched.reshape(R, T, num_dets)
    o = np.lexsort((pg, pd, det_rank[pd]))
    pd, pg, piou = pd[o], pg[o], piou[o]
    taken = np.zeros((R * T, gt_ignore.shape[1]), bool)
    thr = np.tile(COCO_IOUS, R)[:, None]  # [R*T, 1]
    # Non-ignored ground truths win over ignored ones (pycocotools' "break" rule).
    prio = np.repeat(np.where(gt_ignore, 0.0, 2.0), T, axis=0)  # [R*T, G]
    ranks = det_rank[pd]
    bounds = np.flatnonzero(np.r_[True, ranks[1:] != ranks[:-1], True])
    for b0, b1 in zip(bounds[:-1], bounds[1:]):
        bd, bg, biou = pd[b0:b1], pg[b0:b1], piou[b0:b1]
        valid = (biou >= thr) & (~taken[:, bg] | gt_reusable[bg])  # [R*T, P]
        key = np.where(valid, biou + prio[:, bg], -1.0)
        starts = _segment_starts(bd)
        lengths = np.diff(np.r_[starts, bd.size])
        best = np.maximum.reduceat(key, starts, axis=1)  # [R*T, nd]
        is_best = valid & (key == np.repeat(best, lengths, axis=1))
        # pycocotools keeps the last of equal IoUs (it replaces on >=).
        pick = np.maximum.reduceat(np.where(is_best, np.arange(bd.size), -1), starts, axis=1)
        t_idx, s_idx = np.nonzero(pick >= 0)
        g = bg[pick[t_idx, s_idx]]
        matched[t_idx, bd[starts[s_idx]]] = g
        taken[t_idx, g] = True
    return matched.reshape(R, T, num_dets)


def coco_ap(
    matched: np.ndarray,
    det_ignore: np.ndarray,
    order: np.ndarray,
    num_gt: int,
) -> np.ndarray:
    """101-point interpolated AP ``[T]`` of one class (NaN when it has no ground truth).

    ``matched [T, D]``, ``det_ignore [T, D]``; ``order``: the class's kept detections, by
    descending score; ``num_gt``: its non-ignored ground truths.
    """
    T = matched.shape[0]
    if num_gt == 0:
        return np.full(T, np.nan)
    m, ig = matched[:, order] >= 0, det_ignore[:, order]
    tp = np.cumsum(m & ~ig, axis=1, dtype=np.float64)
    fp = np.cumsum(~m & ~ig, axis=1, dtype=np.float64)
    rc = tp / num_gt
    pr = tp / (fp + tp + np.spacing(1))
    pr = np.maximum.accumulate(pr[:, ::-1], axis=1)[:, ::-1]
    q = np.zeros((T, COCO_RECALLS.size))
    for t in range(T):
        inds = np.searchsorted(rc[t], COCO_RECALLS, side="left")
        ok = inds < order.size
        q[t, ok] = pr[t, inds[ok]]
    return q.mean(axis=1)


def coco_recall(
    matched: np.ndarray, det_ignore: np.ndarray, order: np.ndarray, num_gt: int
) -> np.ndarray:
    """Recall ``[T]`` of one class with all its kept detections (``order``, at most
    ``COCO_MAX_DETS`` per image), as pycocotools' ``accumulate`` stores it (NaN when the class
    has no ground truth): the share of its non-ignored ground truths matched at each IoU."""
    if num_gt == 0:
        return np.full(matched.shape[0], np.nan)
    m, ig = matched[:, order] >= 0, det_ignore[:, order]
    return (m & ~ig).sum(axis=1) / num_gt


# --- the evaluation --------------------------------------------------------------------------


def threshold_key(iou_threshold: float) -> str:
    return f"{round(100 * iou_threshold):d}"


def precision_key(p: float) -> str:
    return f"p{round(100 * p):d}"


def evaluate_detections(
    image_ids: Sequence[str],
    classes: Sequence[str],
    gt: GroundTruth,
    dets: Detections,
    iou_threshold: float = 0.5,
    *,
    score_thresh: float = 0.3,
    size_bounds: tuple[float, float] = (32.0, 96.0),
    precision_targets: Sequence[float] = (0.5, 0.8, 0.9),
    coco: bool = True,
) -> Evaluation:
    """Evaluate detections against ground truths (see the module docstring for definitions).

    ``image_ids``: the evaluated images (an image without ground truth still counts: its
    detections are false positives). ``size_bounds``: sides (pixels) of the square areas
    that separate small / medium / large objects. ``coco=False`` skips the COCO-style metrics.
    """
    C, D, G = len(classes), dets.score.size, gt.label.size
    for what, x in (("detections", dets), ("ground truths", gt)):
        if x.label.size and (x.label.min() < 0 or x.label.max() >= C):
            raise ValueError(f"{what}: class index out of range 0..{C - 1}")
        if x.image.size and (x.image.min() < 0 or x.image.max() >= len(image_ids)):
            raise ValueError(f"{what}: image index out of range 0..{len(image_ids) - 1}")
    tk = threshold_key(iou_threshold)
    # Only the overlaps some metric reads: same class, IoU > t (and >= 0.5 for COCO) for
    # every detection; for those at the operating point also the poor localisations
    # (>= 0.1) and other classes' objects above t (mislabelled). This halves the polygon work.
    live = dets.score >= score_thresh
    low = min(iou_threshold, 0.5) if coco else iou_threshold
    pairs = overlapping_pairs(
        gt,
        dets,
        len(image_ids),
        np.where(live, min(MISLOCALISED_IOU, low), low),
        min_iou_other=np.where(live, iou_threshold, np.inf),
    )
    pd, pg, piou = pairs
    same = dets.label[pd] == gt.label[pg]
    best_iou, best_gt = _best_per_det(pd[same], pg[same], piou[same], D)
    rank = kit_rank(dets.label, dets.score, C)
    outcome = voc_outcome(best_iou, best_gt, rank, gt.difficult, iou_threshold)

    metrics: dict[str, Any] = {
        "iou_threshold": iou_threshold,
        "num_images": len(image_ids),
        "num_detections": int(D),
        "num_ground_truths": int(G),
        "num_difficult": int(gt.difficult.sum()),
    }
    curves: dict[str, dict[str, np.ndarray]] = {}
    det_order: list[np.ndarray] = []
    ap07, ap_all = {}, {}
    for c, name in enumerate(classes):
        idx = np.flatnonzero(dets.label == c)
        idx = idx[np.argsort(rank[idx])]
        det_order.append(idx)
        npos = int(((gt.label == c) & ~gt.difficult).sum())
        tp = np.cumsum(outcome[idx] == TP, dtype=np.float64)
        fp = np.cumsum(outcome[idx] == FP, dtype=np.float64)
        metrics[f"npos/{name}"] = npos
        if npos == 0:
            ap07[name] = ap_all[name] = None
            curves[name] = {"score": dets.score[idx], "precision": tp * 0, "recall": tp * 0}
            continue
        rec = tp / float(npos)
        prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
        curves[name] = {"score": dets.score[idx], "precision": prec, "recall": rec}
        ap07[name] = voc07_ap(rec, prec)
        ap_all[name] = voc_all_point_ap(rec, prec)
    metrics[f"map{tk}"] = _mean(ap07.values())
    metrics["map_voc_all"] = _mean(ap_all.values())
    for name in classes:
        metrics[f"ap{tk}/{name}"] = ap07[name]
    for name in classes:
        metrics[f"ap_voc_all/{name}"] = ap_all[name]
    _recall_at_precision(metrics, classes, curves, ap07, precision_targets)

    if coco:
        metrics.update(
            _coco_metrics(classes, gt, dets, (pd[same], pg[same], piou[same]), size_bounds)
        )
        metrics.update(
            _strict_metrics(
                classes, gt, dets, (pd[same], pg[same], piou[same]), best_iou, best_gt, rank,
                score_thresh,
            )
        )  # fmt: skip
    fp_kind, gt_kind, confusion = _confusion(
        classes, gt, dets, pairs, outcome, best_iou, best_gt, iou_threshold, score_thresh
    )
    if gt.first_corner is not None and dets.first_corner is not None:
        live_tp = (outcome == TP) & (dets.score >= score_thresh)
        metrics.update(heading_metrics(classes, gt, dets, live_tp, best_gt))
    metrics["confusion/score_thresh"] = score_thresh
    metrics["confusion/tp"] = int(((outcome == TP) & (dets.score >= score_thresh)).sum())
    for k, name in enumerate(FP_KINDS):
        metrics[f"confusion/fp_{name}"] = int((fp_kind == k).sum())
    for k, name in enumerate(GT_KINDS):
        metrics[f"confusion/gt_{name}"] = int((gt_kind == k).sum())
    return Evaluation(
        metrics=metrics,
        classes=tuple(classes),
        image_ids=tuple(image_ids),
        curves=curves,
        det_order=det_order,
        det_outcome=outcome,
        det_best_iou=best_iou,
        det_fp_kind=fp_kind,
        gt_kind=gt_kind,
        confusion=confusion,
    )


STRICT_IOU = 0.75  # the strict threshold of dota_map75 and found75


def _strict_metrics(
    classes: Sequence[str],
    gt: GroundTruth,
    dets: Detections,
    same_pairs: tuple[np.ndarray, np.ndarray, np.ndarray],
    best_iou: np.ndarray,
    best_gt: np.ndarray,
    rank: np.ndarray,
    score_thresh: float,
) -> dict[str, Any]:
    """``dota_map75`` (``dota_ap75/<class>``): the kit's rule (VOC07 11-point, IoU > 0.75);
    ``found75`` (``/<class>``, ``/orient_<bucket>``): the share of non-difficult objects that
    some detection of their class scoring ``>= score_thresh`` overlaps by IoU ``>= 0.75``,
    by class and by the object's orientation (module docstring)."""
    out: dict[str, Any] = {}
    outcome = voc_outcome(best_iou, best_gt, rank, gt.difficult, STRICT_IOU)
    aps = []
    for c, name in enumerate(classes):
        idx = np.flatnonzero(dets.label == c)
        idx = idx[np.argsort(rank[idx])]
        npos = int(((gt.label == c) & ~gt.difficult).sum())
        if npos == 0:
            out[f"dota_ap75/{name}"] = None
            continue
        tp = np.cumsum(outcome[idx] == TP, dtype=np.float64)
        fp = np.cumsum(outcome[idx] == FP, dtype=np.float64)
        prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
        out[f"dota_ap75/{name}"] = voc07_ap(tp / float(npos), prec)
        aps.append(out[f"dota_ap75/{name}"])
    out["dota_map75"] = _mean(aps)
    pd, pg, piou = same_pairs
    hit = (piou >= STRICT_IOU) & (dets.score[pd] >= score_thresh)
    found = np.zeros(gt.label.size, bool)
    found[pg[hit]] = True
    counted = ~gt.difficult
    out["found75"] = float(found[counted].mean()) if counted.any() else None
    for c, name in enumerate(classes):
        sel = counted & (gt.label == c)
        out[f"found75/{name}"] = float(found[sel].mean()) if sel.any() else None
    orient = orientation_offset(gt.polyboxes)
    for oname, (a, b) in ORIENTATIONS.items():
        sel = counted & (orient >= a) & (orient <= b)
        out[f"found75/orient_{oname}"] = float(found[sel].mean()) if sel.any() else None
    return out


HEADING_TOLERANCES = (45.0, 10.0)  # degrees


def heading_metrics(
    classes: Sequence[str],
    gt: GroundTruth,
    dets: Detections,
    matched: np.ndarray,
    best_gt: np.ndarray,
) -> dict[str, Any]:
    """``heading_acc{45,10}`` (mean and per class) and ``heading_count/<class>`` of the
    detections ``matched [D]`` (bool) to the ground truths ``best_gt [D]`` (module docstring)."""
    assert gt.first_corner is not None and dets.first_corner is not None
    sel = np.flatnonzero(matched & (dets.first_corner >= 0))
    sel = sel[gt.first_corner[best_gt[sel]] >= 0]
    g = best_gt[sel]
    d_head = heading.heading_degrees(
        torch.from_numpy(dets.polyboxes[sel]), torch.from_numpy(dets.first_corner[sel])
    )
    g_head = heading.heading_degrees(
        torch.from_numpy(gt.polyboxes[g]), torch.from_numpy(gt.first_corner[g])
    )
    err = heading.angle_error(d_head, g_head).numpy()
    out: dict[str, Any] = {}
    per: dict[float, dict[str, float | None]] = {t: {} for t in HEADING_TOLERANCES}
    for c, name in enumerate(classes):
        e = err[dets.label[sel] == c]
        out[f"heading_count/{name}"] = int(e.size)
        for t in HEADING_TOLERANCES:
            per[t][name] = float((e <= t).mean()) if e.size else None
    for t in HEADING_TOLERANCES:
        out[f"heading_acc{t:.0f}"] = _mean(per[t].values())
        for name in classes:
            out[f"heading_acc{t:.0f}/{name}"] = per[t][name]
    return out


def _mean(values: Any) -> float | None:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(vals)) if vals else None


def _recall_at_precision(
    metrics: dict[str, Any],
    classes: Sequence[str],
    curves: dict[str, dict[str, np.ndarray]],
    ap: dict[str, float | None],
    targets: Sequence[float],
) -> None:
    for p in targets:
        pk = precision_key(p)
        recalls = []
        for name in classes:
            cv = curves[name]
            if ap[name] is None:
                metrics[f"recall_at_{pk}/{name}"] = metrics[f"score_at_{pk}/{name}"] = None
                continue
            ok = np.flatnonzero(cv["precision"] >= p)
            if ok.size == 0 or cv["recall"][ok].max() == 0:
                r, s = 0.0, None
            else:
                i = ok[np.argmax(cv["recall"][ok])]  # first (highest score) point of max recall
                r, s = float(cv["recall"][i]), float(cv["score"][i])
            metrics[f"recall_at_{pk}/{name}"] = r
            metrics[f"score_at_{pk}/{name}"] = s
            recalls.append(r)
        metrics[f"recall_at_{pk}"] = _mean(recalls)


def orientation_offset(polyboxes: np.ndarray) -> np.ndarray:
    """``|angle mod 90 - 45|`` in degrees ``[N]`` of polyboxes ``[N, 10]``: 0 for an object
    at 45 degrees, 45 for an axis-aligned one. The angle is the mean direction of the 4 edges
    modulo 90 degrees (a circular mean of 4x the edge angles, weighted by edge length), which
    is a rectangle's rotation exactly and does not depend on the corner order."""
    corners = polyboxes[:, 2:].reshape(-1, 4, 2).astype(np.float64)
    edges = np.roll(corners, -1, axis=1) - corners  # [N, 4, 2]
    length = np.hypot(edges[..., 0], edges[..., 1])
    angle4 = 4.0 * np.arctan2(edges[..., 1], edges[..., 0])
    mean4 = np.arctan2((length * np.sin(angle4)).sum(1), (length * np.cos(angle4)).sum(1))
    angle = np.degrees(mean4 / 4.0) % 90.0  # [0, 90)
    return np.abs(angle - 45.0)


def _coco_metrics(
    classes: Sequence[str],
    gt: GroundTruth,
    dets: Detections,
    same_pairs: tuple[np.ndarray, np.ndarray, np.ndarray],
    size_bounds: tuple[float, float],
) -> dict[str, Any]:
    """COCO-style AP over IoU 0.50:0.95, overall and per size range (module docstring)."""
    C, D = len(classes), dets.score.size
    # Per (image, class) group: descending score, stable (pycocotools uses mergesort).
    group = dets.image * C + dets.label
    o = np.lexsort((np.arange(D), -dets.score, group))
    det_rank = np.empty(D, np.int64)
    starts = _segment_starts(group[o])
    det_rank[o] = np.arange(D) - np.repeat(starts, np.diff(np.r_[starts, D]))
    kept = det_rank < COCO_MAX_DETS
    pd, pg, piou = same_pairs
    sel = (piou >= COCO_IOUS[0]) & kept[pd]
    pd, pg, piou = pd[sel], pg[sel], piou[sel]
    gt_area = polybox_area(torch.from_numpy(gt.polyboxes)).numpy()
    det_area = polybox_area(torch.from_numpy(dets.polyboxes)).numpy()
    lo, hi = size_bounds[0] ** 2, size_bounds[1] ** 2
    # Ranges of a property (area or orientation) as COCO's area ranges: ground truths outside
    # are ignored, and so are unmatched detections outside.
    gt_orient, det_orient = orientation_offset(gt.polyboxes), orientation_offset(dets.polyboxes)
    ranges = {
        "all": (gt_area, det_area, 0.0, 1e10),
        "small": (gt_area, det_area, 0.0, lo),
        "medium": (gt_area, det_area, lo, hi),
        "large": (gt_area, det_area, hi, 1e10),
        **{f"orient_{k}": (gt_orient, det_orient, a, b) for k, (a, b) in ORIENTATIONS.items()},
    }
    gt_ignore = np.stack([gt.difficult | (g < a0) | (g > a1) for g, _, a0, a1 in ranges.values()])
    det_out = np.stack([(d < a0) | (d > a1) for _, d, a0, a1 in ranges.values()])
    matched = _coco_match(pd, pg, piou, det_rank, gt_ignore, gt.difficult, D)  # [R, T, D]
    # Accumulation order per class: score descending, then image, then rank in image.
    orders = []
    for c in range(C):
        idx = np.flatnonzero((dets.label == c) & kept)
        orders.append(idx[np.lexsort((det_rank[idx], dets.image[idx], -dets.score[idx]))])
    out: dict[str, Any] = {}
    per_range: dict[str, dict[str, np.ndarray]] = {}
    recall: dict[str, np.ndarray] = {}  # [classes, T] per range
    for r, rname in enumerate(ranges):
        m = matched[r] >= 0
        det_ignore = np.broadcast_to(det_out[r], m.shape).copy()
        det_ignore[m] = gt_ignore[r][matched[r][m]]
        num_gt = [int(((gt.label == c) & ~gt_ignore[r]).sum()) for c in range(C)]
        per_range[rname] = {
            name: coco_ap(matched[r], det_ignore, orders[c], num_gt[c])
            for c, name in enumerate(classes)
        }
        recall[rname] = np.array(
            [coco_recall(matched[r], det_ignore, orders[c], num_gt[c]) for c in range(C)]
        ).reshape(C, -1)
        out[f"num_gt/{rname}"] = int((~gt_ignore[r]).sum())
    for name in classes:
        ap = per_range["all"][name]
        out[f"ap50_95/{name}"] = None if np.isnan(ap[0]) else float(ap.mean())
    # A class without ground truth in a range is NaN at every threshold: _mean drops it.
    allc = np.array([per_range["all"][n] for n in classes]).reshape(len(classes), -1)
    out["map50_95"] = _mean(allc.mean(axis=1))
    out["map50_coco"] = _mean(allc[:, 0])
    out["map75"] = _mean(allc[:, 5])
    # Recall with up to 100 detections per image: the ceiling of AP at that IoU, whatever the
    # ranking (COCO's AR@100 averages it over 0.50:0.95).
    out["mar100"] = _mean(recall["all"].mean(axis=1))
    out["recall75"] = _mean(recall["all"][:, 5])
    for rname in SIZES:
        arr = np.array([per_range[rname][n] for n in classes]).reshape(len(classes), -1)
        out[f"map50_95/{rname}"] = _mean(arr.mean(axis=1))
        out[f"map50_coco/{rname}"] = _mean(arr[:, 0])
    for oname in ORIENTATIONS:
        arr = np.array([per_range[f"orient_{oname}"][n] for n in classes])
        arr = arr.reshape(len(classes), -1)
        out[f"map50_coco/orient_{oname}"] = _mean(arr[:, 0])
        out[f"map75/orient_{oname}"] = _mean(arr[:, 5])
        out[f"recall75/orient_{oname}"] = _mean(recall[f"orient_{oname}"][:, 5])
    return out


def _confusion(
    classes: Sequence[str],
    gt: GroundTruth,
    dets: Detections,
    pairs: tuple[np.ndarray, np.ndarray, np.ndarray],
    outcome: np.ndarray,
    best_iou: np.ndarray,
    best_gt: np.ndarray,
    iou_threshold: float,
    score_thresh: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FP kinds ``[D]``, ground-truth kinds ``[G]`` and the confusion matrix (module docstring)."""
    C, D, G = len(classes), dets.score.size, gt.label.size
    pd, pg, piou = pairs
    live = dets.score >= score_thresh
    on = live[pd]
    pd, pg, piou = pd[on], pg[on], piou[on]
    same = dets.label[pd] == gt.label[pg]
    # Best IoU with a ground truth of another class, and which one.
    other_iou, other_gt = _best_per_det(pd[~same], pg[~same], piou[~same], D)
    fp = live & (outcome == FP)
    kind = np.full(D, -1, np.int8)
    kind[fp] = FP_KINDS.index("background")
    kind[fp & (best_iou >= MISLOCALISED_IOU)] = FP_KINDS.index("mislocalised")
    kind[fp & (other_iou > iou_threshold)] = FP_KINDS.index("mislabelled")
    kind[fp & (best_iou > iou_threshold)] = FP_KINDS.index("duplicate")

    gkind = np.full(G, -1, np.int8)
    gkind[~gt.difficult] = GT_KINDS.index("missed")
    near = np.zeros(G, bool)
    near[pg[same & (piou >= MISLOCALISED_IOU)]] = True
    gkind[near & ~gt.difficult] = GT_KINDS.index("mislocalised")
    # Mislabelled: another class's detection overlaps it above the threshold (best such det).
    wrong = ~same & (piou > iou_threshold)
    wlabel = np.full(G, -1, np.int64)
    if wrong.any():
        wd, wg, wi = pd[wrong], pg[wrong], piou[wrong]
        o = np.lexsort((-wi, wg))
        first = o[_segment_starts(wg[o])]
        wlabel[wg[first]] = dets.label[wd[first]]
    gkind[(wlabel >= 0) & ~gt.difficult] = GT_KINDS.index("mislabelled")
    hit = best_gt[live & (outcome == TP)]
    gkind[hit] = GT_KINDS.index("detected")

    confusion = np.zeros((C + 1, C + 1), np.int64)
    real = ~gt.difficult
    pred = np.where(
        gkind == GT_KINDS.index("detected"),
        gt.label,
        np.where(gkind == GT_KINDS.index("mislabelled"), wlabel, C),
    )
    np.add.at(confusion, (gt.label[real], pred[real]), 1)
    bg = fp & (kind != FP_KINDS.index("mislabelled"))
    np.add.at(confusion, (np.full(int(bg.sum()), C), dets.label[bg]), 1)
    return kind, gkind, confusion
