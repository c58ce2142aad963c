"""``polydet evaluate --format dota`` on damaged ground truth (survey case 11): zero-area and
self-intersecting quads get a warning with file:line and are still scored as the DOTA kit
scores them; binary garbage is an error with file:line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from polydet import cli

GOOD = "10 10 50 10 50 50 10 50 card 0\n"


def _evaluate(tmp_path: Path, labels: dict[str, bytes], capsys) -> tuple[int, str, str]:
    ann, det = tmp_path / "ann", tmp_path / "det"
    ann.mkdir()
    det.mkdir()
    for name, data in labels.items():
        (ann / name).write_bytes(data)
    # One perfect detection of image a's good card.
    (det / "Task1_card.txt").write_text("a 0.9 10 10 50 10 50 50 10 50\n")
    argv = ["evaluate", "--format", "dota", "--detections", str(det), "--annotations", str(ann)]
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    ("quad", "what"),
    [
        ("30 30 30 30 30 30 30 30", "zero-area quad"),
        ("60 60 90 90 90 60 60 90", "self-intersecting quad"),  # a bow tie
    ],
)
def test_degenerate_ground_truth_is_warned_with_file_and_line_and_still_scored(
    tmp_path: Path, capsys: pytest.CaptureFixture, quad: str, what: str
) -> None:
    labels = {"a.txt": f"imagesource:GoogleEarth\ngsd:0.1\n{GOOD}{quad} card 0\n".encode()}
    code, out, err = _evaluate(tmp_path, labels, capsys)
    assert code == 0, err
    assert f"warning: {tmp_path / 'ann' / 'a.txt'}:4: {what}" in err
    # It still counts (as in the kit): 1 of 2 ground truths found at precision 1, so the
    # VOC07 11-point AP is 6/11 (recall points 0, 0.1, ..., 0.5).
    assert json.loads(out)["ap50/card"] == pytest.approx(6 / 11)


def test_binary_garbage_is_an_error_with_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    garbage = bytes(range(128, 256)) * 2
    labels = {"a.txt": GOOD.encode(), "b.txt": GOOD.encode() + garbage + b"\n" + GOOD.encode()}
    code, out, err = _evaluate(tmp_path, labels, capsys)
    assert code == 2
    assert f"error: {tmp_path / 'ann' / 'b.txt'}:2: unreadable file: not UTF-8 text" in err
    assert "Traceback" not in err and out == ""
