"""The registered model from the clients' side: a fresh shell, `mlflow models serve`, curl.

One module-scoped store holds a registered tiny (untrained) model. The commands the pipeline
prints and the README shows then run as a user types them: in a subprocess whose environment
has none of this test session's variables (a new shell after `. .venv/bin/activate`), from the
project directory. The last test loads the model with nothing but the distributions its own
``requirements.txt`` names (and what they depend on), without the project's source tree.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from packaging.requirements import Requirement

from polydet import cli, tracking
from polydet.core.config import load_config
from polydet.pipeline.flow import SMOKE_OVERRIDES

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def fresh_shell_env() -> dict[str, str]:
    """A new shell's environment: none of the MLFLOW_*, PREFECT_*, TORCH_HOME... variables
    this session sets, the venv's bin first on PATH (as `. .venv/bin/activate` does).
    PYTHONPATH is kept when the session has one (a worktree testing its own sources);
    telemetry stays off because these machines have no network."""
    env = {k: v for k, v in os.environ.items() if k in {"HOME", "LANG", "LC_ALL", "PYTHONPATH"}}
    env["PATH"] = f"{BIN}{os.pathsep}/usr/local/bin:/usr/bin:/bin"
    env |= {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    return env


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, mlflow_db: Path) -> Path:
    """A project directory whose default store holds ``polydet`` v1 (champion) and an image."""
    from PIL import Image

    from polydet.model import build_model, save_model

    path = tmp_path_factory.mktemp("clients")
    (path / "mlruns").mkdir()
    shutil.copy(mlflow_db, path / "mlruns" / "mlflow.db")
    raw = (ROOT / "params.yaml").read_text()
    (path / "params.yaml").write_text(raw)
    cfg = load_config(ROOT / "params.yaml", list(SMOKE_OVERRIDES))
    save_model(build_model(cfg.model), path / "model.pt", cfg.model, cfg.data.classes, None)
    Image.new("RGB", (96, 80), (120, 140, 90)).save(path / "photo.png")
    old, saved = os.getcwd(), os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.chdir(path)
    try:
        record = tracking.register_model(cfg, path / "model.pt", {"map50": 0.25})
    finally:
        os.chdir(old)
        if saved is not None:
            os.environ["MLFLOW_TRACKING_URI"] = saved
    assert (record["version"], record["champion"]) == ("1", "1")
    # The package travels with the model, without bytecode (loading it later may add some).
    code = _model_dir(path) / "code" / "polydet"
    assert (code / "tracking" / "registry.py").is_file() and not list(code.rglob("__pycache__"))
    # Another process set MLflow's global URI (as the pipeline does); the shells below must
    # not depend on it.
    mlflow.set_tracking_uri(f"sqlite:///{path / 'elsewhere.db'}")
    return path


def _sh(cmd: str, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-c", cmd],
        cwd=cwd,
        env=fresh_shell_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _readme_block(after: str, lang: str) -> str:
    """The first ```lang block of the README after the text ``after``."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index(f"```{lang}\n", readme.index(after)) + len(f"```{lang}\n")
    return readme[start : readme.index("```", start)]


