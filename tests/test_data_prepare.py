"""The prepare stage on a small synthetic dataset: contract columns, split, statistics, the
training Dataset and the command line."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from polydet import cli
from polydet.core.config import SplitConfig, load_config
from polydet.data import manifest
from polydet.data.dataset import PolyDataset, Record, collate, load_records
from polydet.data.formats import read_dota_labels
from polydet.data.prepare import prepare
from polydet.geometry import polybox

PARAMS = Path(__file__).parents[1] / "params.yaml"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    tmp = tmp_path_factory.mktemp("prep")
    sets = [
        f"synth.out={tmp / 'raw'}", "synth.num_images=20", "synth.image_width=128", "synth.image_height=96",
        f"data.root={tmp / 'raw'}", f"data.out={tmp / 'prepared'}",
    ]  # fmt: skip
    code = cli.main(["synth", "--params", str(PARAMS), *[a for s in sets for a in ("--set", s)]])
    assert code == 0
    cfg = load_config(PARAMS, sets)
    return cfg, prepare(cfg), tmp / "prepared", tmp / "raw"


def test_tables_follow_the_contract(prepared: tuple) -> None:
    cfg, result, out, raw = prepared
    images = pd.read_csv(out / "images.csv")
    objects = pd.read_csv(out / "objects.csv")
    assert list(images.columns) == ["image_id", "path", "width", "height", "split", "num_objects"]
    assert list(objects.columns) == [
        "image_id", "split", "label", "class", "difficult", "truncated",
        "xc", "yc", "dx1", "dy1", "dx2", "dy2", "dx3", "dy3", "dx4", "dy4",
        "area", "hull_w", "hull_h", "aspect", "angle", "first_corner",
    ]  # fmt: skip
    assert len(images) == 20 == result["images"] and len(objects) == result["objects"]
    assert (images.groupby("split").size().to_dict()) == {"train": 16, "val": 2, "test": 2}
    assert images["num_objects"].sum() == len(objects)
    assert (
        objects.groupby("image_id").size()
        == images.set_index("image_id")["num_objects"].loc[lambda s: s > 0]
    ).all()
    # Each row agrees with the raw label file it came from, canonicalized.
    row = objects.iloc[0]
    (first, *_) = read_dota_labels(raw / "labelTxt" / f"{row['image_id']}.txt")
    np.testing.assert_allclose(
        row[manifest.BOX_COLUMNS].to_numpy(float), first.polybox().numpy(), atol=1e-3
    )
    # Derived columns against independent computations.
    boxes = torch.tensor(objects[manifest.BOX_COLUMNS].to_numpy(float))
    c = polybox.to_corners(boxes).numpy()
    np.testing.assert_allclose(objects["hull_w"], c[..., 0].max(1) - c[..., 0].min(1), atol=1e-3)
    np.testing.assert_allclose(objects["aspect"], objects["hull_h"] / objects["hull_w"], rtol=1e-3)
    angle = np.degrees(np.arctan2(c[:, 1, 1] - c[:, 0, 1], c[:, 1, 0] - c[:, 0, 0]))
    np.testing.assert_allclose(objects["angle"], (angle + 90) % 180 - 90, atol=1e-3)
    assert objects["angle"].between(-90, 90, inclusive="left").all()
    assert set(objects["class"]) <= set(cfg.data.classes)
    assert (
        objects["label"] == objects["class"].map({c: i + 1 for i, c in enumerate(cfg.data.classes)})
    ).all()


def test_reports_are_written(prepared: tuple) -> None:
    _, result, out, _ = prepared
    stats = json.loads((out / "stats.json").read_text())
    assert stats["num_images"] == {"train": 16, "val": 2, "test": 2}
    assert sum(c["count"] for c in stats["classes"].values()) == result["objects"]
    for c in stats["classes"].values():
        assert sum(c["size_histogram"]) == c["count"]
    for name in ("objects_per_image.png", "size_by_class.png", "aspect_by_class.png"):
        with Image.open(out / name) as im:  # a whole, decodable PNG
            im.load()
            assert im.format == "PNG" and min(im.size) > 100, name
    md = (out / "stats.md").read_text().splitlines()
    for split, n in stats["num_images"].items():  # the split table, from stats.json's numbers
        assert f"| {split} | {n} | {stats['num_objects'][split]} |" in md
    assert sum(line.startswith(f"| {c} |") for line in md for c in stats["classes"]) == len(
        stats["classes"]
    )  # one row per class
    imported = json.loads((out / "import_summary.json").read_text())
    assert imported["objects"]["dropped"] == 0 and imported == result["import"]
    assert result["import"]["objects"]["dropped"] == 0
    # tiles/ always exists (later stages depend on it), here with an empty index: tiling is off.
    assert json.loads((out / "tiles" / "index.json").read_text()) == {}


def test_split_is_deterministic_by_image_and_seeded() -> None:
    ids = [f"img{i:03d}" for i in range(101)]
    cfg = SplitConfig(train=0.8, val=0.1, test=0.1, seed=3)
    a = manifest.split_ids(ids, cfg)
    assert a == manifest.split_ids(list(reversed(ids)), cfg)
    assert sorted(a.values()).count("val") == 10 and sorted(a.values()).count("test") == 10
    assert a != manifest.split_ids(ids, SplitConfig(0.8, 0.1, 0.1, seed=4))
    small = manifest.split_ids(["a", "b", "c"], cfg)
    assert sorted(small.values()) == ["test", "train", "val"]


def test_dataset_items_and_collate(prepared: tuple) -> None:
    cfg, _, out, _ = prepared
    records = load_records(out, "train")
    assert len(records) == 16 and all(isinstance(r, Record) for r in records)
    assert len(load_records(out, None)) == 20
    ds = PolyDataset(out, "train", cfg.train.augment)
    torch.manual_seed(0)
    batch = [ds[i] for i in range(4)]
    images, targets = collate(batch)
    assert len(images) == len(targets) == 4
    for (img, t), r in zip(batch, records):
        assert (
            img.dtype == torch.float32 and img.shape[0] == 3 and img.min() >= 0 and img.max() <= 1
        )
        assert set(img.shape[1:]) == {96, 128}
        assert t["polyboxes"].shape == (len(r.labels), 10) and t["polyboxes"].dtype == torch.float32
        assert t["labels"].dtype == torch.int64 and t["difficult"].dtype == torch.bool
        assert t["image_id"] == r.image_id
        torch.testing.assert_close(polybox.area(t["polyboxes"]), polybox.area(r.polyboxes))
    plain = PolyDataset(out, "val", None)
    img, t = plain[0]
    assert img.shape == (3, 96, 128)
    torch.testing.assert_close(t["polyboxes"], load_records(out, "val")[0].polyboxes)
