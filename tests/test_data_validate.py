"""The bad-file corpus (tests/data/*_bad): each case gets its exact error, good records beside
it survive, and the policy decides between stopping and skipping."""

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from polydet import cli
from polydet.core.config import load_config
from polydet.core.errors import DataError
from polydet.data.prepare import import_dataset, prepare
from polydet.geometry import polybox

DATA = Path(__file__).parent / "data"
DOTA = DATA / "dota_bad"
PARAMS = Path(__file__).parents[1] / "params.yaml"
SQUARE = polybox.from_corners(
    torch.tensor([[10.0, 10], [30, 10], [30, 30], [10, 30]], dtype=torch.float64)
)

# case -> [(location relative to the root, message, action)] in the order they are found.
DOTA_CASES = {
    "wrong_fields": [
        (":3", "wrong field count: expected 10 (x1 y1 ... x4 y4 class difficult), got 7", "dropped")
    ],
    "not_number": [(":3", "not a number: '3O'", "dropped")],
    "non_finite": [
        (":3", "non-finite coordinate: 'nan'", "dropped"),
        (":4", "non-finite coordinate: 'inf'", "dropped"),
    ],
    "unknown_class": [
        (":3", "unknown class: 'boat' is not one of ['card', 'plate', 'kite']", "dropped")
    ],
    "bad_difficult": [(":3", "bad difficult flag: expected 0 or 1, got '2'", "dropped")],
    "zero_area": [(":3", "zero area: corners are collinear or coincide", "dropped")],
    "non_convex": [(":3", "non-convex: one corner lies inside the other three", "dropped")],
    "far_outside": [
        (":3", "far outside image: 12% of its area is inside the 64x64 image", "dropped")
    ],
    "self_intersecting": [(":3", "self-intersecting: corners reordered to hull order", "repaired")],
    "partly_outside": [(":3", "clipped to image: 60% inside; marked truncated", "repaired")],
    "empty_label": [("", "empty file: no objects; image kept as a negative", "kept")],
    "binary_label": [
        (
            "",
            "unreadable file: 'utf-8' codec can't decode byte 0xff in position 0: invalid start byte",
            "dropped",
        )
    ],
    "orphan": [("", "no image for label file: no image orphan under {root}/images", "dropped")],
    "unlabelled": [
        ("", "no label file for image: expected {root}/labelTxt/unlabelled.txt", "dropped")
    ],
    "truncated_image": [("", "truncated image: image file is truncated", "dropped")],
    "not_an_image": [("", "unreadable image: not an image format PIL can read", "dropped")],
    "empty_image": [("", "empty file: image file has 0 bytes", "dropped")],
}
IMAGE_LEVEL = {"unlabelled", "truncated_image", "not_an_image", "empty_image"}


def _data_cfg(
    root: Path, fmt: str = "dota", on_error: str = "skip", classes=("card", "plate", "kite")
):
    return dataclasses.replace(
        load_config(PARAMS).data, root=str(root), format=fmt, on_error=on_error, classes=classes
    )


def _expected(case: str, root: Path) -> list[str]:
    base = root / ("images" if case in IMAGE_LEVEL else "labelTxt")
    name = f"{case}.png" if case in IMAGE_LEVEL else f"{case}.txt"
    return [
        f"{base / name}{loc}: {msg.format(root=root)} ({act})" for loc, msg, act in DOTA_CASES[case]
    ]


def _one_case(case: str, tmp_path: Path) -> Path:
    """A dataset root holding only ``case`` (and its image / label, where there is one)."""
    root = tmp_path / "root"
    for sub, ext in (("images", ".png"), ("labelTxt", ".txt")):
        (root / sub).mkdir(parents=True)
        src = DOTA / sub / f"{case}{ext}"
        if src.exists():
            shutil.copy(src, root / sub / src.name)
    return root


@pytest.mark.parametrize("case", sorted(DOTA_CASES))
def test_each_bad_case_under_both_policies(case: str, tmp_path: Path) -> None:
    root = _one_case(case, tmp_path)
    expected = _expected(case, root)
    if DOTA_CASES[case][0][2] == "dropped":
        with pytest.raises(DataError) as e:
            import_dataset(_data_cfg(root, on_error="stop"))
        assert str(e.value) == expected[0].removesuffix(" (dropped)")
    imp = import_dataset(_data_cfg(root, on_error="skip"))
    assert [str(i) for i in imp.log.issues] == expected
    # The good record on line 2 beside the bad one survives, unchanged.
    if case not in IMAGE_LEVEL | {"orphan", "empty_label", "binary_label"}:
        (objs,) = imp.objects
        torch.testing.assert_close(torch.from_numpy(objs.polyboxes[0]), SQUARE)
        assert objs.labels[0] == 1 and not objs.truncated[0]


def test_whole_corpus_skip_summary_and_survivors() -> None:
    imp = import_dataset(_data_cfg(DOTA))
    expected = sorted(s for case in DOTA_CASES for s in _expected(case, DOTA))
    assert sorted(str(i) for i in imp.log.issues) == expected
    by_id = {s.image_id: o for s, o in zip(imp.sources, imp.objects)}
    assert sorted(by_id) == sorted(
        {"good", "empty_label"} | set(DOTA_CASES) - IMAGE_LEVEL - {"orphan", "binary_label"}
    )
    assert len(by_id["empty_label"].labels) == 0
    good = by_id["good"]
    assert good.labels.tolist() == [1, 2] and good.difficult.tolist() == [False, True]
    # Repairs: the bow tie is the square 40..60; the clipped plate is 40..64 x 40..60, truncated.
    bow = by_id["self_intersecting"]
    c = polybox.to_corners(torch.from_numpy(bow.polyboxes[1])).numpy()
    np.testing.assert_allclose(c, [[40, 40], [60, 40], [60, 60], [40, 60]])
    clipped = by_id["partly_outside"]
    assert clipped.truncated.tolist() == [False, True]
    c = polybox.to_corners(torch.from_numpy(clipped.polyboxes[1])).numpy()
    np.testing.assert_allclose(c, [[40, 40], [64, 40], [64, 60], [40, 60]])
    s = imp.summary
    assert s["images"] == {
        "read": 18,
        "kept": 12,
        "dropped": 6,
        "dropped_by_reason": {
            "empty file": 1, "no image for label file": 1, "no label file for image": 1,
            "truncated image": 1, "unreadable file": 1, "unreadable image": 1,
        },
    }  # fmt: skip
    ob = s["objects"]
    assert (ob["read"], ob["kept"], ob["repaired"], ob["dropped"]) == (28, 12, 2, 14)
    assert ob["repaired_by_reason"] == {"clipped to image": 1, "self-intersecting": 1}
    assert s["warnings_by_reason"] == {"empty file": 1}


