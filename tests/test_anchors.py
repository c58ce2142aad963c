"""polydet.train.anchors: the anchor grid IoU against torchvision, the resize rule against
torchvision's transform, the fit, and the stage's files and errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from polydet.core.config import ConfigError, load_config
from polydet.core.errors import DataError
from polydet.data.manifest import BOX_COLUMNS
from polydet.geometry import polybox
from polydet.train.anchors import (
    AUTO_FACTORS,
    SCALED,
    GroundTruths,
    best_anchor_iou,
    configure_anchors,
    fit_anchors,
    input_scale,
    level_strides,
    load_train_objects,
    scale_sizes,
)

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def full_grid_best_iou(boxes: torch.Tensor, padded: tuple[int, int], sizes, ratios, strides):
    """Reference: every anchor torchvision's AnchorGenerator places on a padded image of
    ``(w, h)`` pixels, IoU by torchvision's box_iou, best per ground truth."""
    w, h = padded
    gen = AnchorGenerator(tuple(tuple(s) for s in sizes), (tuple(ratios),) * len(sizes))
    feats = [torch.zeros(1, 1, math.ceil(h / s), math.ceil(w / s)) for s in strides]
    images = ImageList(torch.zeros(1, 3, h, w), [(h, w)])
    anchors = gen(images, feats)[0].double()
    return torchvision.ops.box_iou(boxes, anchors).amax(1)


@pytest.mark.parametrize("padded", [(256, 256), (224, 160), (352, 96)])
def test_best_anchor_iou_equals_full_anchor_grid(padded: tuple[int, int]) -> None:
    """Nearest-cells search == brute force over the real grid, including images whose
    pooled level has a non-power-of-two integer stride (224 // ceil(224 / 64) = 56)."""
    g = torch.Generator().manual_seed(0)
    n = 300
    wh = torch.exp(torch.rand(n, 2, generator=g) * math.log(150)) + 2
    centre = torch.rand(n, 2, generator=g) * torch.tensor(padded, dtype=torch.float32)
    boxes = torch.cat([centre - wh / 2, centre + wh / 2], 1).double()
    sizes, ratios, strides = (
        [[16, 24], [32, 48], [64, 96], [128, 192]],
        [0.5, 1.0, 2.0],
        [8, 16, 32, 64],
    )
    gt = GroundTruths(
        image_id=np.array(["a"] * n), index=np.arange(n), line=np.arange(n) + 2,
        cls=np.array(["x"] * n), boxes=boxes.numpy(), padded=np.array([padded] * n),
    )  # fmt: skip
    got = best_anchor_iou(gt, sizes, ratios, strides)
    ref = full_grid_best_iou(boxes, padded, sizes, ratios, strides).numpy()
    assert np.abs(got - ref).max() < 1e-9


@pytest.mark.parametrize(("width", "height"), [(300, 200), (1000, 500), (256, 256), (97, 411)])
def test_input_scale_matches_generalized_rcnn_transform(width: int, height: int) -> None:
    transform = GeneralizedRCNNTransform(256, 320, [0.0] * 3, [1.0] * 3).eval()
    boxes = torch.tensor([[10.0, 20.0, 60.0, 90.0], [0.0, 0.0, width, height]])
    images, targets = transform([torch.rand(3, height, width)], [{"boxes": boxes.clone()}])
    sx, sy, new_w, new_h = input_scale(np.array([width]), np.array([height]), 256, 320)[0]
    assert images.image_sizes[0] == (int(new_h), int(new_w))
    assert torch.allclose(
        targets[0]["boxes"].double(), boxes.double() * torch.tensor([sx, sy, sx, sy])
    )
    padded = images.tensors.shape[-1], images.tensors.shape[-2]
    assert padded == (math.ceil(new_w / 32) * 32, math.ceil(new_h / 32) * 32)


