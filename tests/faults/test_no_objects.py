"""A dataset with no objects at all (survey case 14): prepare and train warn, and the debug
report has a finding (it used to train silently and report nothing)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import one_thread  # noqa: F401  (a fixture, used below)
from test_engine import tiny_overrides

from polydet import cli
from polydet.core.config import load_config
from polydet.data.prepare import format_summary, prepare
from polydet.debug.report import debug_report
from polydet.train.engine import train

pytestmark = pytest.mark.usefixtures("one_thread")
PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"


def test_a_dataset_without_objects_is_warned_about_everywhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    raw, prepared, out = tmp_path / "raw", tmp_path / "prepared", tmp_path / "train"
    synth = [
        f"synth.out={raw}", "synth.num_images=8", "synth.image_width=64",
        "synth.image_height=64", "synth.min_objects=0", "synth.max_objects=0",
    ]  # fmt: skip
    argv = ["synth", "--params", str(PARAMS), *[a for s in synth for a in ("--set", s)]]
    assert cli.main(argv) == 0
    lines = [t for p in (raw / "labelTxt").glob("*.txt") for t in p.read_text().splitlines()]
    assert lines and all(":" in t for t in lines)  # header lines only: no object anywhere

    sets = [*tiny_overrides(prepared, out, "train.max_steps=1"), f"data.root={raw}"]
    sets += ["data.split={train: 0.5, val: 0.25, test: 0.25, seed: 0}", "debug.split=train"]
    cfg = load_config(PARAMS, sets)
    result = prepare(cfg)
    assert result["objects"] == 0
    assert any("no objects at all" in w for w in result["warnings"])
    assert "warning: the dataset has no objects at all" in format_summary(result)

    capsys.readouterr()
    train(cfg)
    assert "warning: the train split" in capsys.readouterr().err

    report = debug_report(cfg)
    assert any("no objects at all" in str(f) for f in report["findings"])
    saved = json.loads((Path(cfg.debug.out) / "debug.json").read_text())
    assert "no_objects" in [f["code"] for f in saved["findings"]]
    assert "no_objects" in (Path(cfg.debug.out) / "report.md").read_text()