def test_prepare_writes_summary_and_marks_flags(tmp_path: Path) -> None:
    cfg = load_config(PARAMS, [f"data.root={DOTA}", f"data.out={tmp_path / 'out'}"])
    result = prepare(cfg)
    out = tmp_path / "out"
    summary = json.loads((out / "import_summary.json").read_text())
    assert summary == result["import"] and summary["objects"]["dropped"] == 14
    assert len((out / "import_issues.txt").read_text().splitlines()) == summary["num_issues"] == 18
    objects = pd.read_csv(out / "objects.csv")
    assert objects["truncated"].sum() == 1 and objects["difficult"].sum() == 1
    assert objects.loc[objects["truncated"] == 1, "image_id"].tolist() == ["partly_outside"]


def test_cli_stop_policy_prints_one_line_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    code = cli.main(
        ["prepare", "--params", str(PARAMS), "--set", f"data.root={DOTA}", "--set", "data.on_error=stop",
         "--set", f"data.out={tmp_path}"]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    assert (
        err
        == f"polydet prepare: error: {DOTA}/labelTxt/orphan.txt: no image for label file: no image orphan under {DOTA}/images\n"
    )


def test_coco_corpus() -> None:
    root = DATA / "coco_bad"
    ann = root / "annotations.json"
    imp = import_dataset(_data_cfg(root, "coco"))
    assert [str(i) for i in imp.log.issues] == [
        f"{ann}: annotations[1]: polygon reduced to quad: 1 part(s), 8 points (repaired)",
        f"{ann}: annotations[2]: malformed record: segmentation is an RLE mask, expected polygon lists (dropped)",
        f"{ann}: annotations[3]: malformed record: polygon of 5 numbers, expected an even count >= 6 (dropped)",
        f"{ann}: annotations[4]: unknown class: category_id 9 (dropped)",
        f"{ann}: annotations[5]: malformed record: image_id 99 is not in 'images' (dropped)",
        f"{ann}: images[1] (id 2): path escapes dataset root: file_name '../../outside.png' (dropped)",
        f"{root}/images/missing.png: missing image: no such file (referenced by {ann}: images[2] (id 3)) (dropped)",
        f"{ann}: images[3] (id 4): image size differs from annotation: file is 64x64, JSON says 100x100; using the file's (kept)",
        f"{ann}: images[4] (id 5): path escapes dataset root: file_name '/tmp/absolute.png' (dropped)",
    ]
    by_id = {s.image_id: o for s, o in zip(imp.sources, imp.objects)}
    torch.testing.assert_close(torch.from_numpy(by_id["good"].polyboxes[0]), SQUARE)
    assert by_id["good"].labels.tolist() == [1, 3]
    assert by_id["small"].difficult.tolist() == [True]  # iscrowd


def test_yolo_obb_corpus() -> None:
    root = DATA / "yolo_bad"
    imp = import_dataset(_data_cfg(root, "yolo_obb"))
    bad = root / "labels" / "bad.txt"
    assert [str(i) for i in imp.log.issues] == [
        f"{bad}:2: unknown class: class index 3 outside 0..2 (dropped)",
        f"{bad}:3: not a number: class index 'x' (dropped)",
        f"{bad}:4: wrong field count: expected 9 (class x1 y1 ... x4 y4), got 7 (dropped)",
        f"{bad}:5: far outside image: 0% of its area is inside the 80x40 image (dropped)",
    ]
    by_id = {s.image_id: o for s, o in zip(imp.sources, imp.objects)}
    # Normalized 0.125..0.5 x 0.25..0.75 of an 80x40 image = pixels 10..40 x 10..30.
    c = polybox.to_corners(torch.from_numpy(by_id["good"].polyboxes[0])).numpy()
    np.testing.assert_allclose(c, [[10, 10], [40, 10], [40, 30], [10, 30]])
    assert by_id["bad"].labels.tolist() == [2]


def test_icdar15_corpus() -> None:
    root = DATA / "icdar_bad"
    imp = import_dataset(_data_cfg(root, "icdar15", classes=("text",)))
    gt = root / "gt" / "gt_img_1.txt"
    assert [str(i) for i in imp.log.issues] == [
        f"{gt}:3: wrong field count: expected 9 (x1,y1,...,x4,y4,transcription), got 4 (dropped)"
    ]
    (src,) = imp.sources
    assert [o.text for o in src.objects] == ["Hello, world", "###", "Ünïcödé"]
    assert imp.objects[0].difficult.tolist() == [False, True, False]
    with pytest.raises(DataError, match="icdar15 has one class"):
        import_dataset(_data_cfg(root, "icdar15"))


def test_missing_root_is_an_error_whatever_the_policy(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="dataset root does not exist"):
        import_dataset(_data_cfg(tmp_path / "nope"))
