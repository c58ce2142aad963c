"""MLflow tracking: promotion gate, registry aliases, rollback, lineage, model URIs, failing fast.

Each test gets its own SQLite store under ``tmp_path`` (the working directory) and a tiny
untrained model, so nothing here trains.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from polydet import cli, tracking
from polydet.core.config import Config, load_config
from polydet.core.errors import ModelError, TrackingError
from polydet.core.store import REACH_TIMEOUT_S
from polydet.pipeline.flow import SMOKE_OVERRIDES

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlflow_db: Path) -> Path:
    """A fresh project directory whose default SQLite store is ``mlruns/mlflow.db``."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "mlruns").mkdir()
    shutil.copy(mlflow_db, tmp_path / "mlruns" / "mlflow.db")
    return tmp_path


def _cfg(*overrides: str) -> Config:
    return load_config(ROOT / "params.yaml", [*SMOKE_OVERRIDES, *overrides])


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained tiny polydet model file (its predictions are noise, which is enough)."""
    from polydet.model import build_model, save_model

    cfg = _cfg()
    path = tmp_path_factory.mktemp("model") / "model.pt"
    save_model(build_model(cfg.model), path, cfg.model, cfg.data.classes, None)
    return path


def _aliases(name: str = "polydet") -> dict[str, str]:
    client = mlflow.MlflowClient()
    return {a: str(v) for a, v in client.get_registered_model(name).aliases.items()}


def _tags(version: str, name: str = "polydet") -> dict[str, str]:
    return mlflow.MlflowClient().get_model_version(name, version).tags


# --- the gate, as a pure function ----------------------------------------------------------


@pytest.mark.parametrize(
    ("new", "champion", "margin", "expected"),
    [
        (0.10, None, 0.0, True),  # no champion: the first model always wins
        (0.51, 0.50, 0.0, True),
        (0.50, 0.50, 0.0, False),  # a tie keeps the champion
        (0.55, 0.50, 0.10, False),  # better, but not by the margin
        (0.61, 0.50, 0.10, True),
        (0.40, 0.50, 0.0, False),
    ],
)
def test_decide_promotion(new: float, champion: float | None, margin: float, expected: bool):
    promoted, reason = tracking.decide_promotion(new, champion, margin)
    assert promoted is expected
    assert f"{new:.4f}" in reason


# --- the registry --------------------------------------------------------------------------


def test_register_promote_rollback(
    store: Path, model_file: Path, capsys: pytest.CaptureFixture[str]
):
    cfg = _cfg()
    r1 = tracking.register_model(cfg, model_file, {"map50": 0.30})
    assert (r1["version"], r1["new"], r1["champion"]) == ("1", True, "1")
    assert _aliases() == {"champion": "1", "challenger": "1"}

    r2 = tracking.register_model(cfg, model_file, {"map50": 0.50})  # better: promoted
    assert r2["promotion"]["promoted"] and r2["promotion"]["previous_champion"] == "1"
    assert _aliases() == {"champion": "2", "challenger": "2"}
    old = _tags("1")
    assert old["polydet.replaced_by"] == "2" and "beats" in old["polydet.replaced_reason"]
    assert old["polydet.replaced_at"].startswith("20")

    r3 = tracking.register_model(cfg, model_file, {"map50": 0.40})  # worse: challenger only
    assert not r3["promotion"]["promoted"]
    assert _aliases() == {"champion": "2", "challenger": "3"}
    assert "does not beat" in _tags("3")["polydet.gate"]

    # The same weights saved again (as a retrain that converged to them would): reused.
    from polydet.model import load_model, save_model

    resaved = save_model(
        load_model(model_file), "retrained/model.pt", cfg.model, cfg.data.classes, None
    )
    again = tracking.register_model(cfg, resaved, {"map50": 0.40})
    assert (again["version"], again["new"]) == ("3", False)
    assert len(mlflow.MlflowClient().search_model_versions("name = 'polydet'")) == 3

    # By hand, through the command line (`polydet promote 3`, `polydet rollback`).
    params = ["--params", str(ROOT / "params.yaml")]
    assert cli.main(["promote", "3", "--reason", "hand-picked", *params]) == 0
    assert json.loads(capsys.readouterr().out)["previous_champion"] == "2"
    assert _aliases()["champion"] == "3"
    assert _tags("2")["polydet.replaced_reason"] == "hand-picked"

    assert cli.main(["rollback", *params]) == 0
    assert json.loads(capsys.readouterr().out)["champion"] == "2"
    assert tracking.rollback(cfg)["champion"] == "1"  # v2 had replaced v1
    with pytest.raises(TrackingError, match="no earlier champion"):
        tracking.rollback(cfg)
    assert cli.main(["promote", "9", *params]) == 2
    assert "no version 9" in capsys.readouterr().err


def test_margin_keeps_champion(store: Path, model_file: Path):
    cfg = _cfg("tracking.promote_margin=0.2")
    tracking.register_model(cfg, model_file, {"map50": 0.50})
    r = tracking.register_model(cfg, model_file, {"map50": 0.65})  # better, not by 0.2
    assert not r["promotion"]["promoted"] and r["champion"] == "1"
    assert _aliases() == {"champion": "1", "challenger": "2"}


def test_champion_uri_loads_and_serves(store: Path, model_file: Path):
    """``models:/polydet@champion`` resolves to the model file and serves as a pyfunc."""
    cfg = _cfg()
    tracking.register_model(cfg, model_file, {"map50": 0.2})
    path = tracking.resolve_model_path("models:/polydet@champion")
    assert path.name == "model.pt" and path.read_bytes() == model_file.read_bytes()
    assert tracking.resolve_model_path(str(model_file)) == model_file

    from PIL import Image

    Image.new("RGB", (80, 64), (200, 40, 40)).save("red.png")
    frame = pd.DataFrame({"image": [tracking.encode_image("red.png"), str(Path("red.png"))]})
    model = mlflow.pyfunc.load_model("models:/polydet@champion")
    out = model.predict(frame, params={"score_thresh": 0.0})
    assert list(out.columns) == [
        "polyboxes", "scores", "labels", "classes", "first_corner", "heading"
    ]  # fmt: skip
    assert len(out) == 2
    for boxes, scores, labels, first, head in zip(
        out["polyboxes"], out["scores"], out["labels"], out["first_corner"], out["heading"]
    ):
        assert len(boxes) == len(scores) == len(labels) == len(first) == len(head)
        assert all(len(b) == 10 for b in boxes)
    # `mlflow models serve` runs this app (in uvicorn): post a request as a client would.
    from fastapi.testclient import TestClient
    from mlflow.pyfunc import scoring_server

    body = {
        "dataframe_split": {"columns": ["image"], "data": [[frame["image"][0]]]},
        "params": {"score_thresh": 0.0},
    }
    answer = TestClient(scoring_server.init(model)).post("/invocations", json=body)
    assert answer.status_code == 200, answer.text
    (served,) = answer.json()["predictions"]
    expected = [v for box in out["polyboxes"][0] for v in box]
    assert [v for box in served["polyboxes"] for v in box] == pytest.approx(expected, abs=1e-3)
    # The heading in the served JSON (the model has the head: no unknown ones to send).
    assert served["first_corner"] == out["first_corner"][0]
    assert served["heading"] == pytest.approx(out["heading"][0], abs=1e-3)

    with pytest.raises(ModelError, match="polydet@nobody"):
        tracking.resolve_model_path("models:/polydet@nobody")
    with pytest.raises(ModelError, match="no such model file"):
        tracking.resolve_model_path("missing/model.pt")


# --- runs and lineage ----------------------------------------------------------------------


def test_lineage_tags(store: Path):
    subprocess.run(["git", "init", "-q"], check=True)
    Path("data.dvc").write_text("outs:\n- md5: 0123abcd.dir\n  path: data\n")
    Path("f.txt").write_text("a")
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True)
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    cfg = _cfg("train.device=cpu")
    tags = tracking.lineage_tags(cfg)
    assert tags["polydet.git_commit"] == head
    assert tags["polydet.git_dirty"] == "false"
    assert tags["polydet.data_dvc_md5"] == "0123abcd.dir"
    assert tags["polydet.device"] == "cpu"
    assert tags["polydet.params_hash"] == tracking.params_hash(_cfg("train.device=cpu"))
    assert tags["polydet.params_hash"] != tracking.params_hash(_cfg("train.lr=0.5"))
    Path("f.txt").write_text("b")
    assert tracking.lineage_tags(cfg)["polydet.git_dirty"] == "true"


def test_history_metrics_names_and_steps(tmp_path: Path):
    csv = tmp_path / "history.csv"
    csv.write_text(
        "step,epoch,split,lr,loss,loss_classifier,images_per_s\n"
        "1,1,train,0.01,2.5,1.0,3.5\n"
        "2,1,train,0.02,2.0,0.8,3.7\n"
        "2,1,val,0.02,2.2,0.9,\n"
    )
    got = {(m.key, m.step): m.value for m in tracking.history_metrics(csv)}
    assert got[("train/loss", 1)] == 2.5 and got[("train/loss", 2)] == 2.0
    assert got[("train/lr", 2)] == 0.02 and got[("train/images_per_s", 1)] == 3.5
    assert got[("val/loss", 2)] == 2.2 and got[("val/loss_classifier", 2)] == 0.9
    assert ("val/images_per_s", 2) not in got and ("val/lr", 2) not in got
    assert not any(k.endswith(("/step", "/epoch", "/split")) for k, _ in got)


def test_failed_pipeline_run_is_marked(store: Path):
    cfg = _cfg()
    with pytest.raises(RuntimeError), tracking.pipeline_run(cfg, run_name="boom") as run_id:
        raise RuntimeError("stage exploded")
    run = mlflow.MlflowClient().get_run(run_id)
    assert run.info.status == "FAILED"
    assert "stage exploded" in run.data.tags["polydet.error"]
    assert run.data.params["train.lr"] == str(cfg.train.lr)
    assert run.data.tags["polydet.params_hash"] == tracking.params_hash(cfg)


# --- an unreachable server -----------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _count_requests(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The timeouts of the HTTP requests the reachability check makes (recorded, then sent)."""
    import requests

    calls: list[float] = []
    real_get = requests.get

    def get(*args, **kwargs):
        calls.append(kwargs.get("timeout"))
        return real_get(*args, **kwargs)

    monkeypatch.setattr(requests, "get", get)
    return calls