def test_fit_recovers_planted_shapes() -> None:
    rng = np.random.default_rng(1)
    true_sizes, true_ratios = [20, 40, 80, 160], [0.25, 1.0, 3.0]
    shapes = []
    for s in true_sizes:
        for r in true_ratios:
            n = 200
            size = s * np.exp(rng.normal(0, 0.03, n))
            ratio = r * np.exp(rng.normal(0, 0.03, n))
            shapes.append(np.stack([size / np.sqrt(ratio), size * np.sqrt(ratio)], 1))
    wh = np.concatenate(shapes)
    boxes = np.concatenate([np.zeros_like(wh) + 100, wh + 100], 1)
    sizes, ratios = fit_anchors(boxes, [1, 1, 1, 1], 3)
    assert [len(level) for level in sizes] == [1, 1, 1, 1]
    assert all(isinstance(s, int) for level in sizes for s in level)
    assert np.allclose([level[0] for level in sizes], true_sizes, rtol=0.05)
    assert np.allclose(ratios, true_ratios, rtol=0.05)
    two, _ = fit_anchors(boxes, [2, 2], 3)  # several sizes per level: increasing, distinct
    flat = [s for level in two for s in level]
    assert flat == sorted(set(flat)) and len(flat) == 4


def test_fit_on_identical_objects_gives_distinct_sizes() -> None:
    boxes = np.array([[0.0, 0.0, 30.0, 30.0]] * 10)
    sizes, ratios = fit_anchors(boxes, [1, 1, 1], 2)
    assert [s[0] for s in sizes] == [30, 31, 32]
    assert ratios == [1.0, 1.0]


# --- the stage --------------------------------------------------------------------------------


def write_prepared(d: Path, objects: list[dict], images: list[dict]) -> None:
    d.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(images).to_csv(d / "images.csv", index=False)
    cols = ["image_id", "split", "label", "class", "difficult", "truncated", *BOX_COLUMNS]
    pd.DataFrame(objects, columns=cols).to_csv(d / "objects.csv", index=False)


def obj(image_id: str, split: str, cls: str, xyxy: list[float], angle: float = 0.0) -> dict:
    """An objects.csv row: a rectangle rotated by ``angle`` about its centre."""
    p = polybox.from_xyxy(torch.tensor(xyxy, dtype=torch.float64))
    c = polybox.to_corners(p) - p[:2]
    a = math.radians(angle)
    rot = torch.tensor(
        [[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]], dtype=torch.float64
    )
    q = polybox.from_corners(c @ rot.T + p[:2])
    return {"image_id": image_id, "split": split, "label": 1, "class": cls, "difficult": 0,
            "truncated": 0, **dict(zip(BOX_COLUMNS, q.tolist()))}  # fmt: skip


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    rng = np.random.default_rng(2)
    images, objects = [], []
    for k in range(30):
        image_id = f"img{k:02d}"
        split = "val" if k >= 25 else "train"
        images.append({"image_id": image_id, "path": f"{image_id}.png", "width": 512,
                       "height": 384, "split": split, "num_objects": 4})  # fmt: skip
        for _ in range(4):
            w, h = rng.uniform(40, 200), rng.uniform(40, 200)
            x, y = rng.uniform(0, 512 - w), rng.uniform(0, 384 - h)
            objects.append(obj(image_id, split, rng.choice(["card", "kite"]), [x, y, x + w, y + h],
                               rng.uniform(-30, 30)))  # fmt: skip
    # One object no anchor can reach: 4 x 4 px in a 512 px image (2 x 2 at input scale).
    objects.append(obj("img03", "train", "card", [100.0, 100.0, 104.0, 104.0]))
    write_prepared(tmp_path / "prepared", objects, images)
    return tmp_path


def config(root: Path, *overrides: str):
    return load_config(
        PARAMS,
        [
            f"data.out={root / 'prepared'}",
            f"anchors.out={root / 'anchors'}",
            "model.min_size=256",
            "model.max_size=256",
            *overrides,
        ],  # fmt: skip
    )


