"""``polydet predict``: Task1 / JSON / drawn PNG outputs, tiling of large images, errors."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import FAST, one_thread  # noqa: F401  (one_thread: a fixture, used below)
from PIL import Image

from polydet.cli import main
from polydet.core.config import Config, load_config
from polydet.core.errors import DataError, ModelError
from polydet.data.formats import read_task1_dir
from polydet.deploy.predict import detect, list_images, predict_paths
from polydet.geometry import polybox
from polydet.model import build_model, save_model

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["card", "plate", "kite"]
TINY = [
    *FAST,
    "model.roi.score_thresh=0.0",
    "model.roi.detections_per_img=5",
    "data.tile.enabled=true",
    "data.tile.size=64",
    "data.tile.overlap=16",
]


def tiny_config(tmp: Path) -> Config:
    return load_config(ROOT / "params.yaml", [*TINY, f"train.out={tmp / 'train'}"])


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained tiny model: its scores are near-uniform, so it detects something."""
    tmp = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    cfg = tiny_config(tmp)
    return save_model(build_model(cfg.model), tmp / "model.pt", cfg.model, CLASSES, None)


def write_image(path: Path, width: int, height: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def test_cli_predict_writes_task1_json_and_drawn_images(model_file: Path, tmp_path: Path) -> None:
    images = tmp_path / "in"
    write_image(images / "a.png", 64, 64, 0)
    write_image(images / "b c.jpg", 48, 64, 1)  # a space in the name, another format
    write_image(images / "large.png", 150, 100, 2)  # larger than the 64 px tiles
    (images / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    args = ["predict", str(images), "--model", str(model_file), "--out", str(out)]
    args += ["--score-thresh", "0.0", "--params", str(ROOT / "params.yaml")]
    for item in TINY:
        args += ["--set", item]
    assert main(args) == 0

    doc = json.loads((out / "detections.json").read_text())
    summary = doc["summary"]
    assert summary["images"] == 3 and summary["tiled_images"] == 1
    by_id = {r["image_id"]: r for r in doc["images"]}
    assert set(by_id) == {"a", "b_c", "large"}
    assert by_id["large"]["tiles"] == 6  # x starts 0, 48, 86; y starts 0, 36
    assert by_id["a"]["tiles"] == 1
    assert summary["detections"] == sum(len(r["detections"]) for r in doc["images"]) > 0
    assert summary["detections"] == sum(summary["per_class"].values())

    task1 = read_task1_dir(out)
    assert sorted(task1) == sorted(CLASSES)
    assert sum(len(v) for v in task1.values()) == summary["detections"]
    for cls, dets in task1.items():
        for d in dets:
            assert d.image_id in by_id
            assert any(
                x["class"] == cls
                and abs(x["score"] - d.score) < 1e-5
                and np.allclose(np.ravel(x["corners"]), d.points, atol=0.01)
                for x in by_id[d.image_id]["detections"]
            ), f"{d} not in detections.json"
    for record in doc["images"]:
        w, h = record["width"], record["height"]
        for x in record["detections"]:
            box = torch.tensor(x["polybox"])
            ring = polybox.to_corners(box)
            if "first_corner" in x:  # listed from the predicted first corner (the heading)
                ring = ring.roll(-x["first_corner"], dims=0)
            assert torch.allclose(ring, torch.tensor(x["corners"]), atol=2e-3)
            hull = polybox.hull_xyxy(box)
            assert hull[0] >= -1 and hull[1] >= -1 and hull[2] <= w + 1 and hull[3] <= h + 1
        with Image.open(out / "images" / f"{record['image_id']}.png") as drawn:
            assert drawn.size == (w, h)
            source = np.asarray(Image.open(record["path"]).convert("RGB"))
            # Outlines were drawn: the picture differs from the input.
            assert (np.asarray(drawn.convert("RGB")) != source).any() == bool(record["detections"])


class FindBrightSquare:
    """A stand-in detector: one detection, the bounding box of the bright pixels it sees."""

    cfg = SimpleNamespace(roi=SimpleNamespace(nms_thresh=0.5))

    def __init__(self) -> None:
        self.crops: list[tuple[int, int]] = []

    def predict(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        out = []
        for im in images:
            self.crops.append(tuple(im.shape[-2:]))
            ys, xs = torch.where(im[0] > 0.5)
            if len(xs) == 0:
                out.append({"polyboxes": torch.zeros(0, 10), "scores": torch.zeros(0),
                            "labels": torch.zeros(0, dtype=torch.int64)})  # fmt: skip
                continue
            xyxy = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]]).float()
            out.append({"polyboxes": polybox.from_xyxy(xyxy), "scores": torch.tensor([0.9]),
                        "labels": torch.tensor([2])})  # fmt: skip
        return out


def test_tiles_merge_back_to_full_image_pixels(tmp_path: Path) -> None:
    image = torch.zeros(3, 100, 100)
    image[:, 40:60, 42:62] = 1.0  # whole inside all 4 tiles (starts 0 and 36)
    model = FindBrightSquare()
    tile = tiny_config(tmp_path).data.tile
    det, n_tiles = detect(model, image, tile, score_thresh=0.5, batch_size=3)  # type: ignore[arg-type]
    assert n_tiles == 4 and model.crops == [(64, 64)] * 4
    assert len(det["scores"]) == 1 and det["labels"].tolist() == [2]  # duplicates merged
    assert polybox.hull_xyxy(det["polyboxes"][0]).tolist() == [42.0, 40.0, 62.0, 60.0]
    small = torch.zeros(3, 64, 64)
    det, n_tiles = detect(model, small, tile, score_thresh=0.5)  # type: ignore[arg-type]
    assert n_tiles == 1 and len(det["scores"]) == 0


