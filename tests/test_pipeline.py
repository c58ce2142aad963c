"""The Prefect flow end to end on the smoke configuration, its cache, aliases and schedule.

One real pipeline run (synthetic data, 3 training steps) under the session's Prefect test
server; then cached reruns, and evaluation metrics monkeypatched to check the aliases after a
better and after a worse model without training again.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import mlflow
import pytest
import yaml

import polydet.pipeline.flow as fp
from polydet import tracking
from polydet.core.config import load_config
from polydet.core.errors import TrackingError

ROOT = Path(__file__).resolve().parents[1]
PARAMS = str(ROOT / "params.yaml")


def _run(*overrides: str) -> dict[str, Any]:
    return fp.polydet_pipeline(params=PARAMS, overrides=[*fp.SMOKE_OVERRIDES, *overrides])


@pytest.fixture(scope="module")
def _first_run(
    tmp_path_factory: pytest.TempPathFactory, prefect_harness: str, mlflow_db: Path
) -> tuple[Path, dict[str, Any]]:
    """A project directory after one real pipeline run; tests get copies (``project``)."""
    path = tmp_path_factory.mktemp("first-run") / "project"
    (path / "mlruns").mkdir(parents=True)
    shutil.copy(mlflow_db, path / "mlruns" / "mlflow.db")
    old = os.getcwd()
    os.chdir(path)
    saved = os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        record = _run()
    finally:
        os.chdir(old)
        if saved is not None:
            os.environ["MLFLOW_TRACKING_URI"] = saved
    return path, record


def _copy_project(src: Path, dst: Path) -> None:
    """Copy a project; the MLflow store's absolute artifact locations are moved along (a
    copy that still wrote its runs' artifacts under ``src`` would change the original)."""
    shutil.copytree(src, dst, symlinks=True)
    old, new = src.resolve().as_uri(), dst.resolve().as_uri()
    with sqlite3.connect(dst / "mlruns" / "mlflow.db") as db:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in tables:
            for col in db.execute(f'PRAGMA table_info("{table}")').fetchall():
                if "CHAR" in col[2].upper() or "TEXT" in col[2].upper():
                    db.execute(
                        f'UPDATE "{table}" SET "{col[1]}" = replace("{col[1]}", ?, ?)',
                        (old, new),
                    )
    db.close()


@pytest.fixture
def project(_first_run: tuple[Path, dict[str, Any]], tmp_path: Path) -> tuple[Path, dict]:
    """This test's own copy of the project after the first run (tests rerun the flow,
    register models and delete outputs: no test sees what another did)."""
    src, record = _first_run
    _copy_project(src, tmp_path / "project")
    return tmp_path / "project", copy.deepcopy(record)


