"""Two pipelines (or stages) at once in one project: the second refuses, naming the first
(survey case 3). The survey's two ``make demo`` runs both exited 0 with interleaved
``history.csv``, two versions of the same weights and a Prefect migration traceback.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from polydet import cli
from polydet.core.locks import project_lock
from polydet.pipeline import flow as pipeline

ROOT = Path(__file__).resolve().parents[2]

HOLDER = r"""
import sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
from polydet.core.locks import project_lock
with project_lock():
    print("locked", flush=True)
    while not Path("release").exists():
        time.sleep(0.02)
"""


@pytest.fixture
def holder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Another process (``python holder.py``) holding the project lock of ``tmp_path``."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "holder.py").write_text(HOLDER.format(root=str(ROOT)))
    proc = subprocess.Popen(
        [sys.executable, "holder.py"], cwd=tmp_path, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "locked"
    yield proc
    (tmp_path / "release").touch()
    proc.wait(timeout=60)


def test_a_stage_refuses_while_another_run_holds_the_project(
    holder: subprocess.Popen, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    params = str(ROOT / "params.yaml")
    assert cli.main(["prepare", "--params", params]) == 2
    err = capsys.readouterr().err
    assert f"in use by pid {holder.pid}" in err
    assert "command: holder.py" in err and "started 20" in err
    assert not (tmp_path / "outputs").exists()  # nothing was written
    # The pipeline refuses before Prefect (or anything else) starts.
    assert pipeline.main(["--params", params]) == 2
    assert f"in use by pid {holder.pid}" in capsys.readouterr().err
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "mlruns").exists()


def test_the_lock_is_free_again_when_its_holder_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "holder.py").write_text(HOLDER.format(root=str(ROOT)))
    proc = subprocess.Popen([sys.executable, "holder.py"], cwd=tmp_path, stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"locked"
    proc.kill()  # as a kill -9 would: the kernel releases the lock
    proc.wait(timeout=60)
    with project_lock(), project_lock():  # free, and re-entrant within a process
        pass
