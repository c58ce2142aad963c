"""polydet.ops: polygon IoU against shapely / torchvision / hand-computed values; NMS against
a shapely greedy reference and torchvision."""

from __future__ import annotations

import math

import numpy as np
import pytest
import shapely
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st

from polydet.geometry import ops, polybox
from polydet.geometry.ops import batched_nms, hull_rings, nms, paired_iou, pairwise_iou


def random_quads(
    rng: np.random.Generator,
    n: int,
    img: float = 512,
    smin: float = 4,
    smax: float = 200,
    max_aspect: float = 4,
) -> np.ndarray:
    """``n`` random convex quads ``[n, 4, 2]``: 4 points at sorted random angles on an
    ellipse (always convex), random size, aspect, rotation and position."""
    ang = np.sort(rng.uniform(0, 2 * np.pi, (n, 4)), axis=1)
    pts = np.stack([np.cos(ang), np.sin(ang)], -1)
    size = np.exp(rng.uniform(np.log(smin), np.log(smax), (n, 1, 1)))
    asp = np.exp(rng.uniform(-np.log(max_aspect), np.log(max_aspect), (n, 1)))
    pts = pts * np.stack([asp, 1 / asp], -1) * size / 2
    th = rng.uniform(0, np.pi, n)
    rot = np.stack(
        [np.stack([np.cos(th), -np.sin(th)], -1), np.stack([np.sin(th), np.cos(th)], -1)], -2
    )
    return np.einsum("nij,nkj->nki", rot, pts) + rng.uniform(0, img, (n, 1, 2))