def test_stage_writes_its_files(dataset: Path) -> None:
    cfg = config(dataset, "anchors.size_factor=1")
    summary = configure_anchors(cfg)
    out = dataset / "anchors"
    for name in ("anchors.json", "coverage.json", "report.md", "coverage.png"):
        assert (out / name).is_file(), name
    anchors = json.loads((out / "anchors.json").read_text())
    assert set(anchors) == {"sizes", "aspect_ratios"}
    assert len(anchors["sizes"]) == len(cfg.anchors.sizes)
    assert all(isinstance(s, int) for level in anchors["sizes"] for s in level)
    assert len(anchors["aspect_ratios"]) == cfg.anchors.num_ratios
    cov = json.loads((out / "coverage.json").read_text())
    assert cov["num_objects"] == 25 * 4 + 1  # the train split only
    assert cov["strides"] == list(level_strides(cfg.model))
    assert set(cov["sets"]) == {"configured", "fitted"}
    fitted, configured = cov["sets"]["fitted"]["overall"], cov["sets"]["configured"]["overall"]
    assert summary["source"] == "fitted"
    assert fitted["coverage@0.5"] >= configured["coverage@0.5"]
    assert set(cov["sets"]["fitted"]["per_class"]) == {"card", "kite"}
    assert set(cov["sets"]["fitted"]["per_size"]) == {"small", "medium", "large"}
    assert sum(v["count"] for v in cov["sets"]["fitted"]["per_size"].values()) == 101
    # The planted 2 x 2 px object is listed, by image, index in its image and csv line.
    tiny = [u for u in cov["unreachable"] if u["image_id"] == "img03" and u["index"] == 4]
    assert len(tiny) == 1 and tiny[0]["line"] == 30 * 4 + 2 and tiny[0]["best_iou"] < 0.1
    assert summary["num_unreachable"] == len(cov["unreachable"])
    assert "Unreachable ground truths" in (out / "report.md").read_text()
    # The engine reads what the stage wrote.
    from polydet.train.anchors import load_anchors

    assert load_anchors(cfg) == anchors


def test_stage_is_deterministic(dataset: Path) -> None:
    cfg = config(dataset)
    configure_anchors(cfg)
    first = [(dataset / "anchors" / f).read_text() for f in ("anchors.json", "coverage.json")]
    configure_anchors(cfg)
    assert first == [
        (dataset / "anchors" / f).read_text() for f in ("anchors.json", "coverage.json")
    ]


def test_size_factor_scales_the_chosen_fit(dataset: Path) -> None:
    configure_anchors(config(dataset, "anchors.size_factor=1"))
    plain = json.loads((dataset / "anchors" / "anchors.json").read_text())
    summary = configure_anchors(config(dataset, "anchors.size_factor=1.5"))
    scaled = json.loads((dataset / "anchors" / "anchors.json").read_text())
    assert scaled["aspect_ratios"] == plain["aspect_ratios"]
    flat = [s for level in plain["sizes"] for s in level]
    expected, last = [], 0
    for s in flat:  # rounded, kept distinct and increasing
        last = max(round(s * 1.5), last + 1)
        expected.append(last)
    assert [s for level in scaled["sizes"] for s in level] == expected
    assert summary["source"] == "fitted, sizes x 1.5 (anchors.size_factor)"
    assert summary["anchors"] == scaled
    cov = json.loads((dataset / "anchors" / "coverage.json").read_text())
    assert set(cov["sets"]) == {"configured", "fitted", SCALED}
    assert cov["chosen"] == SCALED and cov["sets"]["fitted"]["anchors"] == plain
    # its own coverage: the anchors it reports are the ones it measured
    assert cov["sets"][SCALED]["anchors"] == scaled
    assert SCALED in (dataset / "anchors" / "report.md").read_text()
    # the configured anchors are never scaled
    configure_anchors(config(dataset, "anchors.fit=false", "anchors.size_factor=1.5"))
    configured = json.loads((dataset / "anchors" / "anchors.json").read_text())
    assert configured["sizes"] == [[16], [32], [64], [128]]


