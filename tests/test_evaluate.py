"""Tests of polydet.eval.evaluate: hand-computed AP, and agreement with direct reimplementations
of the DOTA development kit's ``voc_eval`` and of pycocotools' matching (per detection, with
shapely standing in for the kit's ``polyiou``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from shapely.geometry import Polygon

from polydet.core.errors import DataError
from polydet.eval import evaluate as ev
from polydet.eval import metrics
from polydet.eval.metrics import orientation_offset
from polydet.geometry.polybox import from_corners

# --- independent references (per detection, as the originals loop) -----------------------


def kit_parse_gt(filename: str) -> list[dict]:
    """The kit's ``parse_gt``."""
    objects = []
    with open(filename) as f:
        for line in f:
            parts = line.strip().split(" ")
            if len(parts) < 9:
                continue
            obj = {"name": parts[8], "bbox": [float(v) for v in parts[:8]]}
            obj["difficult"] = int(parts[9]) if len(parts) == 10 else 0
            objects.append(obj)
    return objects


def kit_voc_ap(rec: np.ndarray, prec: np.ndarray, use_07_metric: bool) -> float:
    """The kit's ``voc_ap``, loops and all."""
    if use_07_metric:
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            p = 0 if np.sum(rec >= t) == 0 else np.max(prec[rec >= t])
            ap = ap + p / 11.0
        return ap
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    for i in range(mpre.size - 1, 0, -1):
        mpre[i - 1] = np.maximum(mpre[i - 1], mpre[i])
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def shapely_iou(p: list[float] | np.ndarray, q: list[float] | np.ndarray) -> float:
    """Stand-in for the kit's ``polyiou.iou_poly`` on 8 corner coordinates each."""
    a = Polygon(np.asarray(p, float).reshape(4, 2))
    b = Polygon(np.asarray(q, float).reshape(4, 2))
    inter = a.intersection(b).area
    return inter / (a.area + b.area - inter)


def kit_load(
    detpath: str, annopath: str, imagenames: list[str], classname: str
) -> tuple[dict, int, list[str], np.ndarray, np.ndarray]:
    """The reading half of the kit's ``voc_eval``: ground truths of one class per image
    (with their ``det`` flags), npos, and the detections in file order."""
    recs = {name: kit_parse_gt(annopath.format(name)) for name in imagenames}
    class_recs, npos = {}, 0
    for name in imagenames:
        R = [o for o in recs[name] if o["name"] == classname]
        difficult = np.array([o["difficult"] for o in R]).astype(bool)
        npos += int(sum(~difficult))
        class_recs[name] = {
            "bbox": np.array([o["bbox"] for o in R]),
            "difficult": difficult,
            "det": [False] * len(R),
        }
    try:
        with open(detpath.format(classname)) as f:
            lines = f.readlines()
    except FileNotFoundError:
        lines = []
    splitlines = [x.strip().split(" ") for x in lines]
    image_ids = [x[0] for x in splitlines]
    confidence = np.array([float(x[1]) for x in splitlines])
    BB = np.array([[float(z) for z in x[2:]] for x in splitlines]).reshape(-1, 8)
    return class_recs, npos, image_ids, confidence, BB


def kit_match(
    class_recs: dict,
    npos: int,
    image_ids: list[str],
    confidence: np.ndarray,
    BB: np.ndarray,
    ovthresh: float = 0.5,
    use_07_metric: bool = True,
) -> float:
    """The matching half of the kit's ``voc_eval``: its loop over detections, ``polyiou``
    replaced by shapely. Returns NaN where the kit would divide by npos = 0."""
    sorted_ind = np.argsort(-confidence)
    BB = BB[sorted_ind, :]
    image_ids = [image_ids[x] for x in sorted_ind]
    nd = len(image_ids)
    tp, fp = np.zeros(nd), np.zeros(nd)
    for d in range(nd):
        R = class_recs[image_ids[d]]
        bb = BB[d, :].astype(float)
        ovmax = -np.inf
        BBGT = R["bbox"].astype(float)
        if BBGT.size > 0:
            # The kit's hull pre-filter (with its +1 pixel convention), then polygon IoU.
            gx0, gy0 = BBGT[:, 0::2].min(1), BBGT[:, 1::2].min(1)
            gx1, gy1 = BBGT[:, 0::2].max(1), BBGT[:, 1::2].max(1)
            bx0, by0, bx1, by1 = bb[0::2].min(), bb[1::2].min(), bb[0::2].max(), bb[1::2].max()
            iw = np.maximum(np.minimum(gx1, bx1) - np.maximum(gx0, bx0) + 1.0, 0.0)
            ih = np.maximum(np.minimum(gy1, by1) - np.maximum(gy0, by0) + 1.0, 0.0)
            inters = iw * ih
            uni = (bx1 - bx0 + 1.0) * (by1 - by0 + 1.0) + (gx1 - gx0 + 1.0) * (gy1 - gy0 + 1.0)
            keep = np.where(inters / (uni - inters) > 0)[0]
            if len(keep) > 0:
                overlaps = [shapely_iou(BBGT[k], bb) for k in keep]
                ovmax = np.max(overlaps)
                jmax = keep[np.argmax(overlaps)]
        if ovmax > ovthresh:
            if not R["difficult"][jmax]:
                if not R["det"][jmax]:
                    tp[d] = 1.0
                    R["det"][jmax] = 1
                else:
                    fp[d] = 1.0
        else:
            fp[d] = 1.0
    if npos == 0:
        return math.nan
    fp, tp = np.cumsum(fp), np.cumsum(tp)
    rec = tp / float(npos)
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return kit_voc_ap(rec, prec, use_07_metric)