@pytest.fixture
def in_project(project: tuple[Path, dict], monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(project[0])
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return project[0]


def _aliases() -> dict[str, str]:
    model = mlflow.MlflowClient().get_registered_model("polydet")
    return {a: str(v) for a, v in model.aliases.items()}


def test_first_run_registers_champion(project: tuple[Path, dict], in_project: Path):
    _, record = project
    assert (record["version"], record["new"], record["champion"]) == ("1", True, "1")
    assert not any(record["cached"].values())
    assert _aliases() == {"champion": "1", "challenger": "1"}
    for key in ("metrics", "report_md", "anchors", "dataset"):
        assert Path(record["outputs"][key]).is_file(), key
    assert Path("data/synthetic").is_dir()  # regenerated because data/ was absent
    registration = json.loads(Path("outputs/register/registration.json").read_text())
    assert registration["version"] == "1"

    client = mlflow.MlflowClient()
    run = client.get_run(record["run_id"])
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert tags["polydet.params_hash"] and tags["polydet.device"] == "cpu"
    assert {"polydet.git_commit", "polydet.git_dirty", "polydet.data_dvc_md5"} <= set(tags)
    assert run.data.params["train.max_steps"] == "3"
    assert run.info.run_name.startswith("prefect-") and "resnet18_fpn-96px" in run.info.run_name
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.name == "synthetic" and dataset.dataset.digest
    assert "test/map50" in run.data.metrics
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert steps == sorted(steps) and len(steps) == 3  # one row per step (log_every=1)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"anchors", "prepare", "evaluate", "debug", "train"} <= artifacts
    assert "http://127.0.0.1:5000/#/experiments/" in record["run_link"]
    assert "make ui" in record["where"] and "models:/polydet@champion" in record["where"]
    # Serving from a new shell needs the store named (tests/test_tracking_clients.py runs it).
    assert "polydet serve" in record["where"]
    assert f"MLFLOW_TRACKING_URI={record['tracking_uri']} mlflow models serve" in record["where"]


def test_prefect_artifacts(project: tuple[Path, dict], in_project: Path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = {
            a.key: a
            for a in client.read_artifacts(
                artifact_filter=ArtifactFilter(
                    key=ArtifactFilterKey(any_=["polydet-summary", "per-class-ap"])
                )
            )
        }
    assert "MLflow run" in found["polydet-summary"].data
    rows = found["per-class-ap"].data
    rows = json.loads(rows) if isinstance(rows, str) else rows
    assert [r["class"] for r in rows] == ["card", "plate", "kite"]


def test_rerun_is_cached_and_one_param_reruns_only_later_stages(
    project: tuple[Path, dict], in_project: Path
):
    model_before = Path("outputs/train/model.pt").stat().st_mtime_ns
    again = _run()
    assert all(again["cached"].values())
    assert (again["version"], again["new"]) == ("1", False)  # nothing new to register
    assert Path("outputs/train/model.pt").stat().st_mtime_ns == model_before

    changed = _run("debug.num_images=1")
    assert changed["cached"] == {
        "prepare": True,
        "anchors": True,
        "train": True,
        "evaluate": True,
        "debug": False,
    }

    Path("outputs/eval/metrics.json").unlink()  # an output gone: its stage reruns
    healed = _run()
    assert not healed["cached"]["evaluate"] and healed["cached"]["train"]
    assert Path("outputs/eval/metrics.json").is_file()


def _fake_evaluate(map50: float):
    def evaluate_model(cfg, model=None):
        out = Path(cfg.evaluate.out)
        out.mkdir(parents=True, exist_ok=True)
        metrics = {"map50": map50, "ap50/card": map50, "split": cfg.evaluate.split}
        (out / "metrics.json").write_text(json.dumps(metrics))
        return metrics

    return evaluate_model


def test_aliases_after_better_and_worse_models(
    project: tuple[Path, dict], in_project: Path, monkeypatch: pytest.MonkeyPatch
):
    import polydet.eval.evaluate

    # A different evaluate setting each time makes the stage rerun (with the fake metrics).
    monkeypatch.setattr(polydet.eval.evaluate, "evaluate_model", _fake_evaluate(1.0))
    better = _run("evaluate.precision_targets=[0.5]")
    assert better["new"] and better["promotion"]["promoted"]
    assert _aliases() == {"champion": better["version"], "challenger": better["version"]}

    monkeypatch.setattr(polydet.eval.evaluate, "evaluate_model", _fake_evaluate(0.0))
    worse = _run("evaluate.precision_targets=[0.6]")
    assert worse["new"] and not worse["promotion"]["promoted"]
    assert _aliases() == {"champion": better["version"], "challenger": worse["version"]}
    replaced = mlflow.MlflowClient().get_model_version("polydet", "1").tags
    assert replaced["polydet.replaced_by"] == better["version"]
    path = tracking.resolve_model_path("models:/polydet@champion")
    assert path.read_bytes() == Path("outputs/train/model.pt").read_bytes()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_tracking_server_fails_fast_and_keeps_outputs(
    project: tuple[Path, dict], in_project: Path, monkeypatch: pytest.MonkeyPatch
):
    uri = f"http://127.0.0.1:{_free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    before = {p: p.stat().st_mtime_ns for p in Path("outputs").rglob("*") if p.is_file()}
    with pytest.raises(TrackingError, match=uri):
        _run()
    after = {p: p.stat().st_mtime_ns for p in Path("outputs").rglob("*") if p.is_file()}
    assert after == before  # nothing produced before was touched


def test_cache_key_follows_settings_inputs_and_code(tmp_path: Path, monkeypatch):
    """A stage's key changes with its settings, its input files and its code, only those."""
    monkeypatch.chdir(tmp_path)
    source = tmp_path / "src"
    for src in fp.STAGE_BY_NAME["anchors"].code:
        (source / src).parent.mkdir(parents=True, exist_ok=True)
        (source / src).write_text("# code\n")
    monkeypatch.setattr(fp, "project_root", lambda: source)

    def key(*overrides: str) -> str:
        cfg = load_config(PARAMS, [*fp.SMOKE_OVERRIDES, *overrides])
        return fp.stage_key(fp.STAGE_BY_NAME["anchors"], cfg)

    Path("outputs/prepared").mkdir(parents=True)
    Path("outputs/prepared/images.csv").write_text("a\n")
    Path("outputs/prepared/objects.csv").write_text("b\n")
    first = key()
    assert key() == first
    assert key("train.lr=1", "debug.num_images=1") == first  # not this stage's settings
    assert key("anchors.num_ratios=2") != first
    assert key("model.min_size=128", "model.max_size=128") != first
    Path("outputs/prepared/objects.csv").write_text("c\n")
    second = key()
    assert second != first
    (source / "polydet/train/anchors.py").write_text("# changed code\n")
    assert key() != second


def test_serve_registers_a_cron_deployment(prefect_harness: str, tmp_path: Path):
    """``python -m flows.serve --cron`` puts a scheduled deployment on the API it serves."""
    from prefect.client.orchestration import get_client

    env = {**os.environ, "PREFECT_API_URL": prefect_harness}
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.serve", "--cron", "0 3 * * *", "--name", "test-nightly"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        deployment = None
        with get_client(sync_client=True) as client:
            while deployment is None and time.monotonic() < deadline:
                assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
                try:
                    deployment = client.read_deployment_by_name("polydet-pipeline/test-nightly")
                except Exception:  # not registered yet
                    time.sleep(0.5)
        assert deployment is not None, "serve did not register the deployment in 60 s"
        assert [s.schedule.cron for s in deployment.schedules] == ["0 3 * * *"]
        assert deployment.parameters == {"params": "params.yaml", "deployment_overrides": []}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_prefect_yaml_describes_the_flow():
    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    (deployment,) = config["deployments"]
    path, func = deployment["entrypoint"].split(":")
    assert (ROOT / path).is_file() and func == "polydet_pipeline"
    signature = inspect.signature(fp.polydet_pipeline.fn)
    assert set(deployment["parameters"]) <= set(signature.parameters)
    # A run started with its own overrides (Prefect replaces that one parameter) keeps the
    # deployment's settings: the flow applies both.
    run = {**deployment["parameters"], "overrides": ["train.epochs=2"]}
    called: dict[str, Any] = {}

    def load_config(params, overrides):
        called["overrides"] = list(overrides)
        raise RuntimeError("stop here")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fp, "load_config", load_config)
        with pytest.raises(RuntimeError, match="stop here"):
            fp.polydet_pipeline.fn(**run)
    cfg = fp.load_config(ROOT / run["params"], called["overrides"])
    assert (cfg.train.device, cfg.train.amp, cfg.train.epochs) == ("cuda", True, 2)
    assert deployment["schedules"][0]["cron"] == "0 3 * * *"
    assert deployment["work_pool"]["name"]


def test_registration_retries_only_transient_errors():
    from prefect.states import Failed

    from polydet.core.errors import DataError, ModelError

    assert fp._transient(None, None, Failed(data=TrackingError("server went away")))
    assert fp._transient(None, None, Failed(data=ConnectionError("reset by peer")))
    assert not fp._transient(None, None, Failed(data=DataError("no map50 in metrics")))
    assert not fp._transient(None, None, Failed(data=ModelError("model.pt is not a model")))


def test_stage_line_and_summary_text():
    line = fp.stage_line("evaluate", {"map50": 0.5, "split": "test", "curves": [1, 2]}, False, 1.23)
    assert line == "evaluate: ran in 1.2 s; map50=0.5000, split=test"
    assert fp.stage_line("train", {}, True, 0.0) == "train: cached; no summary numbers"
    coverage = {
        "chosen": "fitted",
        "sets": {"fitted": {"overall": {"count": 3, "coverage@0.5": 0.9}}},
    }
    # A bare "coverage@0.5" renders as a mailto link in Prefect's Markdown.
    assert "- `coverage@0.5`: 0.9000" in fp.anchor_lines(coverage)
