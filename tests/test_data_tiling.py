"""Tiling large images and merging tile detections back: every object comes back once."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from polydet.core.config import load_config
from polydet.data import tiling
from polydet.data.formats import Annotation, write_dota
from polydet.data.prepare import prepare
from polydet.geometry import polybox

PARAMS = Path(__file__).parents[1] / "params.yaml"


@pytest.mark.parametrize(
    ("w", "h", "size", "overlap"),
    [(1000, 700, 256, 64), (256, 100, 256, 64), (513, 1025, 512, 200)],
)
def test_grid_covers_every_pixel_with_the_overlap(w: int, h: int, size: int, overlap: int) -> None:
    tiles = tiling.tile_grid(w, h, size, overlap)
    cover = np.zeros((h, w), int)
    for x0, y0, x1, y1 in tiles:
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        assert x1 - x0 == min(size, w) and y1 - y0 == min(size, h)  # never padded
        cover[y0:y1, x0:x1] += 1
    assert cover.min() >= 1
    xs = sorted({t[0] for t in tiles})
    assert all(b - a <= size - overlap for a, b in zip(xs, xs[1:]))  # neighbours share >= overlap


def _square(x: float, y: float, s: float) -> np.ndarray:
    c = torch.tensor([[x, y], [x + s, y], [x + s, y + s], [x, y + s]], dtype=torch.float64)
    return polybox.from_corners(c).numpy()


def test_objects_cut_by_a_tile_edge_are_clipped_and_marked() -> None:
    boxes = np.stack([_square(10, 10, 20), _square(90, 10, 20), _square(95, 50, 40)])
    got, idx, clipped = tiling.tile_objects(boxes, (0, 0, 100, 100), min_visible=0.7)
    # Object 0 is inside; object 1 is 50% inside (left to other tiles); object 2 is 12.5% inside.
    assert idx.tolist() == [0] and clipped.tolist() == [False]
    got, idx, clipped = tiling.tile_objects(boxes, (0, 0, 104, 100), min_visible=0.7)
    assert idx.tolist() == [0, 1] and clipped.tolist() == [False, True]
    np.testing.assert_allclose(
        polybox.to_corners(torch.from_numpy(got[1])).numpy(),
        [[90, 10], [104, 10], [104, 30], [90, 30]],
    )
    # Coordinates are tile pixels.
    got, idx, _ = tiling.tile_objects(boxes, (80, 0, 180, 100), min_visible=0.7)
    assert idx.tolist() == [1, 2]
    np.testing.assert_allclose(got[0], _square(10, 10, 20))


def test_an_object_split_over_tiles_comes_back_once() -> None:
    from polydet.geometry.ops import pairwise_iou

    rng = np.random.default_rng(0)
    w, h = 700, 500
    boxes = np.stack(
        [_square(230, 230, 50), _square(100, 40, 30), _square(480, 300, 60), _square(600, 20, 45)]
    )
    labels = np.array([1, 2, 1, 3])
    per_tile = []
    for t in tiling.tile_grid(w, h, 256, 96):
        got, idx, _ = tiling.tile_objects(boxes, t, min_visible=0.6)
        share = (
            polybox.area(torch.from_numpy(got)).numpy()
            / polybox.area(torch.from_numpy(boxes[idx])).numpy()
        )
        scores = share * rng.uniform(0.8, 0.99, len(idx))  # a whole view scores higher than a part
        per_tile.append(
            (
                (t[0], t[1]),
                {
                    "polyboxes": torch.from_numpy(got).float(),
                    "scores": torch.from_numpy(scores).float(),
                    "labels": torch.from_numpy(labels[idx]),
                },
            )
        )
    seen = sum(len(d["labels"]) for _, d in per_tile)
    assert seen > len(boxes)  # objects in the overlaps were detected several times
    merged = tiling.merge_detections(per_tile, iou_threshold=0.5)
    assert len(merged["labels"]) == len(boxes)
    iou = pairwise_iou(merged["polyboxes"], torch.from_numpy(boxes).float())
    best = iou.max(1)
    assert (best.values > 0.999).all()
    assert sorted(best.indices.tolist()) == [0, 1, 2, 3]
    assert (merged["labels"] == torch.from_numpy(labels)[best.indices]).all()
    assert (merged["scores"][:-1] >= merged["scores"][1:]).all()


def test_prepare_tiles_large_images_once_and_reuses_them(tmp_path: Path) -> None:
    root = tmp_path / "raw"
    (root / "images").mkdir(parents=True)
    (root / "labelTxt").mkdir()
    rng = np.random.default_rng(1)
    Image.fromarray((rng.random((500, 700, 3)) * 255).astype(np.uint8)).save(
        root / "images" / "big.png"
    )
    Image.fromarray(np.zeros((200, 200, 3), np.uint8)).save(root / "images" / "small.png")
    write_dota(
        root / "labelTxt" / "big.txt",
        [Annotation((230, 230, 280, 230, 280, 280, 230, 280), "card")],
    )
    write_dota(
        root / "labelTxt" / "small.txt", [Annotation((10, 10, 50, 10, 50, 40, 10, 40), "kite")]
    )
    out = tmp_path / "prepared"
    cfg = load_config(
        PARAMS,
        [
            f"data.root={root}",
            f"data.out={out}",
            "data.tile={enabled: true, size: 256, overlap: 96, min_visible: 0.6, scales: [1.0]}",
        ],
    )
    first = prepare(cfg)
    n_tiles = len(tiling.tile_grid(700, 500, 256, 96))
    assert first["tiles"] == {"source_images_tiled": 1, "tiles": n_tiles, "tiles_written": n_tiles}
    images = pd.read_csv(out / "images.csv")
    big = images[images["image_id"].str.startswith("big__")]
    assert len(big) == n_tiles and len(images) == n_tiles + 1
    assert big["split"].nunique() == 1  # tiles of one image share its split
    assert all(Path(p).parent == out / "tiles" for p in big["path"])
    row = big[big["image_id"] == "big__160_160"].iloc[0]
    assert row["num_objects"] == 1
    src = np.asarray(Image.open(root / "images" / "big.png"))
    assert (np.asarray(Image.open(row["path"])) == src[160:416, 160:416]).all()
    objects = pd.read_csv(out / "objects.csv")
    assert objects.loc[objects["image_id"] == "big__160_160", ["xc", "yc"]].values.tolist() == [
        [95.0, 95.0]
    ]
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "tiles").glob("*.png")}
    second = prepare(cfg)
    assert second["tiles"]["tiles_written"] == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "tiles").glob("*.png")} == mtimes


def test_class_agnostic_merge_keeps_an_object_labelled_twice_once() -> None:
    # One object cut by the seam of two tiles: the tile seeing it whole says class 1, the
    # tile seeing 70% of it says class 2.
    whole = {"polyboxes": torch.from_numpy(_square(14, 10, 20)).float()[None],
             "scores": torch.tensor([0.9]), "labels": torch.tensor([1])}  # fmt: skip
    part = {"polyboxes": torch.from_numpy(_square(50, 10, 20)).float()[None],
            "scores": torch.tensor([0.6]), "labels": torch.tensor([2])}  # fmt: skip
    part["polyboxes"][0, 2::2] = torch.tensor([-7.0, 7.0, 7.0, -7.0])  # 14 of 20 px wide
    part["polyboxes"][0, 0] = 57.0
    tiles = [((36.0, 0.0), whole), ((0.0, 0.0), part)]  # both at x 50..64 / 50..70
    per_class = tiling.merge_detections(tiles, iou_threshold=0.5)
    assert per_class["labels"].tolist() == [1, 2]
    merged = tiling.merge_detections(tiles, iou_threshold=0.5, class_agnostic=True)
    assert merged["labels"].tolist() == [1]
    assert polybox.hull_xyxy(merged["polyboxes"][0]).tolist() == [50.0, 10.0, 70.0, 30.0]


def test_multiscale_plan_covers_the_image_at_every_scale() -> None:
    plan = tiling.tile_plan(700, 500, 256, 96, (0.5, 1.0, 1.5))
    by_scale = {r: [b for b, s in plan if s == r] for r in (0.5, 1.0, 1.5)}
    assert by_scale[1.0] == tiling.tile_grid(700, 500, 256, 96)  # scale 1: the plain grid
    assert by_scale[0.5] == tiling.tile_grid(700, 500, 512, 192)
    assert by_scale[1.5] == tiling.tile_grid(700, 500, 171, 64)
    for r, boxes in by_scale.items():  # resized tiles are about size pixels
        assert all(max(tiling.scaled_size(b, r)) <= 257 for b in boxes)


def test_prepare_and_predict_cut_the_same_multiscale_tiles(tmp_path: Path) -> None:
    from polydet.deploy.batched import cut, open_source

    root = tmp_path / "raw"
    (root / "images").mkdir(parents=True)
    (root / "labelTxt").mkdir()
    rng = np.random.default_rng(2)
    Image.fromarray((rng.random((500, 700, 3)) * 255).astype(np.uint8)).save(
        root / "images" / "big.png"
    )
    write_dota(
        root / "labelTxt" / "big.txt",
        [Annotation((230, 230, 280, 230, 280, 280, 230, 280), "card")],
    )
    out = tmp_path / "prepared"
    tile = "data.tile={enabled: true, size: 256, overlap: 96, min_visible: 0.6, scales: [0.5, 1.0]}"
    cfg = load_config(PARAMS, [f"data.root={root}", f"data.out={out}", tile])
    result = prepare(cfg)
    plan = tiling.tile_plan(700, 500, 256, 96, (0.5, 1.0))
    assert result["tiles"]["tiles"] == len(plan) == len(tiling.tile_grid(700, 500, 256, 96)) + 2
    images = pd.read_csv(out / "images.csv").set_index("image_id")
    assert images.loc["big__0_0_s0.5", ["width", "height"]].tolist() == [256, 250]
    objects = pd.read_csv(out / "objects.csv").set_index("image_id")
    # The object (230..280) in the half-scale tile (0, 0, 512, 500): halved.
    assert objects.loc["big__0_0_s0.5", ["xc", "yc", "dx1", "dy1"]].tolist() == [
        127.5, 127.5, -12.5, -12.5
    ]  # fmt: skip
    # predict cuts the very pixels prepare wrote (the model sees what it was trained on).
    with open_source(root / "images" / "big.png") as source:
        for box, r in plan:
            name = tiling.tile_name("big", box, r)
            written = np.asarray(Image.open(images.loc[name, "path"]))
            got = np.round(cut(source, (box, r)).numpy() * 255).transpose(1, 2, 0)
            assert np.array_equal(got, written)
