"""Leftovers, full disks, read-only directories and Ctrl-C (survey cases 6, 8, 9).

A "full disk" is a real write failure: the child process runs with a 1 MB file-size limit
(``RLIMIT_FSIZE``, ``SIGXFSZ`` ignored), so the kernel refuses the write as a full disk
would. A read-only directory is ``EROFS`` raised where the output directory is created.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import one_thread  # noqa: F401  (a fixture, used below)
from test_engine import make_dataset, tiny_config, tiny_overrides

from polydet import cli
from polydet.core.config import load_config
from polydet.core.errors import PolydetError
from polydet.data import manifest
from polydet.data.prepare import prepare
from polydet.model import PolyDetector
from polydet.train.engine import train

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[2]
PARAMS = ROOT / "params.yaml"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("prepared"))


def _sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _digests(d: Path) -> dict[str, str]:
    return {
        str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(d.rglob("*"))
        if p.is_file()
    }


# --- case 6: leftovers ---------------------------------------------------------------------


def test_temp_files_of_killed_writes_are_removed_at_the_next_start(
    prepared: Path, tmp_path: Path
) -> None:
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    dead = _dead_pid()
    killed = [
        ckpts / f".last.pt.{dead}.x1y2z3.tmp",  # a checkpoint write killed mid-way
        ckpts / ".last.pt.k3j4h5g6.tmp",  # the same, by an older polydet (no pid)
        tmp_path / f".model.pt.{dead}.tmp",  # a save_model killed mid-way
    ]
    for p in killed:
        p.write_bytes(b"\0" * 1000)
    old = 1_000_000_000  # long ago (2001): a temp file without a pid is stale after 10 min
    os.utime(killed[1], (old, old))
    mine = ckpts / f".last.pt.{os.getpid()}.abcdef.tmp"  # a live writer's: kept
    mine.write_bytes(b"\0")
    train(tiny_config(prepared, tmp_path, "train.max_steps=1"))
    assert not any(p.exists() for p in killed)
    assert mine.exists()


CHILD = r"""
import resource, signal, sys
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))  # like a disk with 1 MB free
from polydet import cli
sys.exit(cli.main(sys.argv[1:]))
"""


def test_full_disk_while_checkpointing_is_one_line_and_keeps_the_good_file(
    prepared: Path, tmp_path: Path
) -> None:
    overrides = tiny_overrides(prepared, tmp_path, "train.max_steps=2", "train.checkpoint_every=2")
    train(load_config(PARAMS, overrides))
    last = tmp_path / "checkpoints" / "last.pt"
    before = last.read_bytes()
    assert len(before) > 1 << 20  # the limit bites

    script = tmp_path / "child.py"
    script.write_text(CHILD.format(root=str(ROOT), tests=str(ROOT / "tests")))
    done = subprocess.run(
        [sys.executable, str(script), "train", "--params", str(PARAMS), *_sets(overrides)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert "Traceback" not in done.stderr
    assert len(errors) == 1
    assert f"cannot write {last}: the file is larger than allowed" in errors[0]
    assert last.read_bytes() == before  # the previous good checkpoint stays
    assert not [p for p in tmp_path.rglob("*.tmp")]  # and no temp file


def test_failed_save_model_leaves_no_temp_file(tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    code = CHILD.split("from polydet import cli")[0] + (
        "from helpers import tiny_cfg\n"
        "from polydet.model import build_model, save_model\n"
        "from polydet.core.errors import PolydetError\n"
        "cfg = tiny_cfg()\n"
        "try:\n"
        f"    save_model(build_model(cfg), {str(tmp_path / 'model.pt')!r}, cfg, ['a', 'b'], None)\n"
        "except PolydetError as e:\n"
        "    print(e); sys.exit(3)\n"
    )
    script.write_text(code.format(root=str(ROOT), tests=str(ROOT / "tests")))
    (tmp_path / "model.pt").write_bytes(b"the previous model")
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 3, done.stderr
    assert "model.pt: the file is larger than allowed" in done.stdout
    assert (tmp_path / "model.pt").read_bytes() == b"the previous model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["child.py", "model.pt"]


def _raw_dataset(tmp_path: Path) -> list[str]:
    raw = tmp_path / "raw"
    sets = [
        f"synth.out={raw}", "synth.num_images=8", "synth.image_width=64",
        "synth.image_height=64", f"data.root={raw}",
    ]  # fmt: skip
    assert cli.main(["synth", "--params", str(PARAMS), *_sets(sets)]) == 0
    return sets


def test_failed_prepare_leaves_the_previous_dataset_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    sets = [*_raw_dataset(tmp_path), f"data.out={tmp_path / 'prepared'}"]
    prepare(load_config(PARAMS, sets))
    out = tmp_path / "prepared"
    before = _digests(out)
    stale = tmp_path / f".prepared.staging-{_dead_pid()}"  # a killed run's
    stale.mkdir()

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "stats.json"))

    # A new split (different images.csv) that fails after the tables are written.
    monkeypatch.setattr(manifest, "write_report", disk_full)
    with pytest.raises(PolydetError, match="stats.json: the disk is full"):
        prepare(load_config(PARAMS, [*sets, "data.split.seed=7"]))
    assert _digests(out) == before
    left = sorted(p.name for p in tmp_path.iterdir() if p.name != ".polydet.lock")
    assert left == ["prepared", "raw"]  # no staging directory, the stale one removed


# --- case 8: read-only output directories --------------------------------------------------


def test_read_only_output_directories_give_one_line(
    prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    ro = tmp_path / "ro"
    real_mkdir = os.mkdir

    def mkdir(path: str | os.PathLike, *args: object, **kwargs: object) -> None:
        if str(path).startswith(str(ro)):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        real_mkdir(path, *args, **kwargs)

    raw_sets = _raw_dataset(tmp_path)
    model = tmp_path / "model"
    train(tiny_config(prepared, model, "train.max_steps=1"))
    monkeypatch.setattr(os, "mkdir", mkdir)
    base = tiny_overrides(prepared, model, "train.max_steps=1")
    runs = {
        "prepare": ["prepare", *_sets([*raw_sets, f"data.out={ro / 'prepared'}"])],
        "train": ["train", *_sets([*base, f"train.out={ro / 'train'}"])],
        "evaluate": [
            "evaluate", "--model", str(model / "model.pt"),
            *_sets([*base, "evaluate.split=val", f"evaluate.out={ro / 'eval'}"]),
        ],
        "predict": [
            "predict", str(prepared / "images"), "--model", str(model / "model.pt"),
            "--out", str(ro / "predict"), *_sets(base),
        ],
    }  # fmt: skip
    for name, argv in runs.items():
        code = cli.main([argv[0], "--params", str(PARAMS), *argv[1:]])
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if "error:" in line]
        assert code == 2, (name, err)
        assert len(lines) == 1, (name, err)
        assert f"polydet {name}: error: " in lines[0]
        assert f"{ro}" in lines[0] and "read-only (Read-only file system)" in lines[0], lines[0]
    assert not ro.exists()


# --- case 9: Ctrl-C ------------------------------------------------------------------------


def test_ctrl_c_names_the_last_checkpoint_and_the_resume_command(
    prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    real_loss = PolyDetector.loss
    calls = {"train": 0}

    def ctrl_c_at_step_4(self: PolyDetector, images: list, targets: list) -> dict:
        if self.training:
            calls["train"] += 1
            if calls["train"] == 4:
                raise KeyboardInterrupt
        return real_loss(self, images, targets)

    monkeypatch.setattr(PolyDetector, "loss", ctrl_c_at_step_4)
    overrides = tiny_overrides(prepared, tmp_path, "train.checkpoint_every=2")
    try:
        code = cli.main(["train", "--params", str(PARAMS), *_sets(overrides)])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C ended in a KeyboardInterrupt traceback")
    err = capsys.readouterr().err
    assert code == 130
    last = tmp_path / "checkpoints" / "last.pt"
    assert f"interrupted at step 3 of 10; last checkpoint {last} (step 2)" in err
    assert "polydet train --resume last" in err
    assert not [p for p in tmp_path.rglob("*.tmp")]
    monkeypatch.setattr(PolyDetector, "loss", real_loss)
    summary = json.loads(json.dumps(train(load_config(PARAMS, overrides), resume="last")))
    assert summary["steps"] == 10
