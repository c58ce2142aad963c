"""``polydet export``: ONNX Runtime and TorchScript give the eager model's detections and
mAP50 on synthetic images, for a briefly trained and an untrained tiny model, at several
input sizes and batch sizes; the CLI writes the files; ``predict --runtime onnx`` runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import one_thread, tiny_cfg  # noqa: F401  (a fixture, used below)

from polydet.cli import main
from polydet.core.config import load_config
from polydet.data.dataset import load_image
from polydet.data.formats import read_dota, write_task1
from polydet.deploy.export import OnnxDetector, compare_detections, export_model
from polydet.deploy.onnx_runtime import OUTPUTS
from polydet.eval.evaluate import evaluate_dota_dirs
from polydet.geometry import heading
from polydet.geometry.polybox import from_corners, to_corners
from polydet.model import build_model, save_model

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["card", "plate", "kite"]
SIZE = ("data.classes=[card, plate, kite]",)


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six synthetic 160 x 128 images with DOTA labels (the default generator)."""
    from polydet.data.synth import generate

    cfg = load_config(ROOT / "params.yaml", ["synth.num_images=6", "synth.image_width=160",
                                              "synth.image_height=128"]).synth  # fmt: skip
    return generate(cfg, tmp_path_factory.mktemp("synth"))


def load_split(root: Path) -> tuple[list[str], list[torch.Tensor], list[dict]]:
    ids, images, targets = [], [], []
    for path in sorted((root / "images").glob("*.png")):
        ids.append(path.stem)
        images.append(load_image(path))
        objects = read_dota(root / "labelTxt" / f"{path.stem}.txt").objects
        corners = torch.tensor(np.array([o.corners() for o in objects]), dtype=torch.float32)
        listed = corners.view(-1, 4, 2)
        polyboxes = from_corners(listed)
        targets.append({
            "polyboxes": polyboxes,
            "labels": torch.tensor([CLASSES.index(o.cls) + 1 for o in objects], dtype=torch.int64),
            # The heading: the canonical corner the label lists first (its head).
            "first_corner": heading.nearest_corner(to_corners(polyboxes), listed[:, 0]),
        })  # fmt: skip
    return ids, images, targets


@pytest.fixture(scope="module")
def models(synth: Path) -> dict[str, torch.nn.Module]:
    """An untrained tiny model (near-uniform scores: every candidate reaches NMS) and one
    trained for a few steps on two of the images (confident on a few candidates). Both have
    the heading head (random, or trained on the labels' first corners); the trained one also
    has the localisation-quality branch, ranking by it (``quality_power``)."""
    _, images, targets = load_split(synth)
    torch.manual_seed(0)
    untrained = build_model(tiny_cfg(*SIZE, "model.roi.score_thresh=0.0")).eval()
    torch.manual_seed(0)
    quality = ("model.roi.quality_loss_weight=1.0", "model.roi.quality_power=0.5")
    model = build_model(tiny_cfg(*SIZE, *quality))
    assert model.roi_heads.quality is not None
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(20):
        losses = model.loss(images[:2], targets[:2])
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    return {"untrained": untrained, "trained": model.eval()}


def map50(ids: list[str], preds: list[dict], labels: Path, out: Path) -> float:
    write_task1(out, dict(zip(ids, preds)), CLASSES)
    return float(evaluate_dota_dirs(out, labels, CLASSES)["map50"])


def from_json(doc: dict) -> list[dict[str, torch.Tensor]]:
    """Per image detections of a ``detections.json`` (first_corner -1 where none is listed)."""
    return [
        {
            "polyboxes": torch.tensor([d["polybox"] for d in im["detections"]]).view(-1, 10),
            "scores": torch.tensor([d["score"] for d in im["detections"]]),
            "labels": torch.tensor([d["label"] for d in im["detections"]], dtype=torch.int64),
            "first_corner": torch.tensor(
                [d.get("first_corner", -1) for d in im["detections"]], dtype=torch.int64
            ),
        }
        for im in doc["images"]
    ]


def read_task1_corners(directory: Path) -> list[list[list[float]]]:
    """The corners of every line of the ``Task1_*.txt`` files in ``directory``, as listed."""
    out = []
    for path in directory.glob("Task1_*.txt"):
        for line in path.read_text().splitlines():
            v = [float(x) for x in line.split()[2:10]]
            out.append([v[i : i + 2] for i in range(0, 8, 2)])
    return out