def shapely_iou(ca: np.ndarray, cb: np.ndarray) -> np.ndarray:
    """Reference IoU ``[N, M]`` of the convex hulls of corner sets ``[N, 4, 2]``, ``[M, 4, 2]``
    (shapely intersects only the pairs whose shapely bounds overlap, for speed)."""
    pa = shapely.convex_hull(shapely.multipoints(ca))
    pb = shapely.convex_hull(shapely.multipoints(cb))
    ba, bb = shapely.bounds(pa), shapely.bounds(pb)
    i, j = np.nonzero(
        (np.minimum(ba[:, None, 2], bb[None, :, 2]) >= np.maximum(ba[:, None, 0], bb[None, :, 0]))
        & (np.minimum(ba[:, None, 3], bb[None, :, 3]) >= np.maximum(ba[:, None, 1], bb[None, :, 1]))
    )
    inter = np.zeros((len(ca), len(cb)))
    inter[i, j] = shapely.area(shapely.intersection(pa[i], pb[j]))
    union = shapely.area(pa)[:, None] + shapely.area(pb)[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def exact_corners(p: torch.Tensor) -> np.ndarray:
    """The corners polyboxes stand for (xc + dx in float64, as pairwise_iou reads them)."""
    return polybox.to_corners(p.double()).numpy()


def poly(corners) -> torch.Tensor:
    """Canonical polyboxes ``[N, 10]`` (float32) from corners ``[N, 4, 2]`` or ``[4, 2]``."""
    c = torch.as_tensor(np.asarray(corners, dtype=float), dtype=torch.float32)
    return polybox.from_corners(c.reshape(-1, 4, 2))


def rotate(c: np.ndarray, angle: float, about=(0.0, 0.0)) -> np.ndarray:
    about = np.asarray(about, dtype=float)
    r = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    return (np.asarray(c, dtype=float) - about) @ r.T + about


SQUARE = np.array([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])


# --- agreement with independent references ------------------------------------------------


def test_random_quads_match_shapely() -> None:
    rng = np.random.default_rng(0)
    a = poly(random_quads(rng, 300))
    b = poly(random_quads(rng, 300))
    got = pairwise_iou(a, b).double().numpy()
    ref = shapely_iou(exact_corners(a), exact_corners(b))
    assert (ref > 0).sum() > 1500  # the test exercises many overlapping pairs
    assert np.abs(got - ref).max() < 1e-5


@pytest.mark.parametrize(
    "family",
    ["noise", "tiny_rotation", "slide_along_edge", "far_from_origin", "thin_1_to_50"],
)
def test_near_duplicates_match_shapely(family: str) -> None:
    """Near-collinear edges (where float crossings are ill-conditioned) stay within 1e-4."""
    rng = np.random.default_rng(1)
    base = random_quads(rng, 200, smin=8)
    if family == "noise":
        other = base + rng.normal(0, 1e-3, base.shape)
    elif family == "tiny_rotation":
        other = np.stack([rotate(q, 1e-5, q.mean(0)) for q in base])
    elif family == "slide_along_edge":
        other = base + 0.3 * (base[:, 1] - base[:, 0])[:, None]
    elif family == "far_from_origin":
        base = base + 20000.0
        other = base + rng.normal(0, 1e-2, base.shape)
    else:
        length = rng.uniform(20, 300, 200)
        c = rng.uniform(0, 512, (200, 2))
        rect = np.array([[-0.5, -0.01], [0.5, -0.01], [0.5, 0.01], [-0.5, 0.01]])
        base = np.stack(
            [rotate(rect * ln, th) + cc for ln, th, cc in zip(length, rng.uniform(0, 3, 200), c)]
        )
        other = base + rng.normal(0, 1e-3, base.shape)
    a, b = poly(base), poly(other)
    got = pairwise_iou(a, b).double().numpy()
    ref = shapely_iou(exact_corners(a), exact_corners(b))
    assert np.diag(ref).min() > 0.1  # the pairs really overlap
    assert np.abs(got - ref).max() < 1e-4


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.floats(0, 100),
            st.floats(0, 100),  # centre
            st.floats(1, 60),
            st.floats(1, 60),  # width, height
            st.floats(-3.2, 3.2),  # angle
            st.floats(-0.4, 0.4),  # shear (parallelograms)
        ),
        min_size=2,
        max_size=6,
    )
)
def test_rotated_parallelograms_match_shapely(params: list[tuple[float, ...]]) -> None:
    quads = []
    for cx, cy, w, h, ang, shear in params:
        base = np.array([[-w / 2, -h / 2], [w / 2, -h / 2], [w / 2, h / 2], [-w / 2, h / 2]])
        base[:, 0] += shear * base[:, 1]
        quads.append(rotate(base, ang) + [cx, cy])
    p = poly(np.stack(quads))
    got = pairwise_iou(p, p).double().numpy()
    ref = shapely_iou(exact_corners(p), exact_corners(p))
    assert np.abs(got - ref).max() < 1e-5


@pytest.mark.parametrize("integer", [True, False])
def test_axis_aligned_equals_torchvision_box_iou(integer: bool) -> None:
    g = torch.Generator().manual_seed(2)
    if integer:  # shared coordinates: touching, nested and edge-sharing boxes galore
        xy = torch.randint(0, 40, (400, 2), generator=g).float()
        wh = torch.randint(1, 15, (400, 2), generator=g).float()
    else:
        xy = torch.rand(400, 2, generator=g) * 300
        wh = torch.rand(400, 2, generator=g) * 60 + 0.5
    boxes = torch.cat([xy, xy + wh], 1)
    p = polybox.from_xyxy(boxes)
    ref = torchvision.ops.box_iou(boxes.double(), boxes.double())
    assert (pairwise_iou(p, p).double() - ref).abs().max() < 1e-6


# --- hand-computed geometry ---------------------------------------------------------------


def test_square_vs_itself_rotated_45_degrees() -> None:
    # Side 2: the intersection is the square minus 4 corner triangles with legs 2 - sqrt(2),
    # i.e. 8 sqrt(2) - 8; union 16 - 8 sqrt(2); IoU = 1 / sqrt(2).
    for centre in ([0.0, 0.0], [1000.5, 730.25]):
        a = poly(SQUARE + centre)
        b = poly(rotate(SQUARE, math.pi / 4) + centre)
        assert pairwise_iou(a, b).item() == pytest.approx(1 / math.sqrt(2), abs=1e-6)
        inter = 8 * math.sqrt(2) - 8
        assert hull_rings(a)[2].item() == pytest.approx(4.0, abs=1e-9)
        assert inter / (8 - inter) == pytest.approx(1 / math.sqrt(2))