def test_champion_on_onnx_runtime_as_the_readme_says(project: Path, monkeypatch):
    """README (Deployment): `polydet predict ... --runtime onnx` on the champion's URI, and the
    Python snippet that loads the champion and runs it on ONNX Runtime and on torch, in a
    fresh shell; ONNX Runtime's detections match torch's (the export's parity rule)."""
    import torch

    from polydet.deploy.export import compare_detections

    commands = _readme_block("Load the champion on ONNX Runtime", "bash").strip().splitlines()
    assert (
        commands[0] == "polydet predict photo.png --model models:/polydet@champion --runtime onnx"
    )
    done = _sh(f"{commands[0]} --out outputs/predict-onnx --score-thresh 0.05", project, 600)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["runtime"] == "onnx"
    # The reference: the same command on torch (in this process: a shell costs minutes here),
    # the model alone as on ONNX Runtime (which leaves out the default TTA's 45-degree view).
    monkeypatch.chdir(project)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    args = [*commands[0].split()[1:], "--out", "outputs/predict-torch", "--score-thresh", "0.05"]
    args += ["--set", "evaluate.tta.enabled=false"]
    assert cli.main([a if a != "onnx" else "torch" for a in args]) == 0
    docs = {
        r: json.loads((project / f"outputs/predict-{r}/detections.json").read_text())["images"]
        for r in ("onnx", "torch")
    }

    def tensors(record: dict) -> dict:
        dets = record["detections"]
        return {
            "polyboxes": torch.tensor([d["polybox"] for d in dets]).view(-1, 10),
            "scores": torch.tensor([d["score"] for d in dets]),
            "labels": torch.tensor([d["label"] for d in dets], dtype=torch.int64),
        }

    report = compare_detections(
        [tensors(r) for r in docs["torch"]], [tensors(r) for r in docs["onnx"]]
    )
    assert report["ok"] and report["checked"] > 0, report

    snippet = _readme_block("Load the champion on ONNX Runtime", "python")
    guard = "\nimport sys\nassert 'torch' not in sys.modules  # ONNX Runtime alone\n"
    on_torch = 'on_torch = model.predict(frame, params={"runtime": "torch"})'
    assert on_torch in snippet  # the guard runs before it
    first, rest = snippet.split(on_torch, 1)
    done = _sh(f"python - <<'EOF'\n{first}{guard}{on_torch}{rest}EOF", project, 600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "card" in done.stdout or "plate" in done.stdout or "kite" in done.stdout


def test_predict_champion_in_a_fresh_shell(project: Path):
    done = _sh(
        "polydet predict photo.png --model models:/polydet@champion --score-thresh 0", project
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert (project / result["model"]).read_bytes() == (project / "model.pt").read_bytes()
    assert not (project / "mlflow.db").exists()  # no stray store beside the project's


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_up(proc: subprocess.Popen, port: int, deadline_s: float = 120) -> None:
    import requests

    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the server exited with {proc.returncode}: {proc.stderr.read()}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/ping", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            time.sleep(0.5)
    pytest.fail(f"no answer on port {port} after {deadline_s} s")


@pytest.mark.parametrize("how", ["polydet serve", "mlflow models serve"])
def test_serve_the_champion_as_the_readme_says(project: Path, how: str):
    """README: start the server, write payload.json with `polydet payload`, post it with curl;
    a bad payload is an HTTP 400 that says what was wrong."""
    port = _free_port()
    serve = {
        "polydet serve": f"exec polydet serve --port {port}",
        "mlflow models serve": "export MLFLOW_TRACKING_URI=sqlite:///mlruns/mlflow.db && exec "
        f"mlflow models serve -m models:/polydet@champion --env-manager local "
        f"-h 127.0.0.1 -p {port}",
    }[how]
    proc = subprocess.Popen(
        ["bash", "-c", serve],
        cwd=project,
        env=fresh_shell_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_until_up(proc, port)
        made = _sh("polydet payload photo.png > payload.json", project)
        assert made.returncode == 0, made.stderr
        post = (
            f"curl -s -w '\\n%{{http_code}}' 127.0.0.1:{port}/invocations "
            "-H 'Content-Type: application/json' -d @payload.json"
        )
        answer = _sh(post, project)
        body, status = answer.stdout.rsplit("\n", 1)
        assert status == "200", body
        (served,) = json.loads(body)["predictions"]
        model = mlflow.pyfunc.load_model(str(_model_dir(project)))
        frame = pd.DataFrame({"image": [tracking.encode_image(project / "photo.png")]})
        expected = model.predict(frame)
        assert len(served["scores"]) == len(expected["scores"][0])
        assert served["scores"] == pytest.approx(list(expected["scores"][0]), abs=1e-4)

        bad = {"dataframe_split": {"columns": ["image"], "data": [["not an image!"]]}}
        (project / "bad.json").write_text(json.dumps(bad))
        answer = _sh(post.replace("@payload.json", "@bad.json"), project)
        body, status = answer.stdout.rsplit("\n", 1)
        assert status == "400", body
        message = json.loads(body)["message"]
        assert "image 0" in message and "base64" in message
        assert "Traceback" not in body and "binascii" not in body
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert not (project / "mlflow.db").exists()


def _model_dir(project: Path, dst: Path | None = None) -> Path:
    """The registered model's artifacts (MLmodel, code/, requirements.txt): where they are
    stored, or a copy in ``dst``."""
    store = f"sqlite:///{project / 'mlruns' / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=store, registry_uri=store)
    location = client.get_model_version_download_uri("polydet", "1")
    dst_path = None if dst is None else str(dst)
    return Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=location, dst_path=dst_path, tracking_uri=store
        )
    )


# --- the model outside the project --------------------------------------------------------


def requirement_closure(lines: list[str]) -> set[str]:
    """Installed distributions a ``requirements.txt`` pulls in: each requirement, and what
    its metadata requires (markers evaluated here, extras followed), transitively."""
    from importlib import metadata

    found: set[str] = set()
    todo = [(Requirement(line), "") for line in lines if line.strip() and line[0] != "#"]
    while todo:
        req, extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": extra}):
            continue
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            continue  # optional elsewhere, absent here: nothing to link
        name = dist.metadata["Name"].lower().replace("_", "-")
        key = f"{name}[{','.join(sorted(req.extras))}]"
        if key in found:
            continue
        found.add(key)
        for sub in dist.requires or []:
            todo.append((Requirement(sub), ""))
            todo += [(Requirement(sub), e) for e in req.extras]
    return {k.split("[")[0] for k in found}


def site_of(names: set[str], dst: Path) -> Path:
    """A site-packages holding only ``names``' files (symlinks to the installed ones)."""
    from importlib import metadata

    dst.mkdir(parents=True)
    for name in names:
        dist = metadata.distribution(name)
        base = Path(dist.locate_file(""))
        tops = {Path(f).parts[0] for f in dist.files or []} - {"..", "__pycache__"}
        for top in tops:
            if (base / top).exists() and not (dst / top).exists():
                (dst / top).symlink_to(base / top)
    return dst


_LOAD = """
import json, sys
site, model_dir, image = sys.argv[1:]
sys.path.insert(0, site)
import mlflow.pyfunc, pandas as pd
model = mlflow.pyfunc.load_model(model_dir)
from polydet.tracking import encode_image  # on sys.path only through the model's code/
out = model.predict(pd.DataFrame({"image": [encode_image(image)]}))
files = [getattr(m, "__file__", None) for m in list(sys.modules.values())]
print(json.dumps({"polydet": sys.modules["polydet"].__file__, "scores": list(out["scores"][0]),
                  "files": sorted({f for f in files if f}), "torch": "torch" in sys.modules}))
"""


def test_registered_model_loads_with_its_own_requirements_only(project: Path, tmp_path: Path):
    """`python -I -S` (no site-packages, no .pth files, no PYTHONPATH, not run from the
    project) with a sys.path of the model directory and a site-packages made of the
    distributions its requirements.txt pulls in: polydet must come from the model's code/."""
    model_dir = _model_dir(project, tmp_path / "model")
    lines = (model_dir / "requirements.txt").read_text().split()
    assert {Requirement(x).name for x in lines} == {*tracking.MODEL_REQUIREMENTS}
    names = requirement_closure(lines)
    assert "polydet" not in names and {"torch", "mlflow", "pandas"} <= names
    site = site_of(names, tmp_path / "site")
    away = tmp_path / "away"
    away.mkdir()
    done = subprocess.run(
        [
            sys.executable,
            "-I",
            "-S",
            "-c",
            _LOAD,
            str(site),
            str(model_dir),
            str(project / "photo.png"),
        ],
        cwd=away,
        env=fresh_shell_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.splitlines()[-1])
    assert Path(got["polydet"]).is_relative_to(model_dir / "code")
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    allowed = (site.resolve(), model_dir.resolve(), stdlib)
    foreign = [
        f
        for f in got["files"]
        if Path(f).is_absolute()  # torch.ops / torch.classes name "_ops.py", "_classes.py"
        and not any(Path(f).resolve().is_relative_to(a) for a in allowed)
        and not Path(f).is_relative_to(site)
    ]
    assert not foreign, foreign[:5]
    model = mlflow.pyfunc.load_model(str(model_dir))
    frame = pd.DataFrame({"image": [tracking.encode_image(project / "photo.png")]})
    assert got["scores"] == pytest.approx(list(model.predict(frame)["scores"][0]), abs=1e-5)


def test_onnx_runtime_needs_no_torch(project: Path, tmp_path: Path):
    """The registered model's default runtime (ONNX Runtime on its logged export) loads and
    predicts with the distributions of its requirements.txt but torch and torchvision: torch
    is never imported, and the scores are those of the same model in this process."""
    model_dir = _model_dir(project, tmp_path / "model")
    lines = (model_dir / "requirements.txt").read_text().split()
    slim = [x for x in lines if Requirement(x).name not in {"torch", "torchvision"}]
    assert len(slim) == len(lines) - 2
    names = requirement_closure(slim)
    assert not {"torch", "torchvision"} & names and "onnxruntime" in names
    site = site_of(names, tmp_path / "site")
    away = tmp_path / "away"
    away.mkdir()
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-c", _LOAD, str(site), str(model_dir),
         str(project / "photo.png")],
        cwd=away, env=fresh_shell_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.splitlines()[-1])
    assert got["torch"] is False and Path(got["polydet"]).is_relative_to(model_dir / "code")
    model = mlflow.pyfunc.load_model(str(model_dir))
    frame = pd.DataFrame({"image": [tracking.encode_image(project / "photo.png")]})
    expected = model.predict(frame, params={"runtime": "onnx"})["scores"][0]
    assert len(got["scores"]) == len(expected) > 0
    assert got["scores"] == pytest.approx(list(expected), abs=1e-6)