def export_before_heading(src: Path, dst: Path) -> OnnxDetector:
    """A copy of the ONNX export ``src`` with the graph outputs of exports written before the
    heading (issue 15): polyboxes, scores and labels. (The heading's nodes stay, unused:
    ``onnx.utils.extract_model`` cannot prune a graph whose Loop/If bodies use outer values.)"""
    import shutil

    import onnx

    shutil.copytree(src, dst)
    graph = onnx.load(str(src / "model.onnx"))
    del graph.graph.output[len(OUTPUTS[:3]) :]
    onnx.checker.check_model(graph)
    onnx.save(graph, str(dst / "model.onnx"))
    return OnnxDetector(dst)


@pytest.mark.parametrize("name", ["trained", "untrained"])
def test_onnx_and_torchscript_match_eager(name: str, models: dict, synth: Path, tmp_path: Path):
    model = models[name]
    ids, images, _ = load_split(synth)
    check = images[:2]
    info = export_model(model, tmp_path / "onnx", "onnx", CLASSES, check_images=check)
    assert info["parity"]["ok"] and info["parity"]["checked"] > 0
    assert json.loads((tmp_path / "onnx" / "classes.json").read_text()) == CLASSES
    onnx = OnnxDetector(tmp_path / "onnx")
    assert onnx.cfg == model.cfg and onnx.classes == CLASSES

    eager = [{k: v.cpu() for k, v in model.predict([im])[0].items()} for im in images]
    # One batch of all six (same size) and each image alone, plus a resized copy of the
    # first one (another input size: the resize runs inside the graph).
    batched = onnx.predict(images)
    single = [onnx.predict([im])[0] for im in images]
    for other in (batched, single):
        report = compare_detections(eager, other)
        assert report["ok"], report
        assert report["checked"] >= (100 if name == "untrained" else 1)
        # The heading: matched detections have the eager first corner (ok needs that).
        assert report["first_corner_mismatch"] == 0
    # ... and the eager first corners are not one constant answer (the check could not fail).
    eager_first = torch.cat([d["first_corner"] for d in eager])
    assert len(eager_first) > 0 and len(set(eager_first.tolist())) >= 2, eager_first
    # A second input size: the resize runs in the graph, the first corner is mapped through it.
    big = torch.nn.functional.interpolate(images[0][None], size=(300, 370), mode="bilinear")[0]
    report = compare_detections(model.predict([big]), onnx.predict([big]))
    assert report["ok"] and report["first_corner_mismatch"] == 0, report
    # Raw outputs: the detection cap, padding rows all zero, int64 labels.
    poly, scores, labels, first, head = onnx.run(torch.stack(images[:2]).numpy())
    cap = model.cfg.roi.detections_per_img
    assert poly.shape == (2, cap, 10) and scores.shape == (2, cap) and labels.dtype == np.int64
    pad = scores == 0
    assert (poly[pad] == 0).all() and (labels[pad] == 0).all() and (labels[~pad] >= 1).all()
    assert (np.diff(scores, axis=1) <= 0).all()  # best first
    # first_corner int64 in 0..3 (-1 on padding), heading the degrees of heading_degrees.
    assert first.shape == (2, cap) and first.dtype == np.int64 and head.dtype == np.float32
    assert (first[pad] == -1).all() and np.isnan(head[pad]).all()
    assert ((first[~pad] >= 0) & (first[~pad] <= 3)).all()
    expected = heading.heading_degrees(torch.from_numpy(poly), torch.from_numpy(first))
    error = heading.angle_error(torch.from_numpy(head[~pad]), expected[torch.from_numpy(~pad)])
    assert float(error.max()) < 1e-3

    # An export written before the heading (outputs polyboxes, scores, labels only) still
    # runs: the same detections, heading unknown (first_corner -1, heading NaN).
    old = export_before_heading(tmp_path / "onnx", tmp_path / "old")
    assert old.outputs == OUTPUTS[:3]
    for image in images[:2]:
        before, now = old.predict([image])[0], onnx.predict([image])[0]
        assert torch.equal(before["polyboxes"], now["polyboxes"])
        assert torch.equal(before["labels"], now["labels"])
        assert (before["first_corner"] == -1).all() and before["heading"].isnan().all()
    # The same mAP50 (DOTA Task1 files of each, the kit's metric).
    labels_dir = synth / "labelTxt"
    m_eager = map50(ids, eager, labels_dir, tmp_path / "eager")
    m_onnx = map50(ids, batched, labels_dir, tmp_path / "ort")
    assert abs(m_eager - m_onnx) <= 1e-3, (m_eager, m_onnx)

    # TorchScript: the same trace, the same numbers.
    export_model(model, tmp_path / "ts", "torchscript", CLASSES, check_images=check)
    ts = torch.jit.load(str(tmp_path / "ts" / "model.ts"))
    with torch.no_grad():
        poly_ts, scores_ts, labels_ts, first_ts, head_ts = ts(torch.stack(images[:2]))
    assert torch.equal(labels_ts, torch.from_numpy(labels))
    assert torch.equal(first_ts, torch.from_numpy(first))
    torch.testing.assert_close(head_ts, torch.from_numpy(head), atol=1e-3, rtol=0, equal_nan=True)
    torch.testing.assert_close(scores_ts, torch.from_numpy(scores), atol=1e-4, rtol=0)
    torch.testing.assert_close(poly_ts, torch.from_numpy(poly), atol=1e-2, rtol=0)


