"""Tests of polydet.debug.report: the findings on synthetic histories and inspect-dicts, on a tiny
randomly initialised model with deliberately wrong anchors, and the whole report (plus
``evaluate_model``) on a tiny prepared dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import TINY
from PIL import Image, ImageDraw
from torchvision.ops import box_iou

from polydet.core.config import Config, load_config
from polydet.debug import analysis
from polydet.eval import evaluate as ev
from polydet.eval.tta import views_of
from polydet.geometry.polybox import from_xyxy, hull_xyxy

ROOT = Path(__file__).resolve().parents[1]


def codes(findings: list[analysis.Finding]) -> set[str]:
    return {f.code for f in findings}


# --- loss design -------------------------------------------------------------------------------


def history(n: int = 100, **terms: np.ndarray) -> pd.DataFrame:
    """A history.csv-like table: ``n`` train steps of the given loss terms (and their sum)."""
    df = pd.DataFrame({"step": np.arange(1, n + 1), "epoch": 1, "split": "train", **terms})
    df["loss"] = sum(df[c] for c in terms)
    return df


def test_healthy_losses_raise_nothing_and_shares_sum_to_one() -> None:
    t = np.linspace(0, 1, 100)
    h = history(
        loss_rpn_objectness=0.7 * np.exp(-3 * t) + 0.05,
        loss_rpn_polybox=0.3 * np.exp(-2 * t) + 0.05,
        loss_classifier=0.9 * np.exp(-2 * t) + 0.1,
        loss_polybox=0.6 * np.exp(-1 * t) + 0.1,
    )
    stats, findings = analysis.analyze_losses(h, None)
    assert findings == []
    shares = [s["late_share"] for k, s in stats["terms"].items() if k != "loss"]
    assert sum(shares) == pytest.approx(1.0)
    assert stats["terms"]["loss"]["late"] < stats["terms"]["loss"]["early"]


def test_dominating_rising_and_stalled_losses_are_flagged() -> None:
    t = np.linspace(0, 1, 100)
    rising = 0.1 + 0.5 * t**2  # minimum at the start, 6x higher at the end
    h = history(loss_rpn_objectness=np.full(100, 0.05), loss_polybox=rising)
    _, findings = analysis.analyze_losses(h, None)
    assert "loss_rising" in codes(findings)
    rising_terms = {f.evidence["term"] for f in findings if f.code == "loss_rising"}
    assert rising_terms == {"loss_polybox", "loss"}

    h = history(loss_rpn_objectness=np.full(100, 0.05), loss_classifier=np.full(100, 2.0))
    _, findings = analysis.analyze_losses(h, None)
    dominant = [f for f in findings if f.code == "loss_dominant"]
    assert dominant and dominant[0].evidence["term"] == "loss_classifier"
    assert dominant[0].evidence["share"] == pytest.approx(2.0 / 2.05)
    assert "loss_stalled" in codes(findings)  # flat total


def test_rising_quad_stage_terms_are_a_note_not_a_divergence() -> None:
    """The quad stage's terms grow with its positives (first-stage quads near an object): a
    rise there is reported as that (info), while the same rise in a first-stage term, or in
    loss_heading of a model without the quad stage, stays a warning."""
    t = np.linspace(0, 1, 100)
    falling = 1.0 * np.exp(-3 * t) + 0.1
    rising = 0.1 + 0.5 * t**2
    h = history(
        loss_classifier=falling + 2.0, loss_quad_polybox=rising, loss_heading=rising / 2,
        loss_quad_classifier=np.full(100, 0.05),
    )  # fmt: skip
    _, findings = analysis.analyze_losses(h, None)
    notes = {f.evidence["term"]: f.severity for f in findings if f.code == "cascade_loss_rising"}
    assert notes == {"loss_quad_polybox": "info", "loss_heading": "info"}
    assert not [f for f in findings if f.code == "loss_rising"]
    # without the quad stage (its terms all 0), a rising heading loss is a warning
    h = history(
        loss_classifier=falling, loss_heading=rising, loss_quad_polybox=np.zeros(100),
        loss_quad_classifier=np.zeros(100),
    )  # fmt: skip
    _, findings = analysis.analyze_losses(h, None)
    warned = {f.evidence["term"] for f in findings if f.code == "loss_rising"}
    assert "loss_heading" in warned and "cascade_loss_rising" not in codes(findings)


def test_nonfinite_loss_from_history_and_from_nonfinite_json() -> None:
    x = np.linspace(1, 0.5, 100)
    x[39] = np.nan  # step 40
    h = history(loss_rpn_objectness=np.full(100, 0.1), loss_polybox=x)
    _, findings = analysis.analyze_losses(h, None)
    nf = [f for f in findings if f.code == "nonfinite_loss"]
    assert nf and nf[0].evidence == {"step": 40, "terms": ["loss_polybox"]}

    record = {"step": 12, "nonfinite_terms": ["loss_rpn_polybox"], "image_ids": ["P7", "P9"]}
    stats, findings = analysis.analyze_losses(None, record)
    nf = [f for f in findings if f.code == "nonfinite_loss"]
    assert nf and "step 12" in nf[0].message and "loss_rpn_polybox" in nf[0].message
    assert "P7, P9" in nf[0].message
    assert "no_history" in codes(findings)


def test_history_with_missing_columns_and_validation_rows(tmp_path: Path) -> None:
    path = tmp_path / "history.csv"
    rows = ["step,loss"] + [f"{i},{1.0 / i:.4f}" for i in range(1, 31)]
    path.write_text("\n".join(rows) + "\n")
    h = analysis.read_history(path)
    assert h is not None and set(h["split"]) == {"train"}
    stats, findings = analysis.analyze_losses(h, None)
    assert stats["terms"]["loss"]["late"] < stats["terms"]["loss"]["early"]
    assert findings == []
    # Validation loss climbing while training falls: overfitting.
    val = pd.DataFrame({"step": [10, 20, 30, 40], "split": "val", "loss": [0.5, 0.4, 0.6, 0.9]})
    h = pd.concat([h, val], ignore_index=True)
    _, findings = analysis.analyze_losses(h, None)
    assert "overfitting" in codes(findings)
    assert analysis.read_history(tmp_path / "absent.csv") is None


# --- encoding ----------------------------------------------------------------------------------


def inspect_encoding(rpn_t: torch.Tensor, rpn_d: torch.Tensor) -> dict:
    roi = torch.randn(64, 10, generator=torch.Generator().manual_seed(1))
    return {
        "encoded_rpn_targets": [rpn_t[:50], rpn_t[50:]],
        "rpn_deltas": [rpn_d],
        "encoded_roi_targets": [roi],
        "roi_deltas": [0.5 * roi],
    }


def test_encoding_statistics_and_unit_mistakes() -> None:
    g = torch.Generator().manual_seed(0)
    good = 0.3 * torch.randn(200, 10, generator=g)
    stats, findings = analysis.analyze_encoding(inspect_encoding(good, 0.1 * good))
    assert findings == []
    assert stats["encoded_rpn_targets"]["count"] == 200
    assert np.allclose(stats["encoded_rpn_targets"]["mean"], good.double().mean(0), atol=1e-9)
    assert np.allclose(stats["encoded_rpn_targets"]["std"], good.double().std(0, unbiased=False))

    # Offsets left in pixels (not divided by the anchor size): large mean and scale.
    pixels = 40.0 * good + 25.0
    _, findings = analysis.analyze_encoding(inspect_encoding(pixels, good))
    assert {"target_mean", "target_scale"} <= codes(findings)
    scale = next(f for f in findings if f.code == "target_scale")
    assert scale.evidence["too_large"] == list(analysis.TERMS)
    mean = next(f for f in findings if f.code == "target_mean")
    # Says what it measured (the means, over how many) and what to try; centre off: a warning.
    assert mean.severity == "warning" and "over 200 positive samples" in mean.message
    assert f"xc {float(pixels[:, 0].mean()):+.2f}" in mean.message and "Try:" in mean.message

    # Corner terms alone off zero (the encoding of rotated objects), centre centred: a note.
    corners = good.clone()
    corners[:, 2:] += 1.5
    _, findings = analysis.analyze_encoding(inspect_encoding(corners, corners))
    mean = next(f for f in findings if f.code == "target_mean")
    assert mean.severity == "info" and mean.evidence["terms"] == list(analysis.TERMS[2:])
    assert "not from a bug" in mean.message

    # Divided by the image size instead: far too small.
    _, findings = analysis.analyze_encoding(inspect_encoding(good / 1000, good / 1000))
    scale = next(f for f in findings if f.code == "target_scale")
    assert scale.evidence["too_small"] == list(analysis.TERMS)

    # Predictions exploding, and a NaN.
    wild = 100 * torch.randn(200, 10, generator=g)
    wild[3, 4] = float("nan")
    _, findings = analysis.analyze_encoding(inspect_encoding(good, wild))
    assert {"delta_scale", "nonfinite_encoding"} <= codes(findings)


# --- matching ---------------------------------------------------------------------------------


def grid_anchors(size: float, stride: float, extent: int) -> torch.Tensor:
    """Square anchors ``[A, 4]`` of one size centred on a grid."""
    c = torch.arange(stride / 2, extent, stride)
    cy, cx = torch.meshgrid(c, c, indexing="ij")
    cx, cy = cx.flatten(), cy.flatten()
    return torch.stack([cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2], 1)


def synthetic_inspect(
    anchors: torch.Tensor,
    gt: torch.Tensor,
    proposals: torch.Tensor,
    scores: torch.Tensor,
    fg: float = 0.7,
    bg: float = 0.3,
) -> dict:
    """An inspect-dict for one 256x256 image, matched as torchvision's Matcher does (the
    best anchors of each ground truth positive, ties included, when their IoU is > 0)."""
    q = box_iou(hull_xyxy(gt), anchors)  # [G, A]
    best, matched = q.max(dim=0)
    labels = torch.where(best >= fg, 1.0, torch.where(best < bg, 0.0, -1.0))
    top = q.max(dim=1).values
    is_best = (q == top[:, None]) & (top[:, None] > 0)
    labels[is_best.any(0)] = 1.0
    matched[is_best.any(0)] = is_best.float().argmax(0)[is_best.any(0)]
    return {
        "anchors": [anchors],
        "anchor_ious": [best],
        "anchor_labels": [labels],
        "matched_gt": [matched],
        "proposals": [hull_xyxy(proposals)],
        "proposal_polyboxes": [proposals],
        "proposal_scores": [scores],
        "image_sizes": [{"height": 256, "width": 256, "scale_x": 1.0, "scale_y": 1.0}],
    }


GT_BOXES = torch.tensor([[20.0, 30, 50, 60], [100, 100, 160, 130], [180, 40, 200, 100]])


def match_gt_boxes(
    anchors: torch.Tensor, proposals: torch.Tensor, scores: torch.Tensor
) -> tuple[dict, list[analysis.Finding]]:
    """``analyze_matching`` of :data:`GT_BOXES` (classes car, ship, car) in one image."""
    gt = from_xyxy(GT_BOXES)
    return analysis.analyze_matching(
        synthetic_inspect(anchors, gt, proposals, scores),
        [{"polyboxes": gt, "labels": torch.tensor([1, 2, 1])}],
        0.7,
        0.3,
        top_n=100,
        image_ids=["img"],
        classes=["car", "ship"],
    )


def test_matching_with_fitting_anchors_has_no_matching_finding() -> None:
    gt = from_xyxy(GT_BOXES)
    anchors = torch.cat([grid_anchors(s, 4, 256) for s in (24, 32, 48)])
    props = torch.cat([gt, from_xyxy(torch.tensor([[0.0, 0, 10, 10]]))])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.1])
    stats, findings = match_gt_boxes(anchors, props, scores)
    assert not codes(findings) & {"gt_unreachable", "gt_without_positive", "too_many_positives"}
    assert stats["rpn_recall"]["poly@0.7"] == 1.0
    assert stats["positives_per_gt"]["min"] >= 2
    # Every anchor is a positive, a negative or ignored.
    r = stats["per_image"][0]
    assert r["positives"] + r["negatives"] + r["ignored"] == r["anchors"]
    best = box_iou(GT_BOXES, anchors).max(dim=1).values
    got = [row["best_anchor_iou"] for row in stats["ground_truth_table"]]
    assert got == pytest.approx(best.tolist(), abs=1e-4)


def test_anchors_far_too_large_raise_the_matching_findings() -> None:
    anchors = grid_anchors(512, 16, 256)
    scores = torch.full((4,), 0.001)  # and the objectness collapsed to 0
    stats, findings = match_gt_boxes(
        anchors, from_xyxy(torch.tensor([[0.0, 0, 256, 256]] * 4)), scores
    )
    c = codes(findings)
    assert {"gt_unreachable", "objectness_collapse_low", "low_rpn_recall"} <= c
    unreachable = next(f for f in findings if f.code == "gt_unreachable")
    assert unreachable.evidence["count"] == 3
    listed = unreachable.evidence["ground_truths"][1]
    assert (listed["class"], listed["width"], listed["height"]) == ("ship", 60.0, 30.0)
    assert listed["aspect"] == pytest.approx(0.5)
    # All 512 px anchors contain each object with the same IoU: the low-quality rule makes
    # every one of them positive.
    assert "too_many_positives" in c
    assert stats["rpn_recall"]["poly@0.5"] == 0.0


# --- with a real (tiny, untrained) model -------------------------------------------------------


def tiny_overrides(tmp: Path, anchor_sizes: str = "[[16], [32], [64], [128]]") -> list[str]:
    """``--set`` overrides of params.yaml for a 128 px model and a project under ``tmp``."""
    return [
        *TINY,
        f"anchors.sizes={anchor_sizes}",
        f"data.root={tmp / 'raw'}",
        f"data.out={tmp / 'prepared'}",
        f"train.out={tmp / 'train'}",
        f"evaluate.out={tmp / 'eval'}",
        f"debug.out={tmp / 'debug'}",
        "data.split={train: 1.0, val: 0.0, test: 0.0, seed: 0}",
        "evaluate.split=train",
        "debug.split=train",
        "debug.num_images=3",
        "debug.top_n_proposals=20",
    ]


def tiny_config(tmp: Path, anchor_sizes: str = "[[16], [32], [64], [128]]") -> Config:
    return load_config(ROOT / "params.yaml", tiny_overrides(tmp, anchor_sizes))


def tiny_images() -> tuple[list[torch.Tensor], list[dict]]:
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 128, 128, generator=g) for _ in range(2)]
    boxes = [
        torch.tensor([[10.0, 10, 40, 30], [60, 60, 100, 110]]),
        torch.tensor([[30.0, 70, 70, 90]]),
    ]
    targets = [
        {"polyboxes": from_xyxy(b), "labels": torch.ones(len(b), dtype=torch.int64)} for b in boxes
    ]
    return images, targets


@pytest.mark.parametrize(
    ("sizes", "broken"),
    [("[[16], [32], [64], [128]]", False), ("[[1024], [1024], [2048], [2048]]", True)],
)
def test_model_with_anchors_far_too_large_is_diagnosed(
    tmp_path: Path, sizes: str, broken: bool
) -> None:
    from polydet.model import build_model

    torch.manual_seed(0)
    cfg = tiny_config(tmp_path, sizes)
    net = build_model(cfg.model).eval()
    images, targets = tiny_images()
    result = net.inspect(images, targets)
    rpn = cfg.model.rpn
    _, findings = analysis.analyze_matching(
        result, targets, rpn.fg_iou_thresh, rpn.bg_iou_thresh, 20
    )
    assert ("gt_unreachable" in codes(findings)) == broken
    _, enc = analysis.analyze_encoding(result)
    if broken:
        # The linear coder divides by the anchor size: against 1024 px anchors every 30 px
        # object encodes to nearly the same corner targets (about +-W/2), so no spread.
        scale = next(f for f in enc if f.code == "target_scale")
        assert {"dx1", "dy1"} <= set(scale.evidence["too_small"])
    else:
        assert not codes(enc) & {"target_mean", "target_scale"}


# --- the whole report on a tiny prepared dataset -----------------------------------------------


def write_raw_dota(root: Path, classes: list[str], n: int = 4) -> None:
    """``n`` 128x128 images with 1-3 filled quads each, and their DOTA labelTxt files."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "labelTxt").mkdir()
    for i in range(n):
        im = Image.fromarray(rng.integers(0, 60, (128, 128, 3), dtype=np.uint8))
        draw = ImageDraw.Draw(im)
        lines = []
        for _ in range(int(rng.integers(1, 4))):
            x, y = rng.uniform(10, 80, 2)
            w, h = rng.uniform(15, 40, 2)
            pts = [(x, y), (x + w, y + 0.2 * h), (x + w, y + h), (x - 0.1 * w, y + 0.9 * h)]
            c = int(rng.integers(len(classes)))
            draw.polygon(pts, fill=(200, 60 + 60 * c, 40))
            xy = " ".join(f"{v:.1f}" for p in pts for v in p)
            lines.append(f"{xy} {classes[c]} 0")
        im.save(root / "images" / f"img{i}.png")
        (root / "labelTxt" / f"img{i}.txt").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def tiny_project(tmp_path_factory: pytest.TempPathFactory) -> Config:
    """A prepared 4-image dataset, an untrained tiny model and a short history."""
    from polydet.data.prepare import prepare
    from polydet.model import build_model, save_model

    tmp = tmp_path_factory.mktemp("project")
    cfg = tiny_config(tmp)
    write_raw_dota(tmp / "raw", list(cfg.data.classes))
    prepare(cfg)
    torch.manual_seed(0)
    save_model(
        build_model(cfg.model), tmp / "train" / "model.pt", cfg.model, cfg.data.classes, None
    )
    steps = np.arange(1, 41)
    h = pd.DataFrame(
        {
            "step": steps,
            "epoch": 1,
            "split": "train",
            "lr": 0.01,
            "loss_rpn_objectness": 0.7 / np.sqrt(steps),
            "loss_rpn_polybox": 0.2 / np.sqrt(steps),
            "loss_classifier": 1.0 / np.sqrt(steps),
            "loss_polybox": 0.5 / np.sqrt(steps),
        }
    )
    h["loss"] = h.filter(like="loss_").sum(axis=1)
    h.to_csv(tmp / "train" / "history.csv", index=False)
    return cfg


