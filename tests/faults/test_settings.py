"""Settings that used to be accepted and crash later, or end in a traceback (survey cases
10, 12, 13): non-UTF-8 ``params.yaml``, bad ``--set`` YAML, exponent numbers, meaningless
values. Each must be an error naming the key (or the file and line) at load time."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from polydet import cli
from polydet.core.config import ConfigError, load_config

PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"


def test_params_yaml_that_is_not_utf8_names_file_and_line(tmp_path: Path) -> None:
    text = PARAMS.read_text().replace("experiment: polydet", "experiment: café")
    line = next(i for i, t in enumerate(text.splitlines(), 1) if "café" in t)
    bad = tmp_path / "params.yaml"
    bad.write_bytes(text.encode("latin-1"))  # é is byte 0xe9: not UTF-8
    with pytest.raises(ConfigError, match=rf"params\.yaml:{line}: not UTF-8 text \(byte 0xe9"):
        load_config(bad)


def test_set_with_broken_yaml_names_the_override(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ConfigError, match=r"--set train\.lr=\[1,2: the value is not valid YAML"):
        load_config(PARAMS, ["train.lr=[1,2"])
    assert cli.main(["train", "--params", str(PARAMS), "--set", "train.lr=[1,2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--set train.lr=[1,2" in err[0]


@pytest.mark.parametrize(
    ("text", "value"), [("1e6", 1e6), ("3e-4", 3e-4), ("3E-4", 3e-4), (".5", 0.5), ("2e+1", 20.0)]
)
def test_exponent_numbers_are_floats(text: str, value: float) -> None:
    assert load_config(PARAMS, [f"train.lr={text}"]).train.lr == value


def test_exponent_numbers_in_params_yaml(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(PARAMS.read_text().replace("  lr: 0.02", "  lr: 3e-4"))
    assert load_config(path).train.lr == 3e-4


def test_words_are_still_not_numbers() -> None:
    with pytest.raises(ConfigError, match="train.lr: expected a number, got 'fast'"):
        load_config(PARAMS, ["train.lr=fast"])


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("model.min_size=0", "model.min_size"),
        ("model.fpn_channels=0", "model.fpn_channels"),
        ("train.seed=-1", "train.seed"),
        ("model.roi.pool_size=0", "model.roi.pool_size"),
        ("model.rpn.nms_thresh=5", "model.rpn.nms_thresh"),
        ("anchors.num_ratios=0", "anchors.num_ratios"),
        ("model.max_size=64", "model.max_size"),  # below min_size
        ("model.rpn.bg_iou_thresh=0.9", "model.rpn.bg_iou_thresh"),  # above fg_iou_thresh
        ("data.split={train: 1.5, val: -0.25, test: -0.25, seed: 0}", "data.split.train"),
    ],
)
def test_meaningless_values_are_refused_at_load_time_naming_the_key(
    override: str, key: str
) -> None:
    with pytest.raises(
        ConfigError, match=rf"params\.yaml: {re.escape(key)}: value .* out of range"
    ):
        load_config(PARAMS, [override])