@pytest.mark.parametrize("angle", [0.0, 0.3, math.pi / 4, 1.2])
def test_nested_touching_disjoint(angle: float) -> None:
    def q(c):  # rotate the whole scene about a point: IoUs cannot change
        return poly(rotate(c, angle, (3.0, 1.0)))

    big = np.array([[0, 0], [4, 0], [4, 4], [0, 4]], dtype=float)
    inner = np.array([[1, 1], [2, 1], [2, 2], [1, 2]], dtype=float)
    half = np.array([[0, 0], [2, 0], [2, 4], [0, 4]], dtype=float)  # shares 3 edges with big
    right = big + [4, 0]  # touches big along x = 4
    corner = big + [4, 4]  # touches big at one point
    far = big + [10, 0]
    p = torch.cat([q(big), q(inner), q(half), q(right), q(corner), q(far)])
    iou = pairwise_iou(p, p)
    assert iou[0, 1].item() == pytest.approx(1 / 16, abs=1e-6)
    assert iou[0, 2].item() == pytest.approx(0.5, abs=1e-6)
    assert iou[1, 2].item() == pytest.approx(1 / 8, abs=1e-6)
    assert abs(iou[0, 3].item()) < 1e-6
    assert abs(iou[0, 4].item()) < 1e-6
    assert iou[0, 5].item() == 0.0
    assert iou[2, 3].item() == 0.0  # the enclosing boxes do not even touch
    assert torch.diagonal(iou).sub(1).abs().max() < 1e-6


def test_identity_and_symmetry() -> None:
    rng = np.random.default_rng(3)
    p = poly(random_quads(rng, 150, img=200))
    iou = pairwise_iou(p, p)
    assert torch.diagonal(iou).sub(1).abs().max() < 1e-6
    assert (iou - iou.T).abs().max() < 1e-6
    assert iou.min() >= 0 and iou.max() <= 1


def test_corner_order_does_not_matter() -> None:
    """Stored corners in any order (even a bow tie) measure the canonical ring."""
    rng = np.random.default_rng(4)
    c = random_quads(rng, 100, img=150)
    p = poly(c)
    raw = []
    for perm in ([1, 2, 3, 0], [3, 2, 1, 0], [0, 2, 1, 3], [2, 0, 3, 1]):
        corners = polybox.to_corners(p)[:, perm]
        centre = corners.mean(1)
        raw.append(torch.cat([centre, (corners - centre[:, None]).flatten(1)], 1))
    ref = pairwise_iou(p, p)
    for q in raw:  # 1e-5: the re-stored float32 corners round differently
        assert (pairwise_iou(q, p) - ref).abs().max() < 1e-5
        assert (pairwise_iou(p, q) - ref).abs().max() < 1e-5


def test_stale_centre_is_rederived() -> None:
    """Decoded boxes may carry an (xc, yc) that is not the corner mean: corners count."""
    p = poly(SQUARE * 10 + 50)
    stale = p.clone()
    stale[:, 0:2] += 3.0
    stale[:, 2:] -= torch.tensor([3.0, 3.0] * 4)  # same corners, shifted stored centre
    assert pairwise_iou(stale, p).item() == pytest.approx(1.0, abs=1e-6)


def test_non_convex_is_measured_on_its_hull() -> None:
    dart = np.array([[[0, 0], [10, 0], [3, 3], [0, 10]]], dtype=float)  # (3, 3) is inside
    other = np.array([[[2, 2], [12, 2], [12, 12], [2, 12]]], dtype=float)
    a, b = poly(dart), poly(other)
    ref = shapely_iou(dart, other)
    assert pairwise_iou(a, b).item() == pytest.approx(ref.item(), abs=1e-6)
    assert hull_rings(a)[2].item() == pytest.approx(50.0)  # the triangle's area


