"""DVC: ``dvc.yaml`` is generated from the stage table (the flow's stages), and ``dvc repro``
works in a copy of the repo.

The repro test copies the working tree (tracked and untracked, not ignored files) into a
temporary git repository with the smoke settings in its ``params.yaml``, generates and
``dvc add``-s the synthetic data, and runs ``dvc repro`` three times: everything, nothing
(up to date), and after one evaluation setting changed (only ``evaluate`` and ``register``).
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from polydet.core.config import load_config
from polydet.pipeline.dvc_yaml import render
from polydet.pipeline.flow import SMOKE_OVERRIDES
from polydet.stages.table import STAGES

ROOT = Path(__file__).resolve().parents[1]
# Plumbing around the stages, not stage logic: editing them must not rerun training.
# Modules that do not shape a stage's results (files.py writes bytes it is given atomically).
PLUMBING = {
    "polydet/cli.py", "polydet/tracking/__init__.py", "polydet/deploy/predict.py",
    "polydet/core/errors.py", "polydet/core/files.py", "polydet/core/locks.py",
    "polydet/core/store.py", "polydet/core/model_uri.py",  # resolve models:/ URIs
}  # fmt: skip


def _dvc_stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _paths(entries: list) -> list[str]:
    """Paths of a dvc.yaml ``deps``/``outs``/``metrics``/``plots`` list (str or {path: opts})."""
    return [e if isinstance(e, str) else next(iter(e)) for e in entries or []]


def _covered(path: str, by: list[str]) -> bool:
    p = Path(path)
    return any(p == Path(b) or Path(b) in p.parents for b in by)


def test_committed_dvc_yaml_is_the_generated_one():
    """``dvc.yaml`` is ``polydet dvc-yaml``'s output for the committed table and params.yaml."""
    expected = render(load_config(ROOT / "params.yaml"), ROOT)
    assert (ROOT / "dvc.yaml").read_text() == expected, "run `polydet dvc-yaml` and commit it"


def test_dvc_yaml_command_writes_and_checks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from polydet import cli

    monkeypatch.chdir(ROOT)  # params.yaml and data.dvc of the project
    out = tmp_path / "dvc.yaml"
    out.write_text((ROOT / "dvc.yaml").read_text().replace("polydet/eval\n", ""))
    assert cli.main(["dvc-yaml", "--check", "--out", str(out)]) == 2  # stale: says so
    assert "polydet/eval\n" not in out.read_text()  # --check writes nothing
    assert cli.main(["dvc-yaml", "--out", str(out)]) == 0
    assert out.read_text() == (ROOT / "dvc.yaml").read_text()
    assert cli.main(["dvc-yaml", "--check", "--out", str(out)]) == 0


def test_dvc_yaml_mirrors_the_flow_stages():
    dvc = _dvc_stages()
    assert list(dvc) == [s.name for s in STAGES] + ["register"]
    cfg = load_config(ROOT / "params.yaml")
    for stage in STAGES:
        spec = dvc[stage.name]
        assert spec["cmd"] == f"polydet {stage.name}"
        assert spec["params"] == list(stage.params), stage.name
        deps = _paths(spec["deps"])
        assert [d for d in deps if d.startswith("polydet/")] == list(stage.code), stage.name
        data_deps = [d for d in deps if not d.startswith("polydet/")]
        for dep in stage.deps(cfg):
            assert _covered(dep, data_deps), f"{stage.name}: {dep} is not a dvc.yaml dep"
        produced = [_paths(spec.get(k)) for k in ("outs", "metrics", "plots")]
        produced = [p for group in produced for p in group]
        for out in stage.outs(cfg):
            assert _covered(out, produced), f"{stage.name}: {out} is not a dvc.yaml output"
    assert dvc["register"]["cmd"] == "polydet register"
    assert dvc["register"]["params"] == ["tracking"]


def _module_file(module: str) -> Path | None:
    base = ROOT / Path(*module.split("."))
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path) -> set[str]:
    """polydet modules imported anywhere in a file (lazy imports in functions included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m.split(".")[0] == "polydet"}


def _closure(module: str) -> set[str]:
    """Source files (relative to the repo) a module may run, plumbing left out."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        path = _module_file(todo.pop())
        if path is None:
            continue
        rel = path.relative_to(ROOT).as_posix()
        if rel in seen or rel in PLUMBING:
            continue
        seen.add(rel)
        todo += sorted(_imports(path))
    return seen


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.name)
def test_code_deps_cover_what_the_stage_imports(stage):
    """Editing any module a stage runs must invalidate it (in DVC and in Prefect's cache)."""
    import inspect

    (module,) = re.findall(r"from (polydet[\w.]*) import", inspect.getsource(stage.run))
    files = _closure(module)
    assert files, f"{module} not found"
    missing = sorted(f for f in files if not _covered(f, list(stage.code)) and "__init__" not in f)
    assert not missing, f"{stage.name}: add {missing} to its code deps"


# --- dvc repro in a copy ---------------------------------------------------------------------


def _set(raw: dict, item: str) -> None:
    dotted, text = item.split("=", 1)
    *parents, last = dotted.split(".")
    node = raw
    for p in parents:
        node = node[p]
    node[last] = yaml.safe_load(text)