def kit_voc_eval(
    detpath: str,
    annopath: str,
    imagenames: list[str],
    classname: str,
    ovthresh: float = 0.5,
    use_07_metric: bool = True,
) -> float:
    """The kit's ``voc_eval`` (dota_evaluation_task1.py) with shapely for ``polyiou``."""
    loaded = kit_load(detpath, annopath, imagenames, classname)
    return kit_match(*loaded, ovthresh=ovthresh, use_07_metric=use_07_metric)


def coco_reference(
    gts: list[dict],
    dets: list[dict],
    num_images: int,
    label: int,
    area_rng: tuple[float, float],
    with_recall: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """pycocotools' evaluateImg + accumulate for one class and area range -> AP ``[10]``
    (and, ``with_recall``, accumulate's recall ``[10]``: the final tp / npig).

    ``gts``: dicts with image, label, corners, difficult (ignored, reusable like a crowd);
    ``dets``: image, label, score, corners.
    """
    ious_t = np.linspace(0.5, 0.95, 10)
    rec_thrs = np.linspace(0.0, 1.0, 101)
    area = lambda o: Polygon(np.reshape(o["corners"], (4, 2))).area  # noqa: E731
    scores, dtm_all, dtig_all, npig = [], [], [], 0
    for img in range(num_images):
        g = [o for o in gts if o["image"] == img and o["label"] == label]
        d = [o for o in dets if o["image"] == img and o["label"] == label]
        if not g and not d:
            continue
        g_ig = [o["difficult"] or area(o) < area_rng[0] or area(o) > area_rng[1] for o in g]
        gi = np.argsort(g_ig, kind="mergesort")
        g = [g[i] for i in gi]
        g_ig = np.array([g_ig[i] for i in gi], dtype=bool)
        crowd = [o["difficult"] for o in g]
        di = np.argsort([-o["score"] for o in d], kind="mergesort")
        d = [d[i] for i in di[:100]]
        ious = np.array([[shapely_iou(a["corners"], b["corners"]) for b in g] for a in d])
        T, D, G = len(ious_t), len(d), len(g)
        gtm, dtm, dt_ig = np.zeros((T, G)), np.zeros((T, D)), np.zeros((T, D))
        for t_i, t in enumerate(ious_t):
            for d_i in range(D):
                iou, m = min(t, 1 - 1e-10), -1
                for g_i in range(G):
                    if gtm[t_i, g_i] > 0 and not crowd[g_i]:
                        continue
                    if m > -1 and not g_ig[m] and g_ig[g_i]:
                        break
                    if ious[d_i, g_i] < iou:
                        continue
                    iou, m = ious[d_i, g_i], g_i
                if m == -1:
                    continue
                dt_ig[t_i, d_i] = g_ig[m]
                dtm[t_i, d_i] = 1
                gtm[t_i, m] = 1
        out = np.array([area(o) < area_rng[0] or area(o) > area_rng[1] for o in d], dtype=bool)
        dt_ig = np.logical_or(dt_ig, np.logical_and(dtm == 0, out[None]))
        scores += [o["score"] for o in d]
        dtm_all.append(dtm)
        dtig_all.append(dt_ig)
        npig += int((~g_ig).sum())
    if npig == 0:
        return (np.full(10, np.nan),) * 2 if with_recall else np.full(10, np.nan)
    scores = np.array(scores)
    inds = np.argsort(-scores, kind="mergesort")
    dtm = np.concatenate(dtm_all, axis=1)[:, inds] if dtm_all else np.zeros((10, 0))
    dt_ig = np.concatenate(dtig_all, axis=1)[:, inds] if dtig_all else np.zeros((10, 0))
    tps = np.logical_and(dtm, np.logical_not(dt_ig))
    fps = np.logical_and(np.logical_not(dtm), np.logical_not(dt_ig))
    ap, recall = np.zeros(10), np.zeros(10)
    for t_i, (tp, fp) in enumerate(zip(np.cumsum(tps, 1).astype(float), np.cumsum(fps, 1))):
        rc = tp / npig
        recall[t_i] = rc[-1] if len(rc) else 0.0
        pr = list(tp / (fp + tp + np.spacing(1)))
        for i in range(len(pr) - 1, 0, -1):
            pr[i - 1] = max(pr[i - 1], pr[i])
        q = np.zeros(len(rec_thrs))
        for ri, pi in enumerate(np.searchsorted(rc, rec_thrs, side="left")):
            if pi < len(pr):
                q[ri] = pr[pi]
        ap[t_i] = q.mean()
    return (ap, recall) if with_recall else ap


# --- helpers ---------------------------------------------------------------------------------


def rect(x0: float, y0: float, x1: float, y1: float) -> list[float]:
    """Corners (8 numbers, clockwise on screen) of an axis-aligned rectangle."""
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def make(
    gts: list[tuple[int, int, list[float], bool]],
    dets: list[tuple[int, int, float, list[float]]],
) -> tuple[metrics.GroundTruth, metrics.Detections]:
    """Arrays from ``(image, label, corners, difficult)`` and ``(image, label, score, corners)``."""

    def pb(rows: list[list[float]]) -> np.ndarray:
        c = torch.tensor(rows, dtype=torch.float64).reshape(-1, 4, 2)
        return from_corners(c).numpy()

    gt = metrics.GroundTruth(
        image=np.array([g[0] for g in gts], np.int64),
        label=np.array([g[1] for g in gts], np.int64),
        polyboxes=pb([g[2] for g in gts]),
        difficult=np.array([g[3] for g in gts], bool),
    )
    dt = metrics.Detections(
        image=np.array([d[0] for d in dets], np.int64),
        label=np.array([d[1] for d in dets], np.int64),
        score=np.array([d[2] for d in dets], np.float64),
        polyboxes=pb([d[3] for d in dets]),
    )
    return gt, dt


# --- hand-computed cases ---------------------------------------------------------------------


def test_hand_computed_ap_with_duplicate_and_background() -> None:
    # Two ground truths; detections: hit g0, duplicate on g0, hit g1, background.
    gt, dt = make(
        [(0, 0, rect(0, 0, 10, 10), False), (0, 0, rect(20, 20, 30, 30), False)],
        [
            (0, 0, 0.9, rect(0, 0, 10, 9)),  # IoU 0.9
            (0, 0, 0.8, rect(1, 0, 10, 10)),  # IoU 0.9, but g0 is taken: duplicate
            (0, 0, 0.7, rect(20, 21, 30, 30)),
            (0, 0, 0.6, rect(50, 50, 60, 60)),
        ],
    )
    r = metrics.evaluate_detections(["a"], ["car"], gt, dt)
    # tp = [1,0,1,0]: recall [.5,.5,1,1], precision [1,.5,2/3,.5].
    # VOC07: recall >= t for t <= .5 reaches precision 1 (6 points), then 2/3 (5 points).
    assert r.metrics["map50"] == pytest.approx((6 * 1 + 5 * (2 / 3)) / 11, abs=1e-12)
    # All-point: 0.5 * 1 + 0.5 * 2/3.
    assert r.metrics["map_voc_all"] == pytest.approx(0.5 + 0.5 * 2 / 3, abs=1e-12)
    assert r.det_outcome.tolist() == [metrics.TP, metrics.FP, metrics.TP, metrics.FP]
    kinds = [metrics.FP_KINDS[k] if k >= 0 else None for k in r.det_fp_kind]
    assert kinds == [None, "duplicate", None, "background"]
    assert r.metrics["recall_at_p90/car"] == 0.5
    assert r.metrics["score_at_p90/car"] == 0.9
    assert r.metrics["recall_at_p50/car"] == 1.0


def test_difficult_objects_are_neither_true_nor_false_positives() -> None:
    gt, dt = make(
        [(0, 0, rect(0, 0, 10, 10), False), (0, 0, rect(20, 20, 30, 30), True)],
        [
            (0, 0, 0.95, rect(20, 20, 30, 29)),  # on the difficult one: ignored
            (0, 0, 0.9, rect(21, 20, 30, 30)),  # again: still ignored (no "det" flag set)
            (0, 0, 0.5, rect(0, 0, 10, 9)),
        ],
    )
    r = metrics.evaluate_detections(["a"], ["car"], gt, dt)
    assert r.det_outcome.tolist() == [metrics.IGNORED, metrics.IGNORED, metrics.TP]
    assert r.metrics["npos/car"] == 1  # difficult objects do not count in recall
    assert r.metrics["map50"] == pytest.approx(1.0)
    assert r.metrics["map_voc_all"] == pytest.approx(1.0)
    assert r.gt_kind.tolist() == [metrics.GT_KINDS.index("detected"), -1]


def test_empty_class_image_without_ground_truth_and_class_without_detections() -> None:
    gt, dt = make(
        [(0, 0, rect(0, 0, 10, 10), False), (0, 2, rect(40, 40, 50, 50), False)],
        [
            (0, 0, 0.9, rect(0, 0, 10, 9)),
            (1, 0, 0.95, rect(0, 0, 10, 10)),  # image 1 has no ground truth: a false positive
            (1, 1, 0.8, rect(0, 0, 10, 10)),  # class 1 has no ground truth anywhere
        ],
    )
    r = metrics.evaluate_detections(["a", "b"], ["car", "ship", "kite"], gt, dt)
    # car: fp then tp -> recall [0, 1], precision [0, .5].
    assert r.metrics["ap50/car"] == pytest.approx(0.5)
    assert r.metrics["ap50/ship"] is None  # no ground truth: undefined, not 0
    assert r.metrics["ap50/kite"] == 0.0  # ground truth, no detection
    assert r.metrics["map50"] == pytest.approx(0.25)  # mean over car and kite only
    assert r.metrics["ap50_95/ship"] is None
    assert r.metrics["map50_95"] is not None


def test_no_overlap_at_all_and_degenerate_boxes() -> None:
    gt, dt = make(
        [(0, 0, rect(0, 0, 10, 10), False), (1, 0, rect(5, 5, 5, 5), False)],  # a point
        [(0, 0, 0.9, rect(50, 50, 60, 60)), (1, 0, 0.8, rect(0, 0, 10, 10))],
    )
    r = metrics.evaluate_detections(["a", "b"], ["car"], gt, dt)
    assert r.det_outcome.tolist() == [metrics.FP, metrics.FP]
    assert (r.metrics["map50"], r.metrics["map50_95"]) == (0.0, 0.0)
    gt, dt = make([], [(0, 0, 0.9, rect(50, 50, 60, 60))])
    r = metrics.evaluate_detections(["a"], ["car"], gt, dt)
    assert r.metrics["map50"] is None and r.metrics["map50_95"] is None


def test_voc07_recall_of_three_tenths_misses_the_point_at_0_3() -> None:
    # The kit compares recall with np.arange(0, 1.1, 0.1), whose 4th value is
    # 0.30000000000000004 > 3/10: a curve that ends at recall 0.3 earns 3 points, not 4.
    rec = np.array([0.1, 0.2, 3 / 10])
    prec = np.ones(3)
    assert metrics.voc07_ap(rec, prec) == pytest.approx(3 / 11, abs=1e-15)
    assert metrics.voc07_ap(rec, prec) == kit_voc_ap(rec, prec, True)


def test_iou_must_exceed_the_threshold_strictly() -> None:
    out = metrics.voc_outcome(
        best_iou=np.array([0.5, 0.5000001]),
        best_gt=np.array([0, 1]),
        rank=np.array([0, 1]),
        difficult=np.zeros(2, bool),
        iou_threshold=0.5,
    )
    assert out.tolist() == [metrics.FP, metrics.TP]


def test_coco_style_ap_hand_computed() -> None:
    # IoU 0.72 matches at 0.50 ... 0.70 (5 of the 10 thresholds).
    gt, dt = make([(0, 0, rect(0, 0, 10, 10), False)], [(0, 0, 0.9, rect(0, 0, 10, 7.2))])
    r = metrics.evaluate_detections(["a"], ["car"], gt, dt)
    assert r.metrics["map50_95"] == pytest.approx(0.5)
    assert r.metrics["map50_coco"] == pytest.approx(1.0)
    assert r.metrics["map75"] == pytest.approx(0.0)
    # A higher-scored false positive halves the precision at every recall.
    gt, dt = make(
        [(0, 0, rect(0, 0, 10, 10), False)],
        [(0, 0, 0.9, rect(0, 0, 10, 7.2)), (0, 0, 0.95, rect(50, 50, 60, 60))],
    )
    r = metrics.evaluate_detections(["a"], ["car"], gt, dt)
    assert r.metrics["map50_95"] == pytest.approx(0.25, abs=1e-9)


def test_equal_ious_go_to_the_first_ground_truth_as_in_the_kit() -> None:
    # The same object annotated twice, first as difficult: np.argmax takes the first.
    gt, dt = make(
        [(0, 0, rect(0, 0, 10, 10), True), (0, 0, rect(0, 0, 10, 10), False)],
        [(0, 0, 0.9, rect(0, 0, 10, 9))],
    )
    r = metrics.evaluate_detections(["a"], ["car"], gt, dt)
    assert r.det_outcome.tolist() == [metrics.IGNORED]


def test_coco_prefers_a_non_ignored_ground_truth_over_a_better_ignored_one() -> None:
    # IoU 0.9 with a difficult object, 60/90 with an ordinary one.
    gt, dt = make(
        [(0, 0, rect(0, 0, 10, 10), True), (0, 0, rect(0, 0, 10, 6), False)],
        [(0, 0, 0.9, rect(0, 0, 10, 9))],
    )
    r = metrics.evaluate_detections(["a"], ["car"], gt, dt)
    # COCO: a true positive at 0.50 ... 0.65 (4 thresholds), ignored from 0.70 to 0.90.
    assert r.metrics["map50_95"] == pytest.approx(0.4)
    # DOTA: the best IoU is with the difficult object, so the detection is ignored.
    assert r.metrics["map50"] == 0.0


def test_ap_by_size_ignores_objects_of_other_sizes() -> None:
    # A small object found, a large one missed: AP small = 1, AP large = 0, medium undefined.
    gt, dt = make(
        [(0, 0, rect(0, 0, 10, 10), False), (0, 0, rect(100, 100, 250, 250), False)],
        [(0, 0, 0.9, rect(0, 0, 10, 10))],
    )
    r = metrics.evaluate_detections(["a"], ["car"], gt, dt, size_bounds=(32.0, 96.0))
    assert r.metrics["map50_95/small"] == pytest.approx(1.0)
    assert r.metrics["map50_95/large"] == pytest.approx(0.0)
    assert r.metrics["map50_95/medium"] is None
    assert (r.metrics["num_gt/small"], r.metrics["num_gt/large"]) == (1, 1)


def rotated_rect(cx: float, cy: float, w: float, h: float, degrees: float) -> list[float]:
    """Corners (8 numbers) of a ``w x h`` rectangle centred at ``(cx, cy)``, rotated."""
    t = math.radians(degrees)
    c, s = math.cos(t), math.sin(t)
    pts = [(-w / 2, -h / 2), (w / 2, -h / 2), (w / 2, h / 2), (-w / 2, h / 2)]
    return [v for x, y in pts for v in (cx + c * x - s * y, cy + s * x + c * y)]


@pytest.mark.parametrize("degrees", [0.0, 10.0, 37.5, 44.9, 45.1, 60.0, 89.0, 135.0, -20.0])
def test_orientation_offset_is_the_rotation_whatever_the_corner_order(degrees: float) -> None:
    corners = np.array(rotated_rect(50, 40, 30, 12, degrees)).reshape(4, 2)
    expected = abs(degrees % 90.0 - 45.0)
    for start in range(4):  # any first corner, and the reversed ring too
        for ring in (np.roll(corners, -start, 0), np.roll(corners[::-1], -start, 0)):
            p = np.r_[ring.mean(0), (ring - ring.mean(0)).ravel()][None]
            assert orientation_offset(p)[0] == pytest.approx(expected, abs=1e-6)


def test_ap_by_orientation_ignores_objects_of_other_orientations() -> None:
    # A 45-degree object found exactly, an axis-aligned one found loosely (IoU 0.6: a true
    # positive at 0.5, not at 0.75), a 20-degree one (oblique) missed.
    gt, dt = make(
        [
            (0, 0, rotated_rect(50, 50, 40, 20, 45.0), False),
            (0, 0, rect(100, 0, 140, 40), False),
            (0, 0, rotated_rect(200, 200, 40, 20, 20.0), False),
        ],
        [(0, 0, 0.9, rotated_rect(50, 50, 40, 20, 45.0)), (0, 0, 0.8, rect(100, 0, 140, 24))],
    )
    m = metrics.evaluate_detections(["a"], ["car"], gt, dt).metrics
    assert m["map50_coco/orient_diagonal"] == pytest.approx(1.0)
    assert m["map75/orient_diagonal"] == pytest.approx(1.0)
    assert m["map50_coco/orient_axis"] == pytest.approx(1.0)
    assert m["map75/orient_axis"] == pytest.approx(0.0)
    assert m["map50_coco/orient_oblique"] == pytest.approx(0.0)
    recall75 = [m[f"recall75/orient_{k}"] for k in ("diagonal", "oblique", "axis")]
    assert recall75 == pytest.approx([1.0, 0.0, 0.0])
    assert m["recall75"] == pytest.approx(1 / 3)  # one object of three fitted at 0.75
    # AR@100: the exact one at all 10 IoUs, the loose one (IoU 0.6) at 0.50, 0.55 and 0.60
    # (COCO matches IoU >= the threshold).
    assert m["mar100"] == pytest.approx((10 + 3) / 10 / 3)
    counts = [m[f"num_gt/orient_{k}"] for k in ("diagonal", "oblique", "axis")]
    assert counts == [1, 1, 1]


def test_confusion_summary() -> None:
    gt, dt = make(
        [
            (0, 0, rect(0, 0, 10, 10), False),  # found as class 1: mislabelled
            (0, 0, rect(20, 20, 30, 30), False),  # only a poor overlap: mislocalised
            (0, 1, rect(50, 50, 60, 60), False),  # nothing near: missed
            (0, 1, rect(70, 70, 80, 80), False),  # found
        ],
        [
            (0, 1, 0.9, rect(0, 0, 10, 10)),
            (0, 0, 0.8, rect(25, 20, 35, 30)),  # IoU 1/3 with gt 1
            (0, 1, 0.7, rect(70, 70, 80, 80)),
            (0, 0, 0.6, rect(200, 200, 210, 210)),
            (0, 0, 0.1, rect(50, 50, 60, 60)),  # below the operating point: not counted
        ],
    )
    r = metrics.evaluate_detections(["a"], ["car", "ship"], gt, dt, score_thresh=0.3)
    kinds = [metrics.FP_KINDS[k] if k >= 0 else None for k in r.det_fp_kind]
    assert kinds == ["mislabelled", "mislocalised", None, "background", None]
    assert [metrics.GT_KINDS[k] for k in r.gt_kind] == [
        "mislabelled",
        "mislocalised",
        "missed",
        "detected",
    ]
    # rows: car, ship, background; cols: car, ship, missed.
    assert r.confusion.tolist() == [[0, 1, 1], [0, 1, 1], [2, 0, 0]]
    assert r.metrics["confusion/fp_mislabelled"] == 1
    assert r.metrics["confusion/gt_missed"] == 1
    assert r.metrics["confusion/tp"] == 1


# --- agreement with the kit on random data -------------------------------------------------------


def random_quads(rng: np.random.Generator, n: int, size: float) -> np.ndarray:
    """``n`` random convex quads ``[n, 8]``: rotated rectangles with jittered corners, listed
    from a random corner in a random direction (the kit accepts any order)."""
    out = []
    while len(out) < n:
        cx, cy = rng.uniform(0, size, 2)
        w, h = rng.uniform(8, 60, 2)
        a = rng.uniform(0, np.pi)
        base = np.array([[-w, -h], [w, -h], [w, h], [-w, h]]) / 2
        rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
        c = base @ rot.T + [cx, cy] + rng.normal(0, 0.08 * min(w, h), (4, 2))
        poly = Polygon(c)
        if not poly.is_valid or abs(poly.convex_hull.area - poly.area) > 1e-9:
            continue
        c = np.roll(c, rng.integers(4), axis=0)
        out.append(c[::-1] if rng.random() < 0.5 else c)
    return np.round(np.array(out).reshape(n, 8), 1)


def write_random_dota(
    tmp: Path, rng: np.random.Generator, classes: list[str], num_images: int
) -> tuple[list[dict], list[dict]]:
    """Random ground truths (some difficult, some images empty) and detections (near
    misses, duplicates, wrong classes, clutter; coarse scores so that ties occur) as DOTA
    files under ``tmp/ann`` and ``tmp/det``."""
    (tmp / "ann").mkdir()
    (tmp / "det").mkdir()
    gts: list[dict] = []
    dets: list[dict] = []
    for img in range(num_images):
        n = 0 if img % 7 == 3 else int(rng.integers(1, 9))
        for q in random_quads(rng, n, 300):
            gts.append(
                {
                    "image": img,
                    "label": int(rng.integers(len(classes) - 1)),  # the last class: no GT
                    "corners": q,
                    "difficult": bool(rng.random() < 0.15),
                }
            )
    for g in gts:
        for _ in range(int(rng.integers(0, 3))):  # 0, 1 or 2 (a duplicate) detections
            c = g["corners"] + rng.normal(0, rng.uniform(0.5, 8), 8)
            if Polygon(c.reshape(4, 2)).is_valid and Polygon(c.reshape(4, 2)).convex_hull.area:
                lab = g["label"] if rng.random() < 0.85 else int(rng.integers(len(classes)))
                dets.append({"image": g["image"], "label": lab, "corners": np.round(c, 1)})
    for img in range(num_images):
        for q in random_quads(rng, int(rng.integers(0, 4)), 300):
            dets.append({"image": img, "label": int(rng.integers(len(classes))), "corners": q})
    for d in dets:
        d["score"] = float(np.round(rng.random(), 1))  # ties on purpose
    rng.shuffle(dets)
    for img in range(num_images):
        lines = ["imagesource:test", "gsd:null"]
        for g in gts:
            if g["image"] == img:
                xy = " ".join(f"{v:.1f}" for v in g["corners"])
                lines.append(f"{xy} {classes[g['label']]} {int(g['difficult'])}")
        (tmp / "ann" / f"img{img:03d}.txt").write_text("\n".join(lines) + "\n")
    for c, name in enumerate(classes):
        lines = [
            f"img{d['image']:03d} {d['score']:.1f} " + " ".join(f"{v:.1f}" for v in d["corners"])
            for d in dets
            if d["label"] == c
        ]
        (tmp / "det" / f"Task1_{name}.txt").write_text("".join(f"{x}\n" for x in lines))
    return gts, dets


@pytest.mark.parametrize("seed", range(5))
def test_agrees_with_the_dota_kit_on_random_detections(tmp_path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    classes = ["plane", "small-vehicle", "ship", "helicopter"]
    write_random_dota(tmp_path, rng, classes, num_images=25)
    names = [f"img{i:03d}" for i in range(25)]
    det_fmt, ann_fmt = str(tmp_path / "det" / "Task1_{:s}.txt"), str(tmp_path / "ann" / "{:s}.txt")
    for thr in (0.5, 0.7):
        result = ev.evaluate_dota_dirs(tmp_path / "det", tmp_path / "ann", classes, thr)
        tk = f"{round(100 * thr)}"
        aps07, apsall = [], []
        for name in classes:
            ref07 = kit_voc_eval(det_fmt, ann_fmt, names, name, thr, use_07_metric=True)
            refall = kit_voc_eval(det_fmt, ann_fmt, names, name, thr, use_07_metric=False)
            if math.isnan(ref07):
                assert result[f"ap{tk}/{name}"] is None
                continue
            assert abs(result[f"ap{tk}/{name}"] - ref07) < 1e-9, (name, thr)
            assert abs(result[f"ap_voc_all/{name}"] - refall) < 1e-9, (name, thr)
            aps07.append(ref07)
            apsall.append(refall)
        assert abs(result[f"map{tk}"] - np.mean(aps07)) < 1e-9
        assert abs(result["map_voc_all"] - np.mean(apsall)) < 1e-9


@pytest.mark.parametrize("seed", [5, 6])
def test_coco_style_agrees_with_pycocotools_loop(tmp_path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    classes = ["a", "b", "c"]
    gts, dets = write_random_dota(tmp_path, rng, classes, num_images=12)
    image_ids, cls, gt, dt = ev.load_dota_dirs(tmp_path / "det", tmp_path / "ann", classes)
    # Small bounds so that every size range holds objects.
    r = metrics.evaluate_detections(image_ids, cls, gt, dt, size_bounds=(20.0, 40.0)).metrics
    ranges = {"all": (0, 1e10), "small": (0, 400), "medium": (400, 1600), "large": (1600, 1e10)}
    for rname, rng_ in ranges.items():
        per_class = [coco_reference(gts, dets, 12, c, rng_) for c in range(len(classes))]
        valid = [ap for ap in per_class if not np.isnan(ap[0])]
        key = "map50_95" if rname == "all" else f"map50_95/{rname}"
        assert r[key] == pytest.approx(np.mean([ap.mean() for ap in valid]), abs=1e-9), rname
        if rname == "all":
            assert r["map50_coco"] == pytest.approx(np.mean([ap[0] for ap in valid]), abs=1e-9)
            assert r["map75"] == pytest.approx(np.mean([ap[5] for ap in valid]), abs=1e-9)
            recalls = [coco_reference(gts, dets, 12, c, rng_, with_recall=True)[1]
                       for c in range(len(classes))]  # fmt: skip
            recalls = [rc for rc in recalls if not np.isnan(rc[0])]
            assert r["recall75"] == pytest.approx(np.mean([rc[5] for rc in recalls]), abs=1e-9)
            assert r["mar100"] == pytest.approx(np.mean([rc.mean() for rc in recalls]), abs=1e-9)
            assert 0 < r["recall75"] < 1 and r["recall75"] >= r["map75"]
            for c, name in enumerate(classes):
                ref = per_class[c]
                got = r[f"ap50_95/{name}"]
                assert (got is None) if np.isnan(ref[0]) else got == pytest.approx(ref.mean())


# --- files and errors ------------------------------------------------------------------------


def test_dota_files_errors_name_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "ann").mkdir()
    (tmp_path / "det").mkdir()
    (tmp_path / "ann" / "P1.txt").write_text("gsd:0.1\n0 0 10 0 10 10 0 10 plane 0\n")
    det = tmp_path / "det" / "Task1_plane.txt"
    for second_line, error in [
        ("P1 0.8 0 0 10 0 10 ten 0 10", "not a number"),
        ("P1 0.8 0 0 10 0 10 nan 0 10", "non-finite"),
        ("P2 0.9 0 0 10 0 10 10 0 10", "image 'P2' has no annotation"),
        ("P1 0.9 0 0 10 0 10 10 0", "wrong field count"),
    ]:
        det.write_text(f"P1 0.9 0 0 10 0 10 10 0 10\n{second_line}\n")
        with pytest.raises(DataError, match=rf"Task1_plane\.txt:2: {error}"):
            ev.evaluate_dota_dirs(tmp_path / "det", tmp_path / "ann")
    det.write_text("")  # an empty result file: no detections, AP 0
    assert ev.evaluate_dota_dirs(tmp_path / "det", tmp_path / "ann")["map50"] == 0.0
    (tmp_path / "ann" / "P1.txt").write_text("0 0 10 0 10 10 0 10 plane 2\n")
    with pytest.raises(DataError, match=r"P1\.txt:1: bad difficult flag"):
        ev.evaluate_dota_dirs(tmp_path / "det", tmp_path / "ann")


def test_cli_prints_map50_and_per_class_ap(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from polydet.cli import main

    write_random_dota(tmp_path, np.random.default_rng(3), ["plane", "ship"], num_images=4)
    code = main(
        [
            "evaluate",
            "--format",
            "dota",
            "--detections",
            str(tmp_path / "det"),
            "--annotations",
            str(tmp_path / "ann"),
        ]  # fmt: skip
    )
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    names = sorted(p.stem for p in (tmp_path / "ann").glob("*.txt"))
    det_fmt, ann_fmt = str(tmp_path / "det" / "Task1_{:s}.txt"), str(tmp_path / "ann" / "{:s}.txt")
    refs = [kit_voc_eval(det_fmt, ann_fmt, names, c, 0.5, True) for c in ("plane", "ship")]
    assert out["map50"] == pytest.approx(np.mean([r for r in refs if not math.isnan(r)]))
    assert {"ap50/plane", "ap50/ship"} <= set(out)
    # A usage problem is one line on stderr and exit code 2.
    assert main(["evaluate", "--format", "dota", "--detections", str(tmp_path / "det")]) == 2
    assert "needs --detections DIR and --annotations DIR" in capsys.readouterr().err


def test_write_outputs_and_task1_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    gts, dets = write_random_dota(tmp_path, rng, ["plane", "ship"], num_images=5)
    image_ids, classes, gt, dt = ev.load_dota_dirs(tmp_path / "det", tmp_path / "ann")
    r = metrics.evaluate_detections(image_ids, classes, gt, dt)
    ev.write_outputs(r, tmp_path / "out")
    written = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert written["map50"] == pytest.approx(r.metrics["map50"])
    from PIL import Image

    for name in ("pr_curves.png", "score_hist.png", "ap_by_size.png", "confusion.png"):
        with Image.open(tmp_path / "out" / name) as im:  # a whole, decodable PNG
            im.load()
            assert im.format == "PNG" and min(im.size) > 100, name
    pr = (tmp_path / "out" / "pr.csv").read_text().splitlines()
    assert len(pr) > 1 and "precision" in pr[0] and "recall" in pr[0]
    assert json.loads((tmp_path / "out" / "confusion.json").read_text())["matrix"] == (
        r.confusion.tolist()
    )


def test_pairs_are_pairwise_iou_of_same_image_boxes() -> None:
    from polydet.geometry.ops import pairwise_iou

    rng = np.random.default_rng(6)
    q = random_quads(rng, 60, 100)
    img_g, img_d = np.arange(30) % 3, np.arange(30) % 4 % 3  # image 3 would be empty
    gt, dt = make(
        [(int(img_g[i]), 0, list(c), False) for i, c in enumerate(q[:30])],
        [(int(img_d[i]), 0, 0.5, list(c)) for i, c in enumerate(q[30:])],
    )
    dense = pairwise_iou(torch.from_numpy(dt.polyboxes), torch.from_numpy(gt.polyboxes)).numpy()
    dense[img_d[:, None] != img_g[None, :]] = 0  # other images' boxes never pair
    for min_iou in (1e-6, 0.3):
        # A small block forces several image blocks.
        pd, pg, piou = metrics.overlapping_pairs(gt, dt, 4, min_iou, block=150)
        rr, cc = np.nonzero(dense >= min_iou)
        assert list(zip(pd, pg)) == list(zip(rr, cc))
        assert np.abs(piou - dense[rr, cc]).max() < 1e-9
        ref = np.array([shapely_iou(q[30 + d], q[g]) for d, g in zip(pd, pg)])
        assert np.abs(piou - ref).max() < 1e-9