def test_cli_export_and_predict_on_onnx_runtime(models: dict, synth: Path, tmp_path: Path):
    cfg = models["trained"].cfg  # with the quality branch
    model_file = save_model(models["trained"], tmp_path / "model.pt", cfg, CLASSES, None)
    out = tmp_path / "outputs" / "export"  # where the README's snippet looks
    params = ["--params", str(ROOT / "params.yaml")]
    assert main(["export", "--model", str(model_file), "--format", "onnx", "--out", str(out),
                 *params]) == 0  # fmt: skip
    assert {p.name for p in out.iterdir()} == {"model.onnx", "classes.json", "config.json",
                                              "export.json"}  # fmt: skip
    config = json.loads((out / "config.json").read_text())
    assert config["classes"] == CLASSES and config["model"]["num_classes"] == 4
    # The model alone on both runtimes (ONNX Runtime cannot run the default TTA's 45° view).
    alone = ("data.classes=[card, plate, kite]", "evaluate.tta.enabled=false")
    sets = [x for item in alone for x in ("--set", item)]
    for runtime, model in (("torch", str(model_file)), ("onnx", str(out))):
        assert main(["predict", str(synth / "images"), "--model", model, "--runtime", runtime,
                     "--out", str(tmp_path / runtime), "--score-thresh", "0.05",
                     *params, *sets]) == 0  # fmt: skip
    docs = {
        r: json.loads((tmp_path / r / "detections.json").read_text()) for r in ("torch", "onnx")
    }
    assert docs["onnx"]["summary"]["runtime"] == "onnx"
    for a, b in zip(docs["torch"]["images"], docs["onnx"]["images"]):
        assert abs(len(a["detections"]) - len(b["detections"])) <= 1
    # The heading: the same first corners on both runtimes, and the ONNX run's corners (JSON
    # and Task1) listed from its predicted first corner, as the eager run's are.
    report = compare_detections(*(from_json(docs[r]) for r in ("torch", "onnx")))
    assert report["ok"] and report["checked"] > 0 and report["first_corner_mismatch"] == 0
    found = [d for im in docs["onnx"]["images"] for d in im["detections"]]
    assert found and all("heading" in d for d in found)
    for d in found:
        ring = to_corners(torch.tensor(d["polybox"], dtype=torch.float64))
        np.testing.assert_allclose(d["corners"], ring.roll(-d["first_corner"], 0), atol=2e-3)
    task1 = np.array(read_task1_corners(tmp_path / "onnx")).reshape(-1, 1, 8)
    listed = np.array([d["corners"] for d in found]).reshape(1, -1, 8)
    assert task1.shape[0] == listed.shape[1]
    assert (np.abs(task1 - listed).max(-1).min(0) < 6e-3).all()  # each in the same order
    # An export written before the heading runs too: the canonical order, no heading fields.
    export_before_heading(out, tmp_path / "old")
    assert main(["predict", str(synth / "images"), "--model", str(tmp_path / "old"),
                 "--runtime", "onnx", "--out", str(tmp_path / "ran-old"), "--score-thresh",
                 "0.05", *params, *sets]) == 0  # fmt: skip
    old_doc = json.loads((tmp_path / "ran-old" / "detections.json").read_text())
    old_found = [d for im in old_doc["images"] for d in im["detections"]]
    assert len(old_found) == len(found)
    for d in old_found:
        assert "heading" not in d and "first_corner" not in d
        ring = to_corners(torch.tensor(d["polybox"], dtype=torch.float64))
        np.testing.assert_allclose(d["corners"], ring, atol=2e-3)
    # A missing model directory is named in the error.
    assert main(["predict", str(synth / "images"), "--model", str(tmp_path / "nope"),
                 "--runtime", "onnx", "--out", str(tmp_path / "x"), *params]) == 2  # fmt: skip

    # The README's plain-Python snippet runs as written, importing neither torch nor polydet.
    readme = (ROOT / "README.md").read_text()
    start = readme.index("```python", readme.index("Run the ONNX model from plain Python"))
    snippet = readme[start + len("```python") : readme.index("```", start + 3)]
    guard = "\nimport sys\nassert not {'torch', 'polydet'} & set(sys.modules), sys.modules.keys()\n"
    done = subprocess.run([sys.executable, "-c", snippet + guard], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