def test_degenerate_and_non_finite_boxes_have_zero_iou() -> None:
    sq = poly(SQUARE)
    line = poly([[[0, 0], [1, 0], [2, 0], [3, 0]]])
    point = torch.zeros(1, 10)
    nan = sq.clone()
    nan[0, 3] = float("nan")
    inf = sq.clone()
    inf[0, 0] = float("inf")
    p = torch.cat([sq, line, point, nan, inf])
    iou = pairwise_iou(p, p)
    assert iou[0, 0].item() == pytest.approx(1.0)
    assert torch.isfinite(iou).all()
    assert iou[1:].abs().max() == 0 and iou[:, 1:].abs().max() == 0


def test_paired_iou_is_the_diagonal_of_pairwise_iou_and_matches_shapely() -> None:
    rng = np.random.default_rng(7)
    a = random_quads(rng, 400)
    # Jittered copies (mostly IoU > 0.3), unrelated quads (mostly disjoint) and degenerate rows.
    b = np.concatenate([a[:300] + rng.normal(0, 3, (300, 4, 2)), random_quads(rng, 100)])
    pa, pb = poly(a), poly(b)
    pb[-3] = poly(a[-3])[0]  # identical
    pb[-2] = 0.0  # a point
    pb[-1, 2] = float("nan")
    got = paired_iou(pa, pb)
    assert got.shape == (400,) and got.dtype == torch.float32
    torch.testing.assert_close(got, pairwise_iou(pa, pb).diagonal(), rtol=0, atol=1e-12)
    ref = shapely_iou(exact_corners(pa[:-1]), exact_corners(pb[:-1])).diagonal()  # no NaN
    assert (ref > 0.3).sum() > 150 and (ref == 0).sum() > 50
    assert np.abs(got[:-1].double().numpy() - ref).max() < 1e-5
    assert got[-3].item() == pytest.approx(1.0) and got[-2:].tolist() == [0.0, 0.0]
    assert paired_iou(pa.double(), pb).dtype == torch.float64
    # Indexed pairs: any rows of a against any rows of b, as pairwise_iou has them.
    i, j = torch.from_numpy(rng.integers(0, 400, 500)), torch.from_numpy(rng.integers(0, 400, 500))
    i[:300] = j[:300] = torch.arange(300)  # overlapping pairs, not only disjoint ones
    torch.testing.assert_close(
        paired_iou(pa, pb[:350], (i, j % 350)), pairwise_iou(pa, pb[:350])[i, j % 350],
        rtol=0, atol=1e-12,
    )  # fmt: skip
    assert paired_iou(torch.zeros(0, 10), torch.zeros(0, 10)).shape == (0,)
    with pytest.raises(ValueError, match="rows"):
        paired_iou(pa, pb[:5])


# --- shapes, dtypes, chunking, devices ------------------------------------------------------


def test_empty_inputs() -> None:
    p = poly(SQUARE[None])
    assert pairwise_iou(torch.zeros(0, 10), p).shape == (0, 1)
    assert pairwise_iou(p, torch.zeros(0, 10)).shape == (1, 0)
    assert pairwise_iou(torch.zeros(0, 10), torch.zeros(0, 10)).shape == (0, 0)


def test_bad_shape_raises() -> None:
    with pytest.raises(ValueError, match=r"\[N, 10\]"):
        pairwise_iou(torch.zeros(3, 8), torch.zeros(2, 10))


def test_dtypes() -> None:
    p = poly(SQUARE[None])
    assert pairwise_iou(p, p).dtype == torch.float32
    assert pairwise_iou(p.double(), p).dtype == torch.float64
    assert pairwise_iou(p.half(), p.half()).dtype == torch.float32


def test_chunking_gives_identical_results(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ops, "COMPILED", False)  # chunks exist only in the tensor kernel
    rng = np.random.default_rng(5)
    a, b = poly(random_quads(rng, 120, img=150)), poly(random_quads(rng, 90, img=150))
    assert torch.equal(pairwise_iou(a, b, chunk_size=7), pairwise_iou(a, b))


