"""The survey's smaller cases: random-bytes and empty model files, a text file named .png
among the images to predict, a read-only MLflow store."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import helpers
import mlflow
import pytest
from helpers import one_thread, tiny_cfg  # noqa: F401  (one_thread: a fixture, used below)
from mlflow.exceptions import MlflowException
from PIL import Image

from polydet import cli
from polydet.core.errors import ModelError
from polydet.model import build_model, load_model, save_model
from polydet.train.checkpoint import load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[2]
PARAMS = ROOT / "params.yaml"
TINY = [*helpers.TINY, "data.classes=[a, b]"]


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (os.urandom(4096), "not a file written by torch.save"),
        (b"", "the file is empty (0 bytes)"),
    ],
)
def test_bad_model_files_say_what_they_are_and_never_suggest_unsafe_loading(
    tmp_path: Path, content: bytes, reason: str
) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    for load in (load_model, load_checkpoint):
        with pytest.raises(ModelError) as info:
            load(path)
        message = str(info.value)
        assert reason in message and str(path) in message
        assert "weights_only" not in message


def test_a_pickle_with_code_is_refused_without_unsafe_advice(tmp_path: Path) -> None:
    import torch

    path = tmp_path / "model.pt"
    torch.save({"format": "polydet-model/1", "payload": Path("x")}, path)  # an arbitrary object
    with pytest.raises(ModelError, match="refused, since loading them could run code") as info:
        load_model(path)
    assert "weights_only" not in str(info.value)


def test_a_text_file_named_png_is_skipped_with_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    model = tmp_path / "model.pt"
    cfg = tiny_cfg()
    save_model(build_model(cfg), model, cfg, ["a", "b"], None)
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (96, 64), (90, 90, 90)).save(images / "a.png")
    (images / "b.png").write_text("this is not an image\n")
    Image.new("RGB", (64, 96), (20, 120, 20)).save(images / "c.png")
    out = tmp_path / "pred"
    argv = ["predict", str(images), "--model", str(model), "--out", str(out), "--params"]
    code = cli.main([*argv, str(PARAMS), *[a for t in TINY for a in ("--set", t)]])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"warning: skipped {images / 'b.png'}: not an image format" in captured.err
    doc = json.loads((out / "detections.json").read_text())
    assert [r["image_id"] for r in doc["images"]] == ["a", "c"]
    assert doc["summary"]["skipped"][0]["path"] == str(images / "b.png")
    assert sorted(p.name for p in (out / "images").iterdir()) == ["a.png", "c.png"]


SQL_DUMP = (
    "(sqlite3.OperationalError) attempt to write a readonly database\n"
    "[SQL: INSERT INTO experiments (name, workspace, artifact_location) VALUES (?, ?, ?)]\n"
    "[parameters: ('polydet', 'default', 'file:///x/mlruns/artifacts')]\n"
    "(Background on this error at: https://sqlalche.me/e/20/e3q8)"
)


def test_a_read_only_mlflow_store_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlflow_db: Path, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "mlruns").mkdir()
    shutil.copy(mlflow_db, tmp_path / "mlruns" / "mlflow.db")
    (tmp_path / "outputs" / "train").mkdir(parents=True)
    (tmp_path / "outputs" / "train" / "model.pt").write_bytes(b"x")

    # The write the survey saw fail, as MLflow's SQLAlchemy store reports it.
    def readonly(*args: object, **kwargs: object) -> None:
        raise MlflowException(SQL_DUMP)

    monkeypatch.setattr(mlflow.MlflowClient, "create_experiment", readonly)
    assert cli.main(["register", "--params", str(PARAMS)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "[SQL:" not in err and "Traceback" not in err
    assert "mlflow.db: attempt to write a readonly database" in err

    # A read-only store directory is found before anything is attempted.
    real_access = os.access
    ro = tmp_path / "mlruns"
    monkeypatch.setattr(
        os, "access", lambda p, mode: False if Path(p) == ro else real_access(p, mode)
    )
    assert cli.main(["register", "--params", str(PARAMS)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{ro} is not writable" in err