def _sh(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def _ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([\w-]+)'", output))


def _copy_repo(tmp_path: Path, mlflow_db: Path) -> tuple[Path, dict, dict[str, str], list[str]]:
    """The working tree in a new git repository with the smoke settings in its params.yaml
    and the synthetic data (``dvc add``-ed), committed: (repo, params, env, dvc command)."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    repo = tmp_path / "repo"
    for rel in filter(None, listed.split("\0")):
        src = ROOT / rel
        if src.is_file() and not rel.startswith(("data/", "outputs/")):
            (repo / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, repo / rel)
    (repo / "data.dvc").unlink(missing_ok=True)
    (repo / "mlruns").mkdir()
    shutil.copy(mlflow_db, repo / "mlruns" / "mlflow.db")
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    for item in SMOKE_OVERRIDES:
        _set(raw, item)
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env |= {
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    dvc = [str(Path(sys.executable).parent / "dvc")]
    _sh(["git", "init", "-q"], repo, env)
    if not (repo / ".dvc").is_dir():
        _sh([*dvc, "init", "-q"], repo, env)
    _sh(["polydet", "synth"], repo, env)
    _sh([*dvc, "add", "-q", "data"], repo, env)
    _sh(["git", "add", "-A"], repo, env)
    _sh(["git", "commit", "-qm", "copy"], repo, env)
    return repo, raw, env, dvc


@pytest.mark.slow
def test_dvc_repro_in_a_copy(tmp_path: Path, mlflow_db: Path):
    repo, raw, env, dvc = _copy_repo(tmp_path, mlflow_db)

    first = _sh([*dvc, "repro"], repo, env)
    assert _ran(first) == {"prepare", "anchors", "train", "evaluate", "debug", "register"}
    record = json.loads((repo / "outputs/register/registration.json").read_text())
    assert (record["version"], record["champion"]) == ("1", "1")
    assert (repo / "dvc.lock").is_file()

    second = _sh([*dvc, "repro"], repo, env)
    assert _ran(second) == set() and "up to date" in second

    metrics = json.loads(_sh([*dvc, "metrics", "show", "--json"], repo, env))
    assert "map50" in json.dumps(metrics)

    # One setting changed: only its stage is out of date (the ones after it follow from
    # their changed inputs when it reruns; tests/test_pipeline.py runs that for the flow).
    raw["evaluate"]["precision_targets"] = [0.5, 0.7]  # read by evaluate alone
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    status = json.loads(_sh([*dvc, "status", "--json"], repo, env))
    assert set(status) == {"evaluate"}
    assert status["evaluate"] == [{"changed deps": {"params.yaml": {"evaluate": "modified"}}}]


@pytest.mark.slow
def test_dvc_is_up_to_date_after_the_flow(
    tmp_path: Path, mlflow_db: Path, prefect_harness: str, monkeypatch: pytest.MonkeyPatch
):
    """After the Prefect flow (as `make demo` runs it: settings from params.yaml), DVC has
    the same record: `dvc status` is clean and `dvc repro` runs nothing; the .pyc files
    Python writes on import do not count as changed code."""
    import polydet.pipeline.flow as fp

    repo, raw, env, dvc = _copy_repo(tmp_path, mlflow_db)
    shutil.rmtree(repo / ".dvc" / "cache")  # as in a fresh clone: no cache, no data/
    shutil.rmtree(repo / "data")
    monkeypatch.chdir(repo)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    record = fp.polydet_pipeline(params="params.yaml", overrides=[])
    assert record["version"] == "1"
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert set(lock) == {s.name for s in STAGES} | {"register"}
    model_md5 = next(o["md5"] for o in lock["train"]["outs"] if o["path"].endswith("model.pt"))
    assert model_md5 == hashlib.md5((repo / "outputs/train/model.pt").read_bytes()).hexdigest()

    (repo / "polydet" / "data" / "__pycache__").mkdir(exist_ok=True)
    (repo / "polydet" / "data" / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"\0")
    assert json.loads(_sh([*dvc, "status", "--json"], repo, env)) == {}
    again = _sh([*dvc, "repro"], repo, env)
    assert _ran(again) == set(), again

    # What `dvc metrics show` and `dvc plots show` display: the headline numbers only; each
    # plot once, the loss plot from separate train and validation files.
    metrics = json.loads(_sh([*dvc, "metrics", "show", "--json"], repo, env))
    shown = json.dumps(metrics)
    assert "headline.json" in shown and "map50" in shown and "ap50/" not in shown
    plots = json.loads(_sh([*dvc, "plots", "show", "--json"], repo, env))
    names = list(plots.get("data", plots))
    for png in ("pr_curves.png", "score_hist.png", "confusion.png"):
        assert sum(png in name for name in names) == 1, names
    loss = json.dumps(plots.get("data", plots)["loss"])
    assert "history_train.csv" in loss and "history_val.csv" in loss
    ignored = subprocess.run(["git", "check-ignore", "-q", "dvc_plots"], cwd=repo, env=env)
    assert ignored.returncode == 0

    # A run with other settings than params.yaml's must not claim them in dvc.lock.
    before = (repo / "dvc.lock").read_text()
    fp.polydet_pipeline(params="params.yaml", overrides=["debug.num_images=1"])
    assert (repo / "dvc.lock").read_text() == before
    status = json.loads(_sh([*dvc, "status", "--json"], repo, env))
    assert set(status) == {"debug", "register"}, status


def test_only_runs_with_params_yaml_settings_are_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from polydet.pipeline.dvc_record import record_in_dvc, why_not_recorded

    monkeypatch.chdir(tmp_path)
    shutil.copy(ROOT / "params.yaml", "params.yaml")
    cfg = load_config("params.yaml")
    assert why_not_recorded(cfg) == "no DVC project in the working directory"
    Path("dvc.yaml").write_text("stages: {}\n")
    Path(".dvc").mkdir()
    assert why_not_recorded(cfg) is None
    other = load_config("params.yaml", ["train.lr=0.5", "debug.num_images=2"])
    reason = why_not_recorded(other)
    assert reason is not None and "debug.num_images, train.lr" in reason
    assert record_in_dvc(other, "train") == f"dvc.lock: train not recorded: {reason}"