def hard_pairs(rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs where the kernels' decisions are delicate: identical, near-duplicate (noise, tiny
    rotation, slid along an edge), edge-sharing, touching, nested, far from the origin,
    1:50 slivers, zero-area and non-finite boxes, plus random crowded quads."""
    base = random_quads(rng, 60, img=120, smin=8, smax=60)
    sq = SQUARE * 10 + 50
    other = [
        base,
        base + rng.normal(0, 1e-3, base.shape),
        np.stack([rotate(q, 1e-6, q.mean(0)) for q in base]),
        base + 0.3 * (base[:, 1] - base[:, 0])[:, None],
        base + (base[:, 1] - base[:, 0])[:, None],  # slid by a whole edge: often touching
    ]
    first = [base] * len(other)
    first += [np.stack([sq, sq, sq, SQUARE * 0, sq, sq + 20000.0])]
    other += [np.stack([sq + [20, 0], sq * 0.5 + 25, sq + [5, 5], sq, [[0, 0]] * 4, sq + 20000.0])]
    rect = np.array([[-25.0, -0.5], [25.0, -0.5], [25.0, 0.5], [-25.0, 0.5]])
    thin = np.stack(
        [rotate(rect, th) + c for th, c in zip(rng.uniform(0, 3, 40), rng.uniform(0, 60, (40, 2)))]
    )
    first.append(thin)
    other.append(thin + rng.normal(0, 1e-3, thin.shape))
    a, b = poly(np.concatenate(first)), poly(np.concatenate(other))
    a[5, 0] = torch.nan
    return a, b


def test_compiled_cpu_kernel_equals_the_tensor_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CPU pairwise_iou / paired_iou / nms run a compiled loop; it takes the tensor
    kernel's decisions (the tensor kernel runs on CUDA and in the exported models)."""
    assert ops.COMPILED  # numba is a dependency: CPU uses the compiled loop
    rng = np.random.default_rng(11)
    a, b = hard_pairs(rng)
    bow = a[:, [0, 1, 2, 3, 6, 7, 4, 5, 8, 9]]  # corners 2 and 3 swapped: bow ties, darts
    results = {}
    for compiled in (True, False):
        monkeypatch.setattr(ops, "COMPILED", compiled)
        results[compiled] = [
            pairwise_iou(a, b, mode="hull").double(),
            pairwise_iou(a, b, mode="polygon").double(),
            pairwise_iou(bow, b, mode="polygon").double(),
            paired_iou(a, b).double(),
            paired_iou(bow, b, mode="polygon").double(),
            nms(torch.cat([a, b]), torch.arange(2 * len(a)).float(), 0.3),
        ]
    compiled, tensor = results[True], results[False]
    assert (tensor[3] > 0.999).sum() >= 60 and (tensor[3] == 0).sum() >= 20  # both kinds
    for got, ref in zip(compiled[:5], tensor[:5]):
        assert ((got != 0) == (ref != 0)).all()
        assert (got - ref).abs().max() < 1e-12
    assert torch.equal(compiled[5], tensor[5])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu() -> None:
    rng = np.random.default_rng(6)
    a, b = poly(random_quads(rng, 200)), poly(random_quads(rng, 200))
    for mode in ("hull", "polygon"):
        got = pairwise_iou(a.cuda(), b.cuda(), mode=mode).cpu()
        assert (got - pairwise_iou(a, b, mode=mode)).abs().max() < 1e-6
    bow = a[:, [0, 1, 2, 3, 6, 7, 4, 5, 8, 9]]  # corners 2 and 3 swapped: bow ties
    got = paired_iou(bow.cuda(), b.cuda(), mode="polygon").cpu()
    assert (got - paired_iou(bow, b, mode="polygon")).abs().max() < 1e-6
    s = torch.rand(200)
    assert torch.equal(nms(a.cuda(), s.cuda(), 0.3).cpu(), nms(a, s, 0.3))


