"""polydet.ops with ``mode="polygon"``: quads measured as the polygon their corners trace in
the stored order, as the DOTA kit's ``polyiou`` does. References: shapely on valid (simple)
polygons, hand-computed bow ties, an independent winding-number reference (shapely faces of
the ring, each weighted by its winding number) on any quad, and the kit's ``voc_eval``
(reimplemented in test_evaluate.py) with that reference as its ``polyiou``."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import shapely
import test_evaluate
import torch
from test_evaluate import kit_voc_eval
from test_ops import random_quads

from polydet.eval import evaluate as ev
from polydet.eval import metrics
from polydet.geometry import ops, polybox
from polydet.geometry.ops import iou_areas, paired_iou, pairwise_iou


def as_given(corners) -> torch.Tensor:
    """Polyboxes ``[N, 10]`` (float64) keeping the corners ``[N, 4, 2]`` in the given order."""
    c = torch.as_tensor(np.ascontiguousarray(corners, dtype=float)).reshape(-1, 4, 2)
    centre = c.mean(1)
    return torch.cat([centre, (c - centre[:, None]).flatten(1)], 1)


def winding_faces(ring: np.ndarray) -> tuple[list[tuple[shapely.Polygon, int]], float]:
    """The faces the ring's edges cut the plane into, each with the ring's winding number
    around it (the ring oriented to a signed area >= 0, as the kit does), and |signed area|."""
    ring = np.asarray(ring, dtype=float)
    nxt = np.roll(ring, -1, 0)
    signed = 0.5 * np.sum(ring[:, 0] * nxt[:, 1] - nxt[:, 0] * ring[:, 1])
    orient = -1 if signed < 0 else 1
    lines = shapely.node(shapely.linestrings(np.concatenate([ring, ring[:1]])))
    out = []
    for face in shapely.get_parts(shapely.polygonize([lines])):
        v = ring - np.array(face.representative_point().coords[0])
        w = np.roll(v, -1, 0)
        turn = np.arctan2(v[:, 0] * w[:, 1] - v[:, 1] * w[:, 0], (v * w).sum(1)).sum()
        out.append((face, orient * round(turn / (2 * math.pi))))
    return out, abs(signed)


def winding_iou(p, q) -> float:
    """Reference IoU of two rings of 4 corners (8 numbers or ``[4, 2]``): the integral of
    the product of their winding numbers over |signed area| + |signed area| - that; 0 where
    the union is 0 (the kit divides by it)."""
    fa, area_a = winding_faces(np.asarray(p, dtype=float).reshape(4, 2))
    fb, area_b = winding_faces(np.asarray(q, dtype=float).reshape(4, 2))
    inter = sum(wa * wb * shapely.intersection(x, y).area for x, wa in fa for y, wb in fb)
    union = area_a + area_b - inter
    return inter / union if union != 0 else 0.0


def dart_quads(rng: np.random.Generator, n: int, img: float = 100) -> np.ndarray:
    """``n`` simple non-convex quads ``[n, 4, 2]`` ("darts"): a triangle and a 4th corner
    inside it, listed as a simple ring from a random corner in a random direction."""
    tri = random_quads(rng, n, img=img, smin=4, smax=60)[:, :3]
    w = rng.dirichlet([1, 1, 1], n)
    inner = np.einsum("nk,nkd->nd", w, tri)
    ring = np.stack([tri[:, 0], tri[:, 1], inner, tri[:, 2]], 1)
    ring = np.stack([np.roll(r, k, 0) for r, k in zip(ring, rng.integers(0, 4, n))])
    flip = rng.random(n) < 0.5
    ring[flip] = ring[flip, ::-1]
    return ring


def bow_ties(rng: np.random.Generator, n: int, img: float = 100) -> np.ndarray:
    """``n`` self-intersecting quads: random convex quads with two adjacent corners swapped."""
    c = random_quads(rng, n, img=img, smin=4, smax=60)
    k = rng.integers(0, 4, n)
    out = c.copy()
    out[np.arange(n), k], out[np.arange(n), (k + 1) % 4] = (
        c[np.arange(n), (k + 1) % 4],
        c[np.arange(n), k],
    )
    return out


# --- simple polygons: shapely ---------------------------------------------------------------


def test_simple_non_convex_quads_match_shapely() -> None:
    rng = np.random.default_rng(0)
    a = np.concatenate([dart_quads(rng, 150, img=50), random_quads(rng, 50, img=50, smax=60)])
    b = np.concatenate([dart_quads(rng, 100, img=50), random_quads(rng, 100, img=50, smax=60)])
    pa, pb = shapely.polygons(a), shapely.polygons(b)
    assert shapely.is_valid(pa).all() and shapely.is_valid(pb).all()
    assert (shapely.area(shapely.convex_hull(pa)) > shapely.area(pa) + 1e-6).sum() > 100
    inter = shapely.area(shapely.intersection(pa[:, None], pb[None]))
    ref = inter / (shapely.area(pa)[:, None] + shapely.area(pb)[None] - inter)
    got = pairwise_iou(as_given(a), as_given(b), mode="polygon").numpy()
    assert (ref > 0.05).sum() > 500  # many overlapping pairs, darts among them
    assert np.abs(got - ref).max() < 1e-9
    # The hull is a different measure on these (the reason for the polygon mode).
    hull = pairwise_iou(as_given(a), as_given(b)).numpy()
    assert np.abs(hull - ref).max() > 0.1
    # Far from the origin (large images) in float32, as polyboxes are usually stored: the
    # corners those float32 numbers stand for, exactly.
    fa, fb = as_given(a + 5000).float(), as_given(b + 5000).float()
    ea, eb = (shapely.polygons(polybox.to_corners(p.double()).numpy()) for p in (fa, fb))
    inter = shapely.area(shapely.intersection(ea[:, None], eb[None]))
    ref = inter / (shapely.area(ea)[:, None] + shapely.area(eb)[None] - inter)
    far = pairwise_iou(fa, fb, mode="polygon")
    assert far.dtype == torch.float32
    assert np.abs(far.double().numpy() - ref).max() < 1e-6
    # The areas the union counts are the polygons' own.
    area, cover = iou_areas(as_given(a), mode="polygon")
    assert np.abs(area.numpy() - shapely.area(pa)).max() < 1e-9
    torch.testing.assert_close(cover, area, rtol=1e-12, atol=0)


def test_hand_computed_dart() -> None:
    # The dart (0,0), (10,0), (3,3), (0,10) (area 30) meets the square [2, 12]^2 in the
    # quad (2,2), (16/3,2), (3,3), (2,16/3): two triangles of base 10/3, height 1 -> 10/3.
    # Its hull, the triangle of area 50, meets the square in a right triangle of legs 6.
    dart = as_given([[0, 0], [10, 0], [3, 3], [0, 10]])
    square = as_given([[2, 2], [12, 2], [12, 12], [2, 12]])
    assert pairwise_iou(dart, square, mode="polygon").item() == pytest.approx(1 / 38, abs=1e-12)
    assert pairwise_iou(dart, square).item() == pytest.approx(18 / 132, abs=1e-12)
    assert iou_areas(dart, mode="polygon")[0].item() == pytest.approx(30.0, abs=1e-12)


def test_convex_quads_equal_hull_mode_in_either_orientation() -> None:
    rng = np.random.default_rng(1)
    a, b = random_quads(rng, 200, img=150), random_quads(rng, 200, img=150)
    ref = pairwise_iou(as_given(a), as_given(b))
    for ca in (a, a[:, ::-1]):  # clockwise and counter-clockwise rings
        got = pairwise_iou(as_given(ca), as_given(b[:, ::-1]), mode="polygon")
        assert (ref > 0).sum() > 300
        assert (got - ref).abs().max() < 1e-12


# --- self-intersecting quads: hand-computed, and the winding-number reference ---------------


def test_hand_made_bow_ties() -> None:
    # Edges (0,0)-(4,4) and (4,0)-(0,2) cross at (4/3, 4/3): lobes of 4/3 (left, traversed
    # with positive area) and 16/3 (right, negative). The ring's signed area is -4, so the
    # kit reverses it: the right lobe counts +1, the left -1, the area is 4.
    tie = np.array([[0, 0], [4, 4], [4, 0], [0, 2]], dtype=float)
    right = np.array([[2, 0], [4, 0], [4, 4], [2, 4]], dtype=float)  # x in [2, 4]
    square = np.array([[0, 0], [2, 0], [2, 2], [0, 2]], dtype=float)
    sym = np.array([[0, 0], [2, 2], [2, 0], [0, 2]], dtype=float)  # lobes of 1 and -1
    p = as_given(np.stack([tie, tie[::-1], right, square, sym]))
    iou = pairwise_iou(p, p, mode="polygon")
    area, cover = iou_areas(p, mode="polygon")
    assert area.tolist() == pytest.approx([4, 4, 8, 4, 0], abs=1e-12)
    torch.testing.assert_close(cover[2:4], area[2:4])  # simple: the area bounds any intersection
    assert (cover[[0, 1, 4]] >= torch.tensor([20 / 3, 20 / 3, 2], dtype=cover.dtype)).all()
    # With itself: inter = 16/3 + 4/3 (each lobe times its own sign), union 4 + 4 - 20/3.
    assert iou[0, 0].item() == pytest.approx(5.0, abs=1e-12)
    assert iou[0, 1].item() == pytest.approx(5.0, abs=1e-12)  # listing order reversed
    # The right lobe's part with x >= 2 is the integral of 1.5 x - 2 over [2, 4] = 5.
    assert iou[0, 2].item() == pytest.approx(5 / 7, abs=1e-12)
    # The left lobe (weight -1) lies inside the square [0, 2]^2 (-4/3); the right lobe's part
    # with x <= 2 is the integral of 1.5 x - 2 over [4/3, 2] = 1/3: inter -1, union 9.
    assert iou[0, 3].item() == pytest.approx(-1 / 9, abs=1e-12)
    # Symmetric bow tie: net area 0, its lobes cancel against the square; with itself
    # inter = 1 + 1, union = 0 + 0 - 2: IoU -1, as the kit computes.
    assert iou[4, 3].item() == pytest.approx(0.0, abs=1e-12)
    assert iou[4, 4].item() == pytest.approx(-1.0, abs=1e-12)
    # Hull mode measures the convex hull (0,0), (4,0), (4,4), (0,2): area 12.
    assert pairwise_iou(p[:1], p[:1]).item() == pytest.approx(1.0, abs=1e-12)
    assert iou_areas(p[:1])[0].item() == pytest.approx(12.0, abs=1e-12)


def test_any_quad_matches_the_winding_number_reference() -> None:
    rng = np.random.default_rng(2)
    kinds = [dart_quads(rng, 60, img=40), bow_ties(rng, 60, img=40)]
    kinds.append(rng.uniform(0, 40, (60, 4, 2)))  # anything: convex, darts, bow ties
    a = np.concatenate(kinds)
    b = np.concatenate([a[:120], a[rng.permutation(len(a))][120:]]) + rng.normal(0, 2, a.shape)
    valid = shapely.is_valid(shapely.polygons(a))
    assert (~valid).sum() > 60  # self-intersecting ones are really tested
    got = paired_iou(as_given(a), as_given(b), mode="polygon").numpy()
    ref = np.array([winding_iou(p, q) for p, q in zip(a, b)])
    assert (np.abs(ref) > 0.05).sum() > 60 and (ref < 0).sum() > 5
    assert np.abs(got - ref).max() < 1e-9
    dense = pairwise_iou(as_given(a), as_given(b), mode="polygon")
    assert (dense.diagonal().numpy() - got).max() == 0


def test_polygon_mode_edge_cases() -> None:
    sq = as_given([[0, 0], [2, 0], [2, 2], [0, 2]])
    line = as_given([[0, 0], [1, 0], [2, 0], [3, 0]])
    repeated = as_given([[0, 0], [2, 0], [2, 0], [0, 2]])  # a triangle with a repeated corner
    nan = sq.clone()
    nan[0, 3] = float("nan")
    p = torch.cat([sq, line, repeated, nan])
    iou = pairwise_iou(p, p, mode="polygon")
    assert torch.isfinite(iou).all()
    assert iou[0, 0].item() == pytest.approx(1.0) and iou[2, 2].item() == pytest.approx(1.0)
    assert iou[0, 2].item() == pytest.approx(0.5)  # the triangle is half the square
    assert iou[1].abs().max() == 0 and iou[3].abs().max() == 0 and iou[:, 3].abs().max() == 0
    torch.testing.assert_close(paired_iou(p, p, mode="polygon"), iou.diagonal())
    with pytest.raises(ValueError, match="mode"):
        pairwise_iou(sq, sq, mode="convex")


def test_chunking_gives_identical_results_in_polygon_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ops, "COMPILED", False)  # chunks exist only in the tensor kernel
    rng = np.random.default_rng(3)
    a = as_given(np.concatenate([dart_quads(rng, 50), bow_ties(rng, 50)]))
    b = as_given(np.concatenate([random_quads(rng, 50, img=100, smax=60), dart_quads(rng, 40)]))
    ref = pairwise_iou(a, b, mode="polygon")
    assert (ref != 0).sum() > 100
    assert torch.equal(pairwise_iou(a, b, mode="polygon", chunk_size=7), ref)


# --- evaluation: the kit's number on any quad --------------------------------------------


def test_evaluation_pairs_are_polygon_iou_with_bow_ties() -> None:
    rng = np.random.default_rng(4)
    g = np.concatenate([random_quads(rng, 20, img=80, smax=40), bow_ties(rng, 10, img=80)])
    d = np.concatenate([g + rng.normal(0, 1.5, g.shape), dart_quads(rng, 20, img=80)])
    d[:5] = g[:5, [0, 2, 1, 3]]  # bow-tie detections of convex ground truths
    img_g, img_d = np.arange(len(g)) % 2, np.arange(len(d)) % 2
    gt = metrics.GroundTruth(
        image=img_g, label=np.zeros(len(g), np.int64), difficult=np.zeros(len(g), bool),
        polyboxes=as_given(g).numpy(),
    )  # fmt: skip
    dt = metrics.Detections(
        image=img_d, label=np.zeros(len(d), np.int64), score=np.ones(len(d)),
        polyboxes=as_given(d).numpy(),
    )  # fmt: skip
    dense = pairwise_iou(as_given(d), as_given(g), mode="polygon").numpy()
    dense[img_d[:, None] != img_g[None, :]] = 0
    assert (dense > 1).any() or (dense < 0).any()  # bow-tie pairs beyond [0, 1] exist
    for min_iou in (1e-6, 0.3):
        pd, pg, piou = metrics.overlapping_pairs(gt, dt, 2, min_iou)
        rr, cc = np.nonzero(dense >= min_iou)
        assert list(zip(pd, pg)) == list(zip(rr, cc))
        assert np.abs(piou - dense[rr, cc]).max() < 1e-12


def write_jittered_dota(tmp: Path, rng: np.random.Generator, classes: list[str]) -> None:
    """DOTA-like ground truths (convex, listed from any corner in either direction) and
    detections whose corners are jittered by 1-8% of the object's length (thin ones become
    non-convex or self-intersect), plus swapped-corner bow ties, pushed-in corners (darts), duplicates and clutter."""
    (tmp / "ann").mkdir()
    (tmp / "det").mkdir()
    dets: list[tuple[int, int, np.ndarray]] = []
    for img in range(12):
        n = int(rng.integers(3, 12))
        quads = test_evaluate.random_quads(rng, n, 200).reshape(n, 4, 2)
        labels = rng.integers(0, len(classes), n)
        lines = ["imagesource:test", "gsd:null"]
        for q, lab in zip(quads, labels):
            hard = int(rng.random() < 0.1)
            lines.append(" ".join(f"{v:.1f}" for v in q.ravel()) + f" {classes[lab]} {hard}")
            size = np.ptp(q, axis=0).max()
            for _ in range(int(rng.integers(1, 4))):
                c = q + rng.normal(0, rng.uniform(0.01, 0.08) * size, q.shape)
                u = rng.random()
                if u < 0.1:  # corners emitted in the wrong order: a bow tie
                    c = c[[0, 2, 1, 3]]
                elif u < 0.2:  # a corner pushed past the diagonal: a dart
                    c[0] = c.mean(0) - 0.3 * (c[0] - c.mean(0))
                dets.append((img, int(lab), c))
        for q in test_evaluate.random_quads(rng, 2, 200).reshape(2, 4, 2):
            dets.append((img, int(rng.integers(len(classes))), q))
        (tmp / "ann" / f"img{img:03d}.txt").write_text("\n".join(lines) + "\n")
    order = rng.permutation(len(dets))
    scores = np.round(rng.random(len(dets)), 2)  # ties on purpose
    for c, name in enumerate(classes):
        rows = [
            f"img{dets[k][0]:03d} {scores[k]:.2f} "
            + " ".join(f"{v:.1f}" for v in dets[k][2].ravel())
            for k in order
            if dets[k][1] == c
        ]
        (tmp / "det" / f"Task1_{name}.txt").write_text("".join(f"{r}\n" for r in rows))


@pytest.mark.parametrize("seed", range(3))
def test_dota_map_equals_the_kit_with_polygon_iou(
    tmp_path: Path, seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(seed)
    classes = ["plane", "ship", "harbor"]
    write_jittered_dota(tmp_path, rng, classes)
    names = [f"img{i:03d}" for i in range(12)]
    det_fmt, ann_fmt = str(tmp_path / "det" / "Task1_{:s}.txt"), str(tmp_path / "ann" / "{:s}.txt")
    _, _, _, dt = ev.load_dota_dirs(tmp_path / "det", tmp_path / "ann", classes)
    corners = dt.polyboxes[:, :2][:, None] + dt.polyboxes[:, 2:].reshape(-1, 4, 2)
    valid = shapely.is_valid(shapely.polygons(corners))
    hull_gap = shapely.area(shapely.convex_hull(shapely.multipoints(corners)))
    assert (~valid).sum() >= 5  # self-intersecting detections
    assert (valid & (hull_gap > shapely.area(shapely.polygons(corners)) + 1e-6)).sum() >= 5
    result = ev.evaluate_dota_dirs(tmp_path / "det", tmp_path / "ann", classes, 0.5)
    monkeypatch.setattr(test_evaluate, "shapely_iou", winding_iou)  # the kit's polyiou
    ref = [kit_voc_eval(det_fmt, ann_fmt, names, name, 0.5) for name in classes]
    for name, ap in zip(classes, ref):
        assert abs(result[f"ap50/{name}"] - ap) < 1e-9, name
    assert abs(result["map50"] - np.mean(ref)) < 1e-6

    # The hull measure (the old evaluation) gives another number on these files.
    def hull_iou(p, q) -> float:
        a = shapely.convex_hull(shapely.multipoints(np.reshape(p, (4, 2))))
        b = shapely.convex_hull(shapely.multipoints(np.reshape(q, (4, 2))))
        inter = shapely.area(shapely.intersection(a, b))
        return float(inter / (a.area + b.area - inter))

    monkeypatch.setattr(test_evaluate, "shapely_iou", hull_iou)
    hull = [kit_voc_eval(det_fmt, ann_fmt, names, name, 0.5) for name in classes]
    assert abs(np.mean(hull) - np.mean(ref)) > 1e-4