def test_auto_size_factor_gives_the_most_objects_a_positive_anchor(dataset: Path) -> None:
    cfg = config(dataset, "anchors.size_factor=auto")
    summary = configure_anchors(cfg)
    cov = json.loads((dataset / "anchors" / "coverage.json").read_text())
    chosen = cov["size_factor"]
    assert chosen in AUTO_FACTORS and "auto" in summary["source"]
    fitted = cov["sets"]["fitted"]["anchors"]
    gt = load_train_objects(cfg.data.out, cfg.model.min_size, cfg.model.max_size)
    strides = level_strides(cfg.model)
    thr = cfg.model.rpn.fg_iou_thresh

    def count(f: float) -> int:
        sizes = scale_sizes(fitted["sizes"], f)
        return int((best_anchor_iou(gt, sizes, fitted["aspect_ratios"], strides) >= thr).sum())

    assert all(count(f) <= count(chosen) for f in AUTO_FACTORS)
    assert summary["anchors"]["sizes"] == scale_sizes(fitted["sizes"], chosen)


def test_size_factor_must_be_positive_or_auto(dataset: Path) -> None:
    for bad in ("0", "big"):
        with pytest.raises(ConfigError, match="size_factor"):
            config(dataset, f"anchors.size_factor={bad}")


def test_fit_false_writes_the_configured_anchors(dataset: Path) -> None:
    cfg = config(dataset, "anchors.fit=false", "anchors.sizes=[[20],[40],[80],[160]]")
    summary = configure_anchors(cfg)
    anchors = json.loads((dataset / "anchors" / "anchors.json").read_text())
    assert anchors == {"sizes": [[20], [40], [80], [160]], "aspect_ratios": [0.5, 1.0, 2.0]}
    assert summary["source"].startswith("configured")
    cov = json.loads((dataset / "anchors" / "coverage.json").read_text())
    assert (
        set(cov["sets"]) == {"configured"} and cov["sets"]["configured"]["overall"]["count"] == 101
    )


def test_bad_inputs_name_the_file_and_line(dataset: Path) -> None:
    prepared = dataset / "prepared"
    objects = pd.read_csv(prepared / "objects.csv", dtype=str)
    objects.loc[7, "dx2"] = "abc"
    objects.to_csv(prepared / "objects.csv", index=False)
    with pytest.raises(DataError, match=r"objects\.csv line 9: column 'dx2'"):
        configure_anchors(config(dataset))
    objects.loc[7, "dx2"] = "1.0"
    objects.loc[3, "image_id"] = "nowhere"
    objects.to_csv(prepared / "objects.csv", index=False)
    with pytest.raises(DataError, match=r"objects\.csv line 5: image_id 'nowhere'"):
        configure_anchors(config(dataset))
    objects["split"] = "val"
    objects.to_csv(prepared / "objects.csv", index=False)
    with pytest.raises(DataError, match="no objects in the train split"):
        configure_anchors(config(dataset))
    (prepared / "objects.csv").unlink()
    with pytest.raises(DataError, match=r"objects\.csv: missing"):
        configure_anchors(config(dataset))


def test_level_count_must_match_the_backbone(dataset: Path) -> None:
    # Refused when params.yaml is loaded, before the stage runs.
    with pytest.raises(ConfigError, match=r"anchors\.sizes: 2 levels, but model\.returned_layers"):
        configure_anchors(config(dataset, "anchors.sizes=[[16],[32]]"))


def test_the_fine_roi_level_has_no_anchors() -> None:
    """model.fine_roi_level adds a stride-4 level that only RoI pooling reads: the anchors
    stage sees the RPN's levels (strides 8, 16, 32, 64 with the default returned layers), as
    the detector's RPN does."""
    from helpers import tiny_cfg

    from polydet.model import build_model

    plain, fine = tiny_cfg("model.fine_roi_level=false"), tiny_cfg("model.fine_roi_level=true")
    assert level_strides(fine) == level_strides(plain)
    net = build_model(fine).eval()
    with torch.no_grad():
        features = net.backbone(torch.zeros(1, 3, 128, 128))
    rpn_strides = tuple(128 // f.shape[-1] for f in net.rpn_features(features))
    assert rpn_strides == level_strides(fine) and len(features) == len(rpn_strides) + 1