# --- NMS --------------------------------------------------------------------------------------


def reference_nms(iou: np.ndarray, scores: np.ndarray, thr: float) -> np.ndarray:
    """Greedy NMS on a reference IoU matrix: highest score first (ties: lower index), drop
    IoU > thr."""
    removed = np.zeros(len(iou), dtype=bool)
    keep = []
    for i in np.argsort(-scores, kind="stable"):
        if not removed[i]:
            keep.append(i)
            removed |= iou[i] > thr
    return np.array(keep, dtype=np.int64)


def clustered_quads(rng: np.random.Generator, objects: int, per_object: int) -> np.ndarray:
    """Detector-like output: jittered copies around each object."""
    base = random_quads(rng, objects, img=600, smin=16, smax=150)
    scale = np.linalg.norm(base[:, 0] - base[:, 2], axis=-1)[:, None, None, None]
    jitter = rng.normal(0, 0.06, (objects, per_object, 4, 2)) * scale
    return (base[:, None] + jitter).reshape(-1, 4, 2)


def test_nms_equals_shapely_greedy() -> None:
    rng = np.random.default_rng(7)
    c = np.concatenate([clustered_quads(rng, 40, 12), random_quads(rng, 300, img=600)])
    p = poly(c)
    scores = torch.from_numpy(rng.permutation(len(c)).astype(np.float32))
    scores[:50] = 7.0  # ties: lower index first
    ref_iou = shapely_iou(exact_corners(p), exact_corners(p))
    for thr in (0.0, 0.3, 0.5, 0.7):
        keep = nms(p, scores, thr)
        assert keep.dtype == torch.int64
        assert keep.tolist() == reference_nms(ref_iou, scores.numpy(), thr).tolist()
        assert (scores[keep][1:] <= scores[keep][:-1]).all()


def test_nms_axis_aligned_equals_torchvision() -> None:
    g = torch.Generator().manual_seed(8)
    xy = torch.rand(500, 2, generator=g) * 200
    boxes = torch.cat([xy, xy + torch.rand(500, 2, generator=g) * 50 + 1], 1)
    scores = torch.rand(500, generator=g)
    for thr in (0.2, 0.5):
        assert nms(polybox.from_xyxy(boxes), scores, thr).tolist() == (
            torchvision.ops.nms(boxes, scores, thr).tolist()
        )


def test_batched_nms_is_per_class() -> None:
    rng = np.random.default_rng(9)
    c = clustered_quads(rng, 30, 10)
    p = poly(c)
    scores = torch.rand(len(c), generator=torch.Generator().manual_seed(9))
    idxs = torch.from_numpy(rng.integers(0, 3, len(c)))
    keep = batched_nms(p, scores, idxs, 0.5)
    expected = []
    for k in range(3):
        members = torch.nonzero(idxs == k).flatten()
        expected += members[nms(p[members], scores[members], 0.5)].tolist()
    expected.sort(key=lambda i: (-scores[i].item(), i))
    assert keep.tolist() == expected
    # Axis-aligned boxes: the same as torchvision's batched_nms.
    boxes = polybox.hull_xyxy(p)
    keep_tv = torchvision.ops.batched_nms(boxes, scores, idxs, 0.5)
    assert batched_nms(polybox.from_xyxy(boxes), scores, idxs, 0.5).tolist() == keep_tv.tolist()


def test_nms_edge_cases() -> None:
    assert nms(torch.zeros(0, 10), torch.zeros(0), 0.5).shape == (0,)
    p = poly(np.stack([SQUARE, SQUARE, SQUARE + 5]))
    assert nms(p, torch.tensor([0.5, 0.9, 0.1]), 0.5).tolist() == [1, 2]
    with pytest.raises(ValueError, match="iou_threshold"):
        nms(p, torch.ones(3), 1.5)
    with pytest.raises(ValueError, match="scores"):
        nms(p, torch.ones(2), 0.5)