def test_predict_errors_name_the_path(model_file: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        list_images(tmp_path / "empty")
    with pytest.raises(DataError, match="missing"):
        predict_paths(cfg, tmp_path / "missing", model=str(model_file), out_dir=tmp_path / "o")
    image = write_image(tmp_path / "x.png", 32, 32, 0)
    with pytest.raises(ModelError, match="nope.pt"):
        predict_paths(cfg, image, model=str(tmp_path / "nope.pt"), out_dir=tmp_path / "o")


class FindBrightBox(FindBrightSquare):
    """As :class:`FindBrightSquare`, scoring by the box's area (a whole view of an object
    beats a part of it, as a trained detector's would), and recording each call's batch."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[int] = []
        self.found = 0

    def predict(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        self.batches.append(len(images))
        out = super().predict(images)
        for d in out:
            d["scores"] = polybox.area(d["polyboxes"]) / 1000
            self.found += len(d["scores"])
        return out


def test_an_object_straddling_two_tiles_is_reported_once(tmp_path: Path) -> None:
    image = torch.zeros(3, 100, 100)
    image[:, 10:30, 50:70] = 1.0  # tile x 0..64 sees 14 of its 20 px, tile x 36..100 all
    model = FindBrightBox()
    det, n_tiles = detect(model, image, tiny_config(tmp_path).data.tile, score_thresh=0.1)  # type: ignore[arg-type]
    assert n_tiles == 4 and model.found == 2  # seen by two tiles
    assert len(det["scores"]) == 1
    assert polybox.hull_xyxy(det["polyboxes"][0]).tolist() == [50.0, 10.0, 70.0, 30.0]


def test_images_and_tiles_are_batched_across_images_and_cut_lazily(tmp_path: Path) -> None:
    from polydet.deploy.batched import detect_stream

    tile = tiny_config(tmp_path).data.tile
    images = [torch.zeros(3, 64, 64), torch.zeros(3, 100, 100), torch.zeros(3, 40, 50)]
    for im, x in zip(images, (5, 42, 20)):
        im[:, 10:30, x : x + 20] = 1.0
    model = FindBrightBox()
    pulled: list[int] = []

    def source():  # records how many model calls ran before each image was read
        for i, im in enumerate(images):
            pulled.append(len(model.batches))
            yield i, (im * 255).to(torch.uint8)

    out = list(detect_stream(model, source(), tile, 0.1, batch_size=4, iou_threshold=0.5))
    assert model.batches == [4, 2]  # 1 + 4 tiles + 1 inputs in batches of evaluate.batch_size
    assert pulled == [0, 0, 1]  # the third image is read after the first batch ran
    assert [k for k, _, _ in out] == [0, 1, 2] and [n for _, _, n in out] == [1, 4, 1]
    for (_, det, _), im in zip(out, images):  # uint8 input: the same as float, one at a time
        alone, _ = detect(FindBrightBox(), im, tile, score_thresh=0.1)  # type: ignore[arg-type]
        assert torch.equal(det["polyboxes"], alone["polyboxes"]) and len(alone["scores"]) == 1


def test_multiscale_tiles_map_back_to_image_pixels(tmp_path: Path) -> None:
    import dataclasses

    image = torch.zeros(3, 100, 100)
    image[:, 40:60, 42:62] = 1.0
    tile = dataclasses.replace(tiny_config(tmp_path).data.tile, scales=(0.5, 1.0))
    model = FindBrightBox()
    det, n_tiles = detect(model, (image * 255).to(torch.uint8), tile, score_thresh=0.1)  # type: ignore[arg-type]
    assert n_tiles == 5 and model.crops[0] == (50, 50)  # one 128 px tile at half scale
    assert len(det["scores"]) == 1
    hull = polybox.hull_xyxy(det["polyboxes"][0])
    assert torch.allclose(hull, torch.tensor([42.0, 40.0, 62.0, 60.0]), atol=2.0)


def test_images_are_read_as_decoded_and_cut_to_the_reader_values(tmp_path: Path) -> None:
    from polydet.data.dataset import load_image
    from polydet.deploy.batched import autocast, cut, open_source

    path = write_image(tmp_path / "a.png", 40, 30, 3)
    with open_source(path) as image:
        assert isinstance(image, Image.Image) and image.size == (40, 30)  # 8-bit, not float
        assert torch.equal(cut(image, ((0, 0, 40, 30), 1.0)), load_image(path))
        assert torch.equal(cut(image, ((5, 2, 25, 12), 1.0)), load_image(path)[:, 2:12, 5:25])
    grey = tmp_path / "grey.png"
    Image.fromarray(np.arange(1200, dtype=np.uint8).reshape(30, 40)).save(grey)
    deep = tmp_path / "deep.png"  # 16-bit: kept as float
    Image.fromarray(np.arange(1200, dtype=np.uint16).reshape(30, 40) * 50).save(deep)
    for p in (grey, deep):
        with open_source(p) as image:
            assert torch.equal(cut(image, ((0, 0, 40, 30), 1.0)), load_image(p))
    # Autocast only on CUDA with train.amp (float16); CPU inference stays float32.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "CUDA is not available" on a CPU machine
        cuda = autocast(torch.device("cuda"), True)
    assert isinstance(cuda, torch.autocast) and cuda.device == "cuda"
    assert cuda.fast_dtype == torch.float16
    assert not isinstance(autocast(torch.device("cuda"), False), torch.autocast)
    assert not isinstance(autocast(torch.device("cpu"), True), torch.autocast)