def test_unreachable_server_fails_fast(store: Path, monkeypatch: pytest.MonkeyPatch):
    uri = f"http://127.0.0.1:{_free_port()}"  # nothing listens there: refused at once
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    calls = _count_requests(monkeypatch)
    with pytest.raises(TrackingError, match=f"{uri} is unreachable"):
        tracking.connect(_cfg())
    assert calls == [REACH_TIMEOUT_S]  # fast: one short request, no retries


def test_silent_server_times_out(store: Path, monkeypatch: pytest.MonkeyPatch):
    """A server that accepts connections but never answers fails after the short timeout."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        conns: list[socket.socket] = []
        stop = threading.Event()

        def accept() -> None:
            server.settimeout(0.2)
            while not stop.is_set():
                try:
                    conns.append(server.accept()[0])  # and say nothing
                except OSError:
                    continue

        thread = threading.Thread(target=accept, daemon=True)
        thread.start()
        uri = f"http://127.0.0.1:{server.getsockname()[1]}"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        calls = _count_requests(monkeypatch)
        try:
            with pytest.raises(TrackingError, match=uri):
                tracking.check_reachable(uri, timeout=1.0)
        finally:
            stop.set()
            thread.join()
            for c in conns:
                c.close()
        assert calls == [1.0]  # one request with the short timeout, no retries


def test_registration_record_written(store: Path, model_file: Path, monkeypatch):
    """The DVC register stage: outputs logged, model registered, registration.json written."""
    cfg = _cfg()
    train_out = Path(cfg.train.out)
    train_out.mkdir(parents=True)
    (train_out / "model.pt").write_bytes(model_file.read_bytes())
    (train_out / "history.csv").write_text("step,split,loss\n1,train,2.0\n2,train,1.5\n")
    eval_out = Path(cfg.evaluate.out)
    eval_out.mkdir(parents=True)
    (eval_out / "metrics.json").write_text(json.dumps({"map50": 0.25, "ap50/card": 0.5}))
    record = tracking.record_and_register(cfg)
    assert record["version"] == "1" and record["champion"] == "1"
    assert json.loads(tracking.registration_path(cfg).read_text())["version"] == "1"
    client = mlflow.MlflowClient()
    run = client.get_run(record["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["test/map50"] == 0.25 and run.data.metrics["train/loss"] == 1.5
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2]
    children = client.search_runs(
        [run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'"
    )
    assert sorted(c.data.tags["polydet.stage"] for c in children) == sorted(tracking.STAGES)
    logged = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"evaluate", "train"} <= logged
    # Readable: how it was started (a polydet command here) and what it trained.
    assert run.data.tags["polydet.orchestrator"] == "cli"
    assert run.info.run_name.startswith(f"cli {cfg.model.backbone}-{cfg.model.min_size}px ")
    # The registry shows the version's metrics (its logged model's).
    version = client.get_model_version("polydet", record["version"])
    model_metrics = client.get_logged_model(version.source.rsplit("/", 1)[-1]).metrics
    assert {m.key: m.value for m in model_metrics}["test/map50"] == 0.25


def test_dvc_experiment_is_recorded(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("DVC_EXP_NAME", "lucid-lark")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "4c46550")
    assert tracking.launch_tags() == {
        "polydet.orchestrator": "dvc exp run",
        "polydet.dvc_exp_name": "lucid-lark",
        "polydet.dvc_exp_baseline": "4c46550",
    }
    monkeypatch.delenv("DVC_EXP_NAME")
    monkeypatch.setenv("DVC_STAGE", "register")
    assert tracking.launch_tags() == {"polydet.orchestrator": "dvc repro"}


# --- the ONNX export inside the registered model (issue 14) ------------------------------


def _textured_png(path: str) -> str:
    """A smooth random picture (an untrained model's detections on it are many and varied)."""
    from PIL import Image

    from polydet.deploy.export import sample_images

    image = sample_images(seed=3)[1]  # 200 x 320
    Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(path)
    return path


def _as_tensors(row: pd.Series) -> dict:
    import torch

    return {
        "polyboxes": torch.tensor(row["polyboxes"], dtype=torch.float64).view(-1, 10),
        "scores": torch.tensor(row["scores"], dtype=torch.float64),
        "labels": torch.tensor(row["labels"], dtype=torch.int64),
        "first_corner": torch.tensor(row["first_corner"], dtype=torch.int64),
    }


def _check_heading(row: pd.Series, known: bool) -> None:
    """The pyfunc's heading columns: first corners 0..3 and their headings in degrees
    (:func:`heading_degrees` of the row's polyboxes) when ``known``, else -1 and None."""
    import math

    import torch

    from polydet.geometry.heading import heading_degrees

    first, head = row["first_corner"], row["heading"]
    assert len(first) == len(head) == len(row["scores"]) > 0
    if not known:
        assert set(first) == {-1} and head == [None] * len(head)
        return
    assert set(first) <= {0, 1, 2, 3} and all(isinstance(h, float) for h in head)
    boxes = torch.tensor(row["polyboxes"], dtype=torch.float32).view(-1, 10)
    expected = heading_degrees(boxes, torch.tensor(first)).tolist()
    for h, e in zip(head, expected, strict=True):
        d = abs(h - e) % 360.0
        assert min(d, 360.0 - d) < 1e-3 and not math.isnan(h)


def test_the_served_torch_runtime_has_the_angle_view(store: Path, tmp_path: Path):
    """The test-time augmentation's 45-degree view (when enabled) runs only on the torch runtime
    runs at the objects' size: the pyfunc still serves ONNX Runtime by default (the exported
    model alone, torch-free), and its torch runtime carries the logged TTA with the view."""
    import torch

    from polydet.eval.tta import TTAModel, View
    from polydet.model import build_model, save_model

    cfg = _cfg("evaluate.tta.enabled=true")  # off by default; its views: the 45-degree one
    assert cfg.evaluate.tta.enabled and cfg.evaluate.tta.angles
    torch.manual_seed(7)  # another model than model_file's: a new version
    path = save_model(build_model(cfg.model), tmp_path / "m.pt", cfg.model, cfg.data.classes, None)
    record = tracking.register_model(cfg, path, {"map50": 0.3})
    assert record["onnx"] == "parity ok"
    served = mlflow.pyfunc.load_model(f"models:/polydet/{record['version']}")
    defaults = {p.name: p.default for p in served.metadata.get_params_schema().params}
    assert defaults["runtime"] == "onnx"
    runtimes = served.unwrap_python_model().runtimes
    assert not isinstance(runtimes.model("onnx"), TTAModel)
    on_torch = runtimes.model("torch")
    assert isinstance(on_torch, TTAModel) and View(angle=45.0) in on_torch.views


def test_register_logs_the_checked_onnx_export(store: Path, model_file: Path):
    """The version carries the ONNX export that passed the parity check, the run and the
    logged model carry its figures, and the pyfunc runs on ONNX Runtime by default with the
    same detections as on torch (without test-time augmentation; with the default one,
    whose 45-degree view needs the torch runtime, torch is the default: see below)."""
    from mlflow.exceptions import MlflowException

    from polydet.deploy.export import compare_detections

    cfg = _cfg("evaluate.tta.enabled=false")
    record = tracking.register_model(cfg, model_file, {"map50": 0.3})
    assert record["onnx"] == "parity ok"
    client = mlflow.MlflowClient()
    version = client.get_model_version("polydet", record["version"])
    assert version.tags["polydet.onnx"] == "parity ok"
    files = tracking.resolve_model_path("models:/polydet@champion").parent
    assert (files / "onnx" / "model.onnx").is_file() and (files / "model.pt").is_file()
    assert json.loads((files / "onnx" / "classes.json").read_text()) == list(cfg.data.classes)
    # The parity figures: metrics of the run and of the logged model, equal to the export's
    # own report; the images it was checked on as a param (no prepared data here).
    parity = json.loads((files / "onnx" / "export.json").read_text())["parity"]
    assert parity["ok"] and parity["checked"] > 0
    run = client.get_run(record["run_id"])
    assert parity["failures"] == []
    for key, value in parity.items():
        if key != "failures":  # a list, in export.json only
            assert run.data.metrics[f"onnx/parity_{key}"] == float(value), key
    assert run.data.metrics["onnx/export_seconds"] > 0
    assert run.data.params["onnx.parity_images"] == "test:0+sample:1"
    assert run.data.params["onnx.opset"] == "17"
    assert run.data.tags["polydet.onnx"] == "parity ok"
    logged = client.get_logged_model(version.source.rsplit("/", 1)[-1])
    assert {m.key: m.value for m in logged.metrics}["onnx/parity_ok"] == 1.0

    model = mlflow.pyfunc.load_model("models:/polydet@champion")
    defaults = {p.name: p.default for p in model.metadata.get_params_schema().params}
    assert defaults == {"score_thresh": 0.0, "runtime": "onnx"}
    frame = pd.DataFrame({"image": [tracking.encode_image(_textured_png("t.png"))]})
    default = model.predict(frame)
    on_onnx = model.predict(frame, params={"runtime": "onnx"})
    on_torch = model.predict(frame, params={"runtime": "torch"})
    assert default["scores"][0] == on_onnx["scores"][0]
    report = compare_detections([_as_tensors(on_torch.iloc[0])], [_as_tensors(on_onnx.iloc[0])])
    assert report["ok"] and report["checked"] >= 5, report
    assert report["first_corner_mismatch"] == 0  # the heading, on both runtimes
    _check_heading(on_onnx.iloc[0], known=True)
    _check_heading(on_torch.iloc[0], known=True)
    assert on_onnx["classes"][0] == [cfg.data.classes[i - 1] for i in on_onnx["labels"][0]]
    with pytest.raises(MlflowException, match="runtime 'tensorrt': expected one of onnx, torch"):
        model.predict(frame, params={"runtime": "tensorrt"})

    # A version registered before the heading: its model.onnx has the outputs polyboxes,
    # scores and labels only. It still loads and runs on ONNX Runtime, heading unknown.
    import onnx

    stored = list(store.rglob("model.onnx"))
    assert stored
    for path in stored:
        graph = onnx.load(str(path))
        del graph.graph.output[3:]
        onnx.save(graph, str(path))
    old = mlflow.pyfunc.load_model("models:/polydet@champion").predict(frame)
    assert old["labels"][0] == on_onnx["labels"][0]
    flat = [v for box in on_onnx["polyboxes"][0] for v in box]
    assert [v for box in old["polyboxes"][0] for v in box] == pytest.approx(flat, abs=1e-4)
    _check_heading(old.iloc[0], known=False)


def test_export_failing_parity_is_not_registered(
    store: Path, model_file: Path, monkeypatch: pytest.MonkeyPatch, capsys
):
    """A mismatching export is left out: the version is registered without it (runtime torch
    only, said on stderr and in its tag), and the parity figures are still logged."""
    from mlflow.exceptions import MlflowException

    from polydet.deploy import export

    mismatch = {"ok": False, "checked": 7, "unmatched": 3, "max_count_diff": 2,
                "min_iou": 0.4, "max_score_diff": 0.25}  # fmt: skip
    monkeypatch.setattr(export, "check_parity", lambda *args: dict(mismatch))
    cfg = _cfg()
    record = tracking.register_model(cfg, model_file, {"map50": 0.3})
    assert record["onnx"].startswith("not logged: failed the parity check")
    assert "registered without it" in capsys.readouterr().err
    client = mlflow.MlflowClient()
    tags = client.get_model_version("polydet", record["version"]).tags
    assert tags["polydet.onnx"] == record["onnx"]
    files = tracking.resolve_model_path("models:/polydet@champion").parent
    assert not list(files.parent.rglob("*.onnx"))
    metrics = client.get_run(record["run_id"]).data.metrics
    assert metrics["onnx/parity_ok"] == 0.0 and metrics["onnx/parity_unmatched"] == 3.0

    model = mlflow.pyfunc.load_model("models:/polydet@champion")
    defaults = {p.name: p.default for p in model.metadata.get_params_schema().params}
    assert defaults["runtime"] == "torch"
    frame = pd.DataFrame({"image": [tracking.encode_image(_textured_png("t.png"))]})
    assert len(model.predict(frame)["scores"][0]) > 0
    with pytest.raises(MlflowException, match="carries no ONNX model"):
        model.predict(frame, params={"runtime": "onnx"})
    args = ["predict", "t.png", "--model", "models:/polydet@champion", "--runtime", "onnx",
            "--params", str(ROOT / "params.yaml")]  # fmt: skip
    assert cli.main(args) == 2
    assert "carries no ONNX model" in capsys.readouterr().err


def test_pyfunc_heading_columns_of_each_kind_of_output():
    """The pyfunc's ``first_corner`` / ``heading`` from what a runtime returns: both given
    (ONNX, eager torch, and test-time augmentation, whose fused detections get the heading of
    their first corners) or neither (no heading head, an export from before it: unknown)."""
    import numpy as np
    import torch

    from polydet.core.config import TTAConfig
    from polydet.eval.tta import TTAModel
    from polydet.tracking.pyfunc import _heading_of

    class FirstCornersOnly:  # a runtime's detections with first corners and no heading
        def __init__(self, det: dict) -> None:
            self.det = det

        def predict(self, images: list) -> list[dict]:
            return [{k: torch.as_tensor(v) for k, v in self.det.items()} for _ in images]

    identity = TTAConfig(
        enabled=True,
        flips=(),
        rot90=(),
        scales=(),
        angles=(),
        fusion="nms",
        iou_threshold=0.5,
        align_power=0.0,
    )

    # A 4 x 2 box around (10, 20); its canonical corners in the stored order:
    box = np.array([[10.0, 20.0, -2.0, -1.0, 2.0, -1.0, 2.0, 1.0, -2.0, 1.0]], np.float32)
    corners = box[0, :2] + box[0, 2:].reshape(4, 2)
    # Hand-made reference: the direction from the centre to the middle of edge k -> k + 1,
    # degrees in [0, 360) in image axes (y down): 270 (up), 0 (right), 90, 180.
    mids = (corners + np.roll(corners, -1, axis=0)) / 2 - box[0, :2]
    expected = np.degrees(np.arctan2(mids[:, 1], mids[:, 0])) % 360
    assert expected.tolist() == pytest.approx([270.0, 0.0, 90.0, 180.0])
    for k in range(4):
        base = {"polyboxes": box, "scores": np.array([0.9], np.float32)}
        net = FirstCornersOnly({**base, "labels": np.array([1]), "first_corner": np.array([k])})
        (out,) = TTAModel(net, identity).predict([torch.zeros(3, 40, 40)])
        fused = {name: v.numpy() for name, v in out.items()}
        first, head = _heading_of(fused)
        assert first.tolist() == [k] and head.tolist() == pytest.approx([expected[k]], abs=1e-4)
        given = {**fused, "heading": np.array([123.0], np.float32)}
        assert _heading_of(given)[1].tolist() == [123.0]
        first, head = _heading_of(base)
        assert first.tolist() == [-1] and np.isnan(head).all()
