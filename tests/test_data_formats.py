"""Every label format: read -> write -> read gives the same records; exact error messages."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from polydet.core.errors import DataError
from polydet.data import formats as F
from polydet.data.validate import ImportLog
from polydet.geometry import polybox

CLASSES = ("card", "plate", "kite")


def _objects() -> list[F.Annotation]:
    return [
        F.Annotation((10.0, 10.0, 30.0, 10.0, 30.0, 30.0, 10.0, 30.0), "card", False),
        F.Annotation((40.25, 12.5, 61.125, 20.0, 55.0, 41.75, 35.5, 30.0), "plate", True),
        F.Annotation((1e-3, 2.0, 5.000001, 2.0, 5.0, 7.0, 0.1, 7.0), "kite", False),
    ]


def test_dota_round_trip_with_header(tmp_path: Path) -> None:
    p1, p2 = tmp_path / "a.txt", tmp_path / "b.txt"
    F.write_dota(p1, _objects(), imagesource="GoogleEarth", gsd="0.146343590398")
    first = F.read_dota(p1)
    assert first.objects == _objects()
    assert (first.imagesource, first.gsd) == ("GoogleEarth", "0.146343590398")
    assert [o.line for o in first.objects] == [3, 4, 5]
    F.write_dota(p2, first.objects, first.imagesource, first.gsd)
    assert F.read_dota(p2) == first
    assert p1.read_text() == p2.read_text()
    assert p1.read_text().splitlines()[2:4] == [
        "10 10 30 10 30 30 10 30 card 0",
        "40.25 12.5 61.125 20 55 41.75 35.5 30 plate 1",
    ]


def test_dota_reads_v1_lines_without_difficult_and_official_float_style(tmp_path: Path) -> None:
    p = tmp_path / "P0001.txt"
    p.write_text(
        "imagesource:GoogleEarth\ngsd:null\n2753.0 2408.0 2861.0 2385.0 2888.0 2468.0 2805.0 2502.0 plane\n"
    )
    (o,) = F.read_dota(p).objects
    assert o.points[:2] == (2753.0, 2408.0) and o.cls == "plane" and not o.difficult


def test_yolo_obb_round_trip(tmp_path: Path) -> None:
    w, h = 1000, 613  # not powers of two: the normalization is a real float division
    p1, p2 = tmp_path / "a.txt", tmp_path / "b.txt"
    objs = [F.Annotation(o.points, o.cls) for o in _objects()]  # YOLO-OBB has no difficult flag
    F.write_yolo_obb(p1, objs, w, h, CLASSES)
    first = F.read_yolo_obb(p1, w, h, CLASSES)
    F.write_yolo_obb(p2, first, w, h, CLASSES)
    second = F.read_yolo_obb(p2, w, h, CLASSES)
    for a, b, c in zip(objs, first, second):
        assert a.cls == b.cls == c.cls
        np.testing.assert_allclose(b.points, a.points, rtol=0, atol=1e-9)
        assert b.points == c.points  # exact from the first read on


def test_coco_round_trip_and_long_polygon_rule(tmp_path: Path) -> None:
    octagon = [
        round(v, 6)
        for a in np.arange(8) * np.pi / 4
        for v in (50 + 20 * np.cos(a), 50 + 20 * np.sin(a))
    ]
    src = {
        "images": [{"id": 7, "file_name": "x/a.png", "width": 100, "height": 90}],
        "categories": [{"id": 1, "name": "card"}, {"id": 3, "name": "kite"}],
        "annotations": [
            {
                "id": 1,
                "image_id": 7,
                "category_id": 1,
                "segmentation": [[10, 10, 30, 10, 30, 30, 10, 30]],
                "iscrowd": 1,
            },
            {"id": 2, "image_id": 7, "category_id": 3, "segmentation": [octagon]},
        ],
    }
    p0, p1 = tmp_path / "src.json", tmp_path / "a.json"
    p0.write_text(json.dumps(src))
    log = ImportLog("skip")
    first = F.read_coco(p0, log)
    assert [str(i) for i in log.issues] == [
        f"{p0}: annotations[1]: polygon reduced to quad: 1 part(s), 8 points (repaired)"
    ]
    card, kite = first.objects[7]
    assert card.difficult and card.points == (10, 10, 30, 10, 30, 30, 10, 30)
    # The octagon's best quad is an inscribed square: area 2 r^2 = 800.
    assert float(polybox.area(kite.polybox().double())) == pytest.approx(800.0, rel=1e-6)
    F.write_coco(p1, first)
    second = F.read_coco(p1)
    assert second == first
    assert second.images == [F.CocoImage(7, "x/a.png", 100, 90)]


def test_icdar15_round_trip_bom_commas_and_dont_care(tmp_path: Path) -> None:
    p0, p1 = tmp_path / "gt_img_1.txt", tmp_path / "gt_b.txt"
    p0.write_bytes(
        "\ufeff1,1,30,1,30,20,1,20,Hello, world\r\n5,30,40,30,40,50,5,50,###\r\n".encode()
    )
    first = F.read_icdar15(p0)
    assert [(o.text, o.difficult, o.cls) for o in first] == [
        ("Hello, world", False, "text"),
        ("###", True, "text"),
    ]
    assert first[0].points == (1, 1, 30, 1, 30, 20, 1, 20)
    F.write_icdar15(p1, first)
    assert p1.read_bytes().startswith(b"\xef\xbb\xbf")
    assert F.read_icdar15(p1) == first


def test_task1_write_read_write_is_stable(tmp_path: Path) -> None:
    corners = torch.tensor(
        [[[10.123, 10.0], [30.0, 10.5], [30.0, 30.0], [10.0, 30.0]]] * 3, dtype=torch.float64
    )
    corners[1] += 50
    corners[2] += 100
    dets = {
        "img_b": {
            "polyboxes": polybox.from_corners(corners[:2]).float(),
            "scores": torch.tensor([0.9, 0.3]),
            "labels": torch.tensor([1, 3]),
        },
        "img_a": {
            "polyboxes": polybox.from_corners(corners[2:]).float(),
            "scores": torch.tensor([0.55555555]),
            "labels": torch.tensor([1]),
        },
    }
    d1, d2 = tmp_path / "one", tmp_path / "two"
    paths = F.write_task1(d1, dets, CLASSES)
    assert sorted(p.name for p in paths) == ["Task1_card.txt", "Task1_kite.txt", "Task1_plate.txt"]
    assert (d1 / "Task1_plate.txt").read_text() == ""
    first = F.read_task1_dir(d1)
    assert [d.image_id for d in first["card"]] == ["img_a", "img_b"]
    assert first["card"][0].score == 0.555556
    assert first["card"][0].points[:2] == (110.12, 110.0)
    F.write_task1(d2, F.detections_by_image(first, CLASSES), CLASSES)
    for name in ("card", "kite", "plate"):
        assert (d1 / f"Task1_{name}.txt").read_text() == (d2 / f"Task1_{name}.txt").read_text()
    assert F.read_task1_dir(d2) == first


def test_coco_results_round_trip(tmp_path: Path) -> None:
    box = polybox.from_corners(torch.tensor([[[1.0, 2.0], [11.0, 2.0], [11.0, 7.0], [1.0, 7.0]]]))
    dets = {"a": {"polyboxes": box, "scores": torch.tensor([0.5]), "labels": torch.tensor([2])}}
    p = tmp_path / "results.json"
    F.write_coco_results(p, dets, CLASSES, image_ids={"a": 42})
    (r,) = json.loads(p.read_text())
    assert r["image_id"] == 42 and r["category_id"] == 2 and r["bbox"] == [1.0, 2.0, 10.0, 5.0]
    back = F.read_coco_results(p, CLASSES, image_ids={"a": 42})
    assert back["plate"] == [F.Detection("a", 0.5, (1.0, 2.0, 11.0, 2.0, 11.0, 7.0, 1.0, 7.0))]


def test_read_dota_labels_checks_geometry(tmp_path: Path) -> None:
    p = tmp_path / "x.txt"
    p.write_text("0 0 4 4 4 0 0 4 card 1\n0 0 10 0 10 10 0 10 kite 0\n0 0 10 0 2 2 0 10 card 0\n")
    with pytest.raises(DataError) as e:
        F.read_dota_labels(p)
    assert str(e.value) == f"{p}:3: non-convex: one corner lies inside the other three"
    objs = F.read_dota_labels(p, on_error="skip")
    assert [o.cls for o in objs] == ["card", "kite"] and objs[0].difficult
    # The bow tie comes back in hull (canonical) order: a proper ring of area 16.
    c = torch.tensor(objs[0].points, dtype=torch.float64).view(4, 2)
    assert int(polybox.check_corners(c)) == 0
    assert objs[1].points == (0, 0, 10, 0, 10, 10, 0, 10)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "1 2 3\n",
            "{p}:1: wrong field count: expected 10 (x1 y1 ... x4 y4 class difficult), got 3",
        ),
        ("\n0 0 1 0 1 x 0 1 card 0\n", "{p}:2: not a number: 'x'"),
        ("0 0 1 0 1 1 0 -inf card 0\n", "{p}:1: non-finite coordinate: '-inf'"),
        ("0 0 1 0 1 1 0 1 card yes\n", "{p}:1: bad difficult flag: expected 0 or 1, got 'yes'"),
    ],
)
def test_dota_syntax_errors_name_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    p = tmp_path / "bad.txt"
    p.write_text(text)
    with pytest.raises(DataError) as e:
        F.read_dota(p)
    assert str(e.value) == message.format(p=p)


def test_task1_bad_line_is_named(tmp_path: Path) -> None:
    (tmp_path / "Task1_card.txt").write_text("a 0.5 0 0 1 0 1 1 0 1\nb 0.5 0 0 1\n")
    with pytest.raises(DataError, match=r"Task1_card.txt:2: wrong field count"):
        F.read_task1_dir(tmp_path)


def test_label_txt_fast_path_reads_what_formats_reads(tmp_path: Path) -> None:
    files = [tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "c.txt"]
    files[0].write_text(
        "imagesource:GoogleEarth\ngsd:0.146\n1 2 30 2 30 40 1 40 small-vehicle 1\n\n"
        "  5 5 9 5 9 9 5 9   plane\n"  # 9 fields: not difficult; extra spaces
    )
    files[1].write_text("")  # an image without objects
    files[2].write_text("0.5 0.5 10.25 0.5 10.25 7 0.5 7 plane 0\n")
    img, names, corners, difficult = F._dota_table(files)
    ref = [(i, o) for i, p in enumerate(files) for o in F.read_dota(p).objects]
    assert img.tolist() == [i for i, _ in ref]
    assert names == [o.cls for _, o in ref]
    assert corners.tolist() == [list(o.points) for _, o in ref]
    assert difficult.tolist() == [o.difficult for _, o in ref] == [True, False, False]
    files[2].write_text("0 0 10 0 10 10 0 10\n")  # 8 fields: the slow path names the line
    assert F._dota_table(files) is None
    with pytest.raises(DataError, match=r"c\.txt:1: wrong field count"):
        F.read_dota_arrays(files)


def test_task1_fast_path_keeps_na_like_ids_and_names_bad_lines(tmp_path: Path) -> None:
    # pandas reads "NA" / "null" as missing by default; an image id may be spelled so.
    p = tmp_path / "Task1_card.txt"
    p.write_text("NA 0.5 0 0 10 0 10 10 0 10\nnull 0.25 1 1 9 1 9 9 1 9.5\n")
    ids, scores, corners = F.read_task1_arrays(p)
    assert ids == ["NA", "null"] and scores.tolist() == [0.5, 0.25]
    assert [d.image_id for d in F.read_task1(p)] == ids
    assert [list(d.points) for d in F.read_task1(p)] == corners.tolist()
    p.write_text("a 0.5 0 0 10 0 10 10 0 10\nb 0.5 0 0 10 0 10 10 0 NA\n")
    with pytest.raises(DataError, match=r"Task1_card\.txt:2: not a number"):
        F.read_task1_arrays(p)