def test_debug_report_writes_a_self_contained_report(
    tiny_project: Config, capsys: pytest.CaptureFixture
) -> None:
    from polydet.cli import main

    cfg = tiny_project
    tmp = Path(cfg.data.root).parent
    sets = [a for o in tiny_overrides(tmp) for a in ("--set", o)]
    assert main(["debug", "--params", str(ROOT / "params.yaml"), *sets]) == 0
    summary = json.loads(capsys.readouterr().out)
    out = Path(cfg.debug.out)
    for name in ("losses.png", "matching.png", "encoding.png"):
        with Image.open(out / name) as im:  # a whole, decodable PNG
            im.load()
            assert im.format == "PNG" and min(im.size) > 100, name
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and 'src="losses.png"' not in html
    md = (out / "report.md").read_text()
    assert "![losses](losses.png)" in md and "## Findings" in md
    data = json.loads((out / "debug.json").read_text())
    assert data["images"] == summary["images"] == 3
    assert len(data["matching"]["per_image"]) == 3
    assert summary["num_errors"] == sum(f["severity"] == "error" for f in data["findings"])
    assert len(list((out / "examples").glob("*.png"))) == 3
    assert set(data["inspect_losses"]) >= {"loss_rpn_objectness", "loss_classifier"}


def test_evaluate_model_matches_its_task1_files(
    tiny_project: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Lives here for the shared fixture: evaluate_model on the same tiny project, whose
    # model also emits one NaN detection per image (as a diverged model would).
    real = ev.load_checked_model

    def diverged(cfg: Config, path: Path) -> torch.nn.Module:
        net = real(cfg, path)
        predict = net.predict

        def with_nan(images: list[torch.Tensor]) -> list[dict]:
            out = predict(images)
            fill = {"scores": 1.0, "labels": 1, "first_corner": -1}  # else NaN
            for o in out:  # one more row in every per-detection output
                for k, v in o.items():
                    extra = v.new_full((1, *v.shape[1:]), fill.get(k, float("nan")))
                    o[k] = torch.cat([v, extra])
            return out

        net.predict = with_nan
        return net

    monkeypatch.setattr(ev, "load_checked_model", diverged)
    cfg = tiny_project
    result = ev.evaluate_model(cfg)
    # Dropped: one per image and test-time view (the NaN rows of two views never fuse).
    views = len(views_of(cfg.evaluate.tta)) if cfg.evaluate.tta.enabled else 1
    assert result["tta_views"] == views
    assert result["num_nonfinite_detections"] == 4 * views
    out = Path(cfg.evaluate.out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["map50"] == result["map50"]
    assert sorted(p.name for p in (out / "detections").iterdir()) == [
        f"Task1_{c}.txt" for c in sorted(cfg.data.classes)
    ]
    # Any detector's files are evaluated the same way: the raw labelTxt files as ground truth.
    again = ev.evaluate_dota_dirs(
        out / "detections", Path(cfg.data.root) / "labelTxt", cfg.data.classes
    )
    assert metrics["num_detections"] > 0
    del metrics["num_nonfinite_detections"], metrics["tta_views"]  # of the model, not the files
    assert again == pytest.approx(metrics, abs=1e-9)  # every metric, None included
