"""Settings that used to be accepted and crash later, or end in a traceback (survey cases
10, 12, 13): non-UTF-8 ``params.yaml``, bad ``--set`` YAML, exponent numbers, meaningless
values. Each must be an error naming the key (or the file and line) at load time."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

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
    text, n = re.subn(r"(?m)^  lr: \S+", "  lr: 3e-4", PARAMS.read_text())
    assert n == 1  # the train section's lr line
    path.write_text(text)
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


def test_each_fact_is_set_once_and_copied_where_it_is_needed() -> None:
    """model.num_classes, model.anchor_sizes / aspect_ratios and synth.classes come from
    data.classes and the anchors section (not params.yaml keys of their own)."""
    raw = yaml.safe_load(PARAMS.read_text())
    assert "num_classes" not in raw["model"] and "anchor_sizes" not in raw["model"]
    assert "aspect_ratios" not in raw["model"] and "classes" not in raw["synth"]
    cfg = load_config(
        PARAMS,
        [
            "data.classes=[a, b, c, d, e]",
            "anchors.sizes=[[8, 12], [24, 32], [48, 64], [96, 128]]",
            "anchors.aspect_ratios=[0.25, 4.0]",
        ],
    )
    assert cfg.model.num_classes == 6  # 5 classes + background
    assert cfg.model.anchor_sizes == ((8, 12), (24, 32), (48, 64), (96, 128))
    assert cfg.model.aspect_ratios == (0.25, 4.0)
    assert cfg.synth.classes == ("a", "b", "c", "d", "e")


@pytest.mark.parametrize(
    ("section", "line", "key", "source"),
    [
        (
            "model",
            "  anchor_sizes: [[16], [32], [64], [128]]",
            "model.anchor_sizes",
            "anchors.sizes",
        ),
        ("model", "  aspect_ratios: [0.5, 2.0]", "model.aspect_ratios", "anchors.aspect_ratios"),
        ("synth", "  classes: [card, plate, kite]", "synth.classes", "data.classes"),
    ],
)
def test_old_params_files_with_a_removed_key_say_what_to_change(
    tmp_path: Path, section: str, line: str, key: str, source: str
) -> None:
    lines = PARAMS.read_text().splitlines()
    at = lines.index(next(t for t in lines if t.startswith(f"{section}:"))) + 1
    lines.insert(at, line)  # the old file: the key first in its section, on line at + 1
    old = tmp_path / "params.yaml"
    old.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError) as e:
        load_config(old)
    msg = str(e.value)
    assert msg.startswith(f"{old}:{at + 1}: {key} is no longer a setting")
    assert f"{source} is the one place for it; delete {key}" in msg
    if key == "model.aspect_ratios":  # a value that differs from the anchors section's
        assert "to keep [0.5, 2.0], set anchors.aspect_ratios to it: it is [0.5, 1.0, 2.0]" in msg
    else:
        assert f"{source} has the same value" in msg


def test_model_num_classes_is_derived_and_checked_when_still_given(tmp_path: Path) -> None:
    text = PARAMS.read_text()
    model_line = next(t for t in text.splitlines() if t.startswith("model:"))
    agreeing, wrong = tmp_path / "agree.yaml", tmp_path / "wrong.yaml"
    agreeing.write_text(text.replace(model_line, f"{model_line}\n  num_classes: 4"))
    assert load_config(agreeing).model.num_classes == 4  # card, plate, kite + background
    wrong.write_text(text.replace(model_line, f"{model_line}\n  num_classes: 7"))
    line = text.splitlines().index(model_line) + 2
    with pytest.raises(
        ConfigError,
        match=rf"wrong\.yaml:{line}: model\.num_classes is 7, but data\.classes has 3 classes "
        r"\(\+ background = 4\): delete model\.num_classes .* or set it to 4",
    ):
        load_config(wrong)
    with pytest.raises(ConfigError, match=r"model\.num_classes is derived from data\.classes"):
        load_config(PARAMS, ["model.num_classes=4"])
    with pytest.raises(ConfigError, match=r"anchors\.sizes: 3 levels, but model\.returned_layers"):
        load_config(PARAMS, ["anchors.sizes=[[16], [32], [64]]"])
