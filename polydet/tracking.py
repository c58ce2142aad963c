"""MLflow tracking and registry: one run per pipeline run, lineage, model versions, aliases.

The pipeline's record is rebuilt from what the stages wrote to disk, so the Prefect flow and
the DVC ``register`` stage log exactly the same things:

- one parent run per pipeline run (params flattened from ``params.yaml``, lineage tags,
  per-step training metrics, evaluation metrics, every stage's reports as artifacts, system
  metrics when ``psutil`` is present) with one nested run per stage (its summary metrics);
- the model as an ``mlflow.pyfunc`` wrapper (images in, polyboxes out) registered as a new
  version of ``cfg.tracking.model_name`` with the alias ``challenger``; it becomes
  ``champion`` only if its AP50 beats the champion's by ``cfg.tracking.promote_margin``.

The store is ``MLFLOW_TRACKING_URI`` when set, else ``cfg.tracking.default_uri`` (SQLite
inside ``mlruns/``). An unreachable server fails within seconds with a
:class:`~polydet.errors.TrackingError` naming the URI, before anything is written to it.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import yaml
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from polydet.config import Config, flatten, flatten_dict, to_dict
from polydet.errors import DataError, ModelError, TrackingError
from polydet.files import write_text

FALLBACK_URI = "sqlite:///mlruns/mlflow.db"  # when neither the env nor params.yaml names one
CHAMPION, CHALLENGER = "champion", "challenger"
TAG = "polydet."  # prefix of every tag this module writes
REACH_TIMEOUT_S = 3.0
STAGES = ("prepare", "anchors", "train", "evaluate", "debug")

# Why these defaults: MLflow retries an HTTP request 7 times with exponential backoff (minutes
# of waiting on a dead server); Prefect's task retries already cover transient failures.
_MLFLOW_ENV_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
}


# --- connection ----------------------------------------------------------------------------


def get_tracking_uri(cfg: Config | None = None) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else ``cfg.tracking.default_uri`` (or params.yaml's).

    A relative SQLite path is made absolute: MLflow caches one database engine per URI
    string, so ``sqlite:///mlruns/mlflow.db`` would otherwise keep pointing at the first
    directory it was opened from.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI") or ""
    if not uri and cfg is not None:
        uri = cfg.tracking.default_uri
    if not uri:  # the project's own default when called without a config
        try:
            uri = str(yaml.safe_load(Path("params.yaml").read_text())["tracking"]["default_uri"])
        except (OSError, yaml.YAMLError, KeyError, TypeError):
            uri = FALLBACK_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    return uri


def check_reachable(uri: str, timeout: float = REACH_TIMEOUT_S) -> None:
    """Raise :class:`TrackingError` naming ``uri`` unless its store can be used.

    HTTP(S) servers get one short request to ``/health`` (any HTTP answer but a 5xx counts as
    reachable); a SQLite store needs its directory to be creatable.
    """
    if uri.startswith(("http://", "https://")):
        import requests

        try:
            answer = requests.get(uri.rstrip("/") + "/health", timeout=timeout)
        except requests.RequestException as e:
            raise TrackingError(
                f"MLflow tracking server {uri} is unreachable ({type(e).__name__}: {e}); "
                "start it or unset MLFLOW_TRACKING_URI to use the local SQLite store"
            ) from e
        if answer.status_code >= 500:
            raise TrackingError(
                f"MLflow tracking server {uri} answered HTTP {answer.status_code} to /health"
            )
    elif uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TrackingError(f"MLflow store {uri}: cannot create {db.parent}: {e}") from e
        # SQLite writes a journal beside the database: both must be writable.
        for path in (db.parent, db) if db.exists() else (db.parent,):
            if not os.access(path, os.W_OK):
                raise TrackingError(f"MLflow store {uri}: {path} is not writable (read-only?)")


def store_message(e: MlflowException) -> str:
    """The first line of an MLflow store error, without SQLAlchemy's SQL dump."""
    text = (e.message or str(e)).strip()
    text = text.split("\n[SQL:", 1)[0].split("\n", 1)[0]
    return re.sub(r"^\((sqlite3|psycopg2|pymysql)\.\w+\) ", "", text)


def connect(cfg: Config) -> str:
    """Point MLflow at the configured store, check it answers, create the experiment.

    Returns the experiment id. Call it before any stage runs so that a dead server fails the
    pipeline within seconds.
    """
    for key, value in _MLFLOW_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    uri = get_tracking_uri(cfg)
    check_reachable(uri)
    # MLflow logs every database error with its traceback and SQL before raising it; the
    # TrackingError raised here says it in one line.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = mlflow.MlflowClient()
    try:
        exp = client.get_experiment_by_name(cfg.tracking.experiment)
        if exp is not None:
            experiment_id = exp.experiment_id
        else:
            location = None
            if uri.startswith("sqlite:///"):
                # Artifacts beside the database, so mlruns/ holds the whole store.
                db = Path(uri.removeprefix("sqlite:///")).resolve()
                location = (db.parent / "artifacts").as_uri()
            experiment_id = client.create_experiment(
                cfg.tracking.experiment, artifact_location=location
            )
        # Logged models go to the current experiment, not their run's: keep them together.
        mlflow.set_experiment(experiment_id=experiment_id)
    except MlflowException as e:
        raise TrackingError(f"MLflow store {uri}: {store_message(e)}") from e
    return experiment_id


# --- lineage -------------------------------------------------------------------------------


def params_hash(cfg: Config) -> str:
    """SHA-256 of the whole configuration (canonical JSON): equal hashes, equal settings."""
    return hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode()).hexdigest()


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", *args], capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def data_dvc_md5(path: str | Path = "data.dvc") -> str:
    """The ``md5`` that ``data.dvc`` records for ``data/`` (``"absent"`` without the file)."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
        return str(raw["outs"][0]["md5"])
    except (OSError, yaml.YAMLError, KeyError, IndexError, TypeError):
        return "absent"


def resolve_device(cfg: Config) -> str:
    """The device training uses for ``cfg.train.device`` (``auto``: CUDA when present)."""
    if cfg.train.device != "auto":
        return cfg.train.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def launch_tags() -> dict[str, str]:
    """How a run outside the Prefect flow was started: ``dvc exp run`` (its experiment name and
    baseline commit), ``dvc repro`` (DVC sets ``DVC_STAGE``) or a ``polydet`` command."""
    env = os.environ
    if env.get("DVC_EXP_NAME"):
        return {
            TAG + "orchestrator": "dvc exp run",
            TAG + "dvc_exp_name": env["DVC_EXP_NAME"],
            TAG + "dvc_exp_baseline": env.get("DVC_EXP_BASELINE_REV", "unknown"),
        }
    if env.get("DVC_STAGE"):
        return {TAG + "orchestrator": "dvc repro"}
    return {TAG + "orchestrator": "cli"}


def run_name(cfg: Config, origin: str) -> str:
    """A run name a person can read in the runs table: how it started, what it trained, on
    which commit, e.g. ``prefect-amber-fox resnet18_fpn-192px 4c46550``."""
    commit = _git("rev-parse", "--short", "HEAD") or "no-git"
    if commit != "no-git" and _git("status", "--porcelain", "--untracked-files=no"):
        commit += "-dirty"
    return f"{origin} {cfg.model.backbone}-{cfg.model.min_size}px {commit}"


def lineage_tags(cfg: Config) -> dict[str, str]:
    """Tags that say exactly what produced a run: code, data, settings, device."""
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {
        TAG + "git_commit": commit or "unknown",
        TAG + "git_dirty": "unknown" if status is None else str(bool(status)).lower(),
        TAG + "data_dvc_md5": data_dvc_md5(),
        TAG + "params_hash": params_hash(cfg),
        TAG + "device": resolve_device(cfg),
    }


# --- runs ----------------------------------------------------------------------------------


def _client() -> mlflow.MlflowClient:
    return mlflow.MlflowClient()


def _psutil_present() -> bool:
    try:
        import psutil  # noqa: F401
    except ImportError:
        return False
    return True


@contextmanager
def pipeline_run(
    cfg: Config, run_name: str | None = None, tags: Mapping[str, str] | None = None
) -> Iterator[str]:
    """Open the pipeline's parent run (params, lineage tags, system metrics); yield its id.

    The run ends ``FINISHED``, or ``FAILED`` (with the error as a tag) if the body raises.
    It is handled through the client by id, never as MLflow's thread-local active run, so
    that tasks on any thread can log to it.
    """
    experiment_id = connect(cfg)
    from mlflow.tracking.context.registry import resolve_tags

    client = _client()
    all_tags = resolve_tags({**lineage_tags(cfg), TAG + "kind": "pipeline", **(tags or {})})
    try:
        run = client.create_run(experiment_id, run_name=run_name, tags=all_tags)
        run_id = run.info.run_id
        client.log_batch(
            run_id, params=[Param(k, _param_value(v)) for k, v in flatten(cfg).items()]
        )
    except MlflowException as e:
        raise TrackingError(f"MLflow store {get_tracking_uri(cfg)}: {store_message(e)}") from e
    monitor = None
    if _psutil_present():
        # Its start/stop INFO lines would interleave with the pipeline's own log.
        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=5)
        monitor.start()
    try:
        yield run_id
    except BaseException as e:
        _end_run(client, run_id, "FAILED", monitor, error=f"{type(e).__name__}: {e}")
        raise
    _end_run(client, run_id, "FINISHED", monitor)


def _end_run(
    client: mlflow.MlflowClient, run_id: str, status: str, monitor: Any, error: str = ""
) -> None:
    if monitor is not None:
        monitor.finish()
    try:
        if error:
            client.set_tag(run_id, TAG + "error", error[:4000])
        client.set_terminated(run_id, status=status)
    except MlflowException:
        if not error:  # keep the original error when the store itself is what failed
            raise


def _param_value(v: Any) -> str:
    text = json.dumps(v) if isinstance(v, list | dict) else str(v)
    return text[:6000]  # MLflow's limit on a param value


def numeric_metrics(d: Mapping[str, Any], prefix: str) -> dict[str, float]:
    """The finite numbers of a nested summary, as ``prefix + dotted.key`` metric names."""
    out = {}
    for key, value in flatten_dict(dict(d)).items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if value == value and abs(value) != float("inf"):
            out[_metric_name(prefix + key)] = float(value)
    return out


def _metric_name(name: str) -> str:
    return re.sub(r"[^\w\-. /:]", "_", name)


def read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def stage_files(cfg: Config) -> dict[str, dict[str, Path]]:
    """Per stage: its summary file and output directory (what gets logged)."""
    return {
        "prepare": {"summary": Path(cfg.data.out) / "stats.json", "dir": Path(cfg.data.out)},
        "anchors": {
            "summary": Path(cfg.anchors.out) / "coverage.json",
            "dir": Path(cfg.anchors.out),
        },
        "train": {"summary": Path(cfg.train.out) / "summary.json", "dir": Path(cfg.train.out)},
        "evaluate": {
            "summary": Path(cfg.evaluate.out) / "metrics.json",
            "dir": Path(cfg.evaluate.out),
        },
        "debug": {"summary": Path(cfg.debug.out) / "debug.json", "dir": Path(cfg.debug.out)},
    }


# Large or already-versioned outputs that are not worth copying into every run.
_SKIP_ARTIFACTS = {
    "prepare": ("images.csv", "objects.csv", "tiles"),
    "train": ("model.pt", "checkpoints"),
}


def history_metrics(history_csv: Path) -> list[Metric]:
    """Per-step metrics from ``history.csv``: ``train/<column>`` and ``val/<column>``.

    Rows with a ``split``/``phase`` column of ``val`` are validation rows; every other
    numeric column becomes one metric per step (the ``step`` column), stamped with the row's
    ``time`` when there is one, so that runs compare under the same names.
    """
    if not history_csv.exists():
        return []
    df = pd.read_csv(history_csv)
    if df.empty:
        return []
    kind_col = next((c for c in ("split", "phase", "kind") if c in df.columns), None)
    step_col = "step" if "step" in df.columns else None
    skip = {kind_col, step_col, "epoch", "time", "timestamp", "wall_time"}
    now_ms = int(time.time() * 1000)
    metrics = []
    for i, row in df.iterrows():
        kind = str(row[kind_col]) if kind_col else "train"
        prefix = "val/" if kind.startswith("val") else f"{kind}/"
        step = int(row[step_col]) if step_col else int(i)
        stamp = next((row[c] for c in ("time", "timestamp", "wall_time") if c in df.columns), None)
        ts = int(float(stamp) * 1000) if _is_number(stamp) and float(stamp) > 1e9 else now_ms
        for col in df.columns:
            if col in skip or not _is_number(row[col]) or (prefix == "val/" and col == "lr"):
                continue
            metrics.append(Metric(_metric_name(prefix + str(col)), float(row[col]), ts, step))
    return metrics


def _is_number(x: Any) -> bool:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return False
    return v == v and abs(v) != float("inf")


def log_pipeline_outputs(
    cfg: Config, run_id: str, cached: Mapping[str, bool] | None = None
) -> dict[str, Any]:
    """Log every stage's outputs (as written on disk) to the parent run ``run_id``.

    Parent run: per-step training metrics, each stage's summary numbers as
    ``<stage>/<key>`` metrics (evaluation as ``<split>/<key>``), each stage's reports under
    ``<stage>/``. One nested run per stage carries its summary metrics and whether it was
    served from the cache. Returns ``{"run_id", "metrics"}`` (the evaluation metrics).
    """
    client = _client()
    run = client.get_run(run_id)
    now_ms = int(time.time() * 1000)
    files = stage_files(cfg)
    all_metrics: list[Metric] = history_metrics(Path(cfg.train.out) / "history.csv")
    for stage in STAGES:
        summary = read_json(files[stage]["summary"])
        prefix = f"{cfg.evaluate.split}/" if stage == "evaluate" else f"{stage}/"
        numbers = numeric_metrics(summary, prefix)
        all_metrics += [Metric(k, v, now_ms, 0) for k, v in numbers.items()]
        child = client.create_run(
            run.info.experiment_id,
            run_name=stage,
            tags={
                "mlflow.parentRunId": run_id,
                TAG + "stage": stage,
                TAG + "cached": str(bool((cached or {}).get(stage, False))).lower(),
            },
        )
        client.log_batch(
            child.info.run_id, metrics=[Metric(k, v, now_ms, 0) for k, v in numbers.items()]
        )
        if files[stage]["summary"].exists():
            client.log_artifact(child.info.run_id, str(files[stage]["summary"]))
        client.set_terminated(child.info.run_id)
        _log_dir(client, run_id, files[stage]["dir"], stage, _SKIP_ARTIFACTS.get(stage, ()))
    client.log_batch(run_id, metrics=all_metrics)
    _log_dataset(cfg, client, run_id)
    return {"run_id": run_id, "metrics": read_json(files["evaluate"]["summary"])}


def _log_dataset(cfg: Config, client: mlflow.MlflowClient, run_id: str) -> None:
    """The prepared image list as the run's dataset input (the runs table's Dataset column):
    named after ``data.root``, its digest from the content, its source the data directory."""
    images = Path(cfg.data.out) / "images.csv"
    if not images.is_file():
        return
    from mlflow.entities import DatasetInput, InputTag

    df = pd.read_csv(images)
    dataset = mlflow.data.from_pandas(
        df, source=str(Path(cfg.data.root).resolve()), name=Path(cfg.data.root).name
    )
    context = InputTag("mlflow.data.context", "train")
    client.log_inputs(run_id, [DatasetInput(dataset._to_mlflow_entity(), [context])])


def _log_dir(
    client: mlflow.MlflowClient, run_id: str, directory: Path, dest: str, skip: tuple[str, ...]
) -> None:
    if not directory.is_dir():
        return
    for item in sorted(directory.iterdir()):
        if item.name in skip:
            continue
        if item.is_dir():
            client.log_artifacts(run_id, str(item), f"{dest}/{item.name}")
        else:
            client.log_artifact(run_id, str(item), dest)


# --- the model -----------------------------------------------------------------------------


class PolydetPyfunc(mlflow.pyfunc.PythonModel):
    """A polydet model as an MLflow pyfunc: images in, polyboxes, scores and labels out.

    Input: a DataFrame with a string column ``image``, each a base64-encoded image file
    (PNG/JPEG) or a path readable by the server. Output: one row per image with
    ``polyboxes`` (K×10, image pixels), ``scores`` (K), ``labels`` (K, 1-based) and
    ``classes`` (K names). Parameter ``score_thresh`` (default 0.0) drops weaker detections;
    ``runtime`` (``onnx`` or ``torch``; default ``onnx`` when the model carries its ONNX
    export) picks ONNX Runtime or torch (:class:`polydet.onnx_runtime.Runtimes`).
    Test-time augmentation follows ``evaluate.tta`` as it was when the model was logged
    (torch runtime only; ONNX Runtime runs the exported graph as it is).
    """

    def load_context(self, context: Any) -> None:
        from polydet.onnx_runtime import Runtimes

        config = getattr(context, "model_config", None)
        self.runtimes = Runtimes(
            context.artifacts, config, wrap=lambda model: _with_logged_tta(model, config)
        )
        self.classes = self.runtimes.classes

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        thresh = float((params or {}).get("score_thresh", 0.0))
        images = []
        for i, value in enumerate(model_input["image"]):
            try:
                images.append(decode_array(value))
            except DataError as e:
                # MLflow's scoring server answers HTTP 400 with this message (any other
                # error would be a 400 with a stack trace and no word of what was wrong).
                raise MlflowException(f"image {i}: {e}", INVALID_PARAMETER_VALUE) from None
        try:
            outputs = self.runtimes.detect(images, (params or {}).get("runtime"))
        except ModelError as e:  # an unknown runtime, or onnx on a model without it
            raise MlflowException(str(e), INVALID_PARAMETER_VALUE) from None
        rows = []
        for out in outputs:
            keep = out["scores"] >= thresh
            labels = out["labels"][keep].tolist()
            rows.append(
                {
                    "polyboxes": out["polyboxes"][keep].astype("float64").tolist(),
                    "scores": out["scores"][keep].astype("float64").tolist(),
                    "labels": [int(x) for x in labels],
                    "classes": [self._name(int(x)) for x in labels],
                }
            )
        return pd.DataFrame(rows, columns=["polyboxes", "scores", "labels", "classes"])

    def _name(self, label: int) -> str:
        return self.classes[label - 1] if 0 < label <= len(self.classes) else str(label)


def _with_logged_tta(model: Any, model_config: Mapping[str, Any] | None) -> Any:
    """The model with the test-time augmentation logged with it (``evaluate.tta`` when it was
    registered; none for models logged before the setting existed)."""
    from polydet.config import tta_config_from_dict
    from polydet.tta import with_tta

    raw = (model_config or {}).get("tta")
    return with_tta(model, tta_config_from_dict(raw)) if raw else model


def model_signature(runtime: str = "torch") -> Any:
    """The pyfunc model's interface: ``image`` strings in; polyboxes, scores, labels out;
    params ``score_thresh`` and ``runtime`` (default ``runtime``)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array

    return ModelSignature(
        inputs=Schema([ColSpec(DataType.string, "image")]),
        outputs=Schema(
            [
                ColSpec(Array(Array(DataType.double)), "polyboxes"),
                ColSpec(Array(DataType.double), "scores"),
                ColSpec(Array(DataType.long), "labels"),
                ColSpec(Array(DataType.string), "classes"),
            ]
        ),
        params=ParamSchema(
            [
                ParamSpec("score_thresh", DataType.double, 0.0),
                ParamSpec("runtime", DataType.string, runtime),
            ]
        ),
    )


def decode_image(value: str | bytes) -> Any:
    """An image from a path or base64 bytes as a ``[3,H,W]`` float tensor in [0,1], read by
    the one image reader (:mod:`polydet.data.images`: orientation, modes, size limit).

    Raises :class:`DataError` saying what the value is not (a path, base64, an image).
    """
    import torch

    return torch.from_numpy(decode_array(value)).permute(2, 0, 1).contiguous()


def decode_array(value: str | bytes) -> Any:
    """:func:`decode_image` as a numpy ``[H, W, 3]`` float32 array (no torch needed)."""
    import binascii

    from polydet.data.images import read_rgb

    if not isinstance(value, str | bytes):
        raise DataError(f"expected a string (base64 image bytes or a path), got {value!r:.60}")
    if isinstance(value, str) and _is_file(value):
        arr = read_rgb(value)
    else:
        try:
            raw = value if isinstance(value, bytes) else base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as e:
            raise DataError(
                f"{value[:40]!r}{'...' if len(value) > 40 else ''} is neither a file the "
                f"server can read nor base64 image bytes ({e}); send base64 of a PNG or JPEG "
                "file (polydet payload IMAGE > payload.json writes such a request)"
            ) from None
        arr = read_rgb(raw)
    return arr


def _is_file(text: str) -> bool:
    """Whether ``text`` names a file (base64 text is usually too long to be a file name)."""
    try:
        return len(text) < 4096 and Path(text).is_file()
    except (OSError, ValueError):  # ENAMETOOLONG, embedded NUL
        return False


def encode_image(path: str | Path) -> str:
    """Base64 text of an image file, as the pyfunc model's ``image`` column takes it."""
    try:
        return base64.b64encode(Path(path).read_bytes()).decode("ascii")
    except OSError as e:
        raise DataError(f"{path}: cannot read image file: {e.strerror or e}") from e


def serving_payload(paths: list[str | Path], score_thresh: float | None = None) -> dict:
    """The JSON body of a request to the served model (``mlflow models serve``): one row per
    image file, base64-encoded; ``score_thresh`` as the request's parameter when given."""
    rows = [[encode_image(p)] for p in paths]
    body: dict[str, Any] = {"dataframe_split": {"columns": ["image"], "data": rows}}
    if score_thresh is not None:
        body["params"] = {"score_thresh": float(score_thresh)}
    return body


def _example_image(cfg: Config) -> str:
    """Base64 PNG of one prepared image (the evaluation split first), else a blank one."""
    images = Path(cfg.data.out) / "images.csv"
    if images.exists():
        df = pd.read_csv(images)
        if not df.empty:
            df = df.sort_values("split", key=lambda s: s != cfg.evaluate.split)
            for path in df["path"]:
                if Path(path).is_file():
                    return encode_image(path)
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (cfg.model.min_size, cfg.model.min_size)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


_MODEL_CODE = """\
import mlflow

from polydet.tracking import PolydetPyfunc

mlflow.models.set_model(PolydetPyfunc())
"""


# What loading and running the pyfunc model imports (polydet itself is bundled as code):
# tests/test_model_package.py loads a registered model with these distributions alone.
MODEL_REQUIREMENTS = (
    "torch",
    "torchvision",
    "numpy",
    "pandas",
    "pillow",
    "pyyaml",
    "mlflow",
    "onnxruntime",  # the default runtime of a model that carries its ONNX export
)


def _pip_requirements() -> list[str]:
    # Explicit and pinned to what is installed (inferring them imports the model, ~10 s).
    names = MODEL_REQUIREMENTS
    out = []
    for name in names:
        try:
            out.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            out.append(name)
    return out


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def ap50(metrics: Mapping[str, Any]) -> float:
    """The polygon AP50 of an evaluation summary: DOTA's ``map50``, else COCO-style.

    ``map50`` exists when ``evaluate.iou_threshold`` is 0.5; ``map50_coco`` always does.
    """
    for key in ("map50", "map50_coco"):
        value = metrics.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    raise DataError("evaluation metrics have no numeric 'map50' nor 'map50_coco'")


def register_model(
    cfg: Config, model_path: str | Path, metrics: Mapping[str, Any], run_id: str | None = None
) -> dict[str, Any]:
    """Log ``model_path`` as a pyfunc model, register it, give it ``challenger``, gate it.

    Idempotent: a model file and metrics already registered (same content hashes) reuse
    their version instead of adding one. ``run_id`` is the pipeline run to attach the model
    to (a new run is opened when it is ``None``). Returns the registration record:
    ``{"model_name", "version", "new", "run_id", "model_uri", "map50", "promotion"}``.
    """
    model_path = Path(model_path)
    if not model_path.is_file():
        raise ModelError(f"{model_path}: no model file to register")
    if run_id is None:
        with pipeline_run(cfg, run_name="register") as rid:
            return register_model(cfg, model_path, metrics, run_id=rid)
    connect(cfg)
    client = _client()
    name = cfg.tracking.model_name
    score = ap50(metrics)
    key = hashlib.sha256(
        (file_sha256(model_path) + json.dumps(dict(metrics), sort_keys=True)).encode()
    ).hexdigest()
    try:
        existing = _find_version(client, name, TAG + "registration_key", key)
        if existing is not None:
            client.set_tag(run_id, TAG + "model_version", existing)
            client.set_tag(run_id, TAG + "registration", "reused an identical version")
            return {
                "model_name": name,
                "version": existing,
                "new": False,
                "run_id": run_id,
                "model_uri": f"models:/{name}/{existing}",
                "map50": score,
                "promotion": {"promoted": False, "reason": "identical model already registered"},
                "champion": _alias_version(client, name, CHAMPION),
                "onnx": client.get_model_version(name, existing).tags.get(TAG + "onnx", "-"),
            }
        version, onnx_status = _log_and_register(cfg, client, model_path, metrics, run_id)
        for k, v in {
            "registration_key": key,
            "map50": f"{score:.6f}",
            "eval_split": cfg.evaluate.split,
            "params_hash": params_hash(cfg),
            "run_id": run_id,
        }.items():
            client.set_model_version_tag(name, version, TAG + k, v)
        client.set_registered_model_alias(name, CHALLENGER, version)
        client.set_tag(run_id, TAG + "model_version", version)
        promotion = promote_if_better(cfg, version, score)
    except MlflowException as e:
        raise TrackingError(f"MLflow registry {get_tracking_uri(cfg)}: {store_message(e)}") from e
    return {
        "model_name": name,
        "version": version,
        "new": True,
        "run_id": run_id,
        "model_uri": f"models:/{name}/{version}",
        "map50": score,
        "promotion": promotion,
        "champion": _alias_version(client, name, CHAMPION),
        "onnx": onnx_status,
    }


def _log_and_register(
    cfg: Config,
    client: mlflow.MlflowClient,
    model_path: Path,
    metrics: Mapping[str, Any],
    run_id: str,
) -> tuple[str, str]:
    """Log the pyfunc model (with its checked ONNX export) and register it: its version and
    the ONNX status (:func:`polydet.export.export_for_registry`)."""
    from mlflow.models import Model

    from polydet.export import export_for_registry

    example = pd.DataFrame({"image": [_example_image(cfg)]})
    with tempfile.TemporaryDirectory() as tmp:
        onnx = export_for_registry(cfg, model_path, Path(tmp) / "onnx")
        # "Models from code": the model is this module's class, named in a tiny script
        # (no pickled object to trust when loading).
        code = Path(tmp) / "polydet_pyfunc.py"
        code.write_text(_MODEL_CODE)
        # The polydet package travels with the model (MLflow puts it on sys.path when
        # loading), so the model loads wherever its requirements.txt installs.
        bundle = Path(tmp) / "code" / "polydet"
        shutil.copytree(
            Path(__file__).resolve().parent,
            bundle,
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
        )
        # Model.log with an explicit run_id: pyfunc.log_model would need MLflow's
        # thread-local active run, which this module never relies on.
        info = Model.log(
            artifact_path=None,
            name="model",
            flavor=mlflow.pyfunc,
            run_id=run_id,
            python_model=str(code),
            code_paths=[str(bundle)],
            artifacts={"model": str(model_path), **onnx.artifacts},
            signature=model_signature(onnx.runtime),
            # read by load_context
            model_config={
                "runtime": onnx.runtime,
                "device": "auto",
                "tta": to_dict(cfg.evaluate.tta),
            },
            input_example=example,  # MLflow checks the model answers it when logging
            pip_requirements=_pip_requirements(),
            tags={TAG + "map50": str(ap50(metrics))},
        )
    # The registry shows a version's metrics from its logged model: the headline numbers.
    now_ms = int(time.time() * 1000)
    split = cfg.evaluate.split
    client.log_batch(
        run_id,
        metrics=[
            Metric(f"{split}/{k}", float(metrics[k]), now_ms, 0, model_id=info.model_id)
            for k in ("map50", "map75", "map50_95", "map50_coco")
            if isinstance(metrics.get(k), int | float) and not isinstance(metrics.get(k), bool)
        ]
        + [Metric(k, v, now_ms, 0, model_id=info.model_id) for k, v in onnx.metrics.items()],
        params=[Param(k, v) for k, v in onnx.params.items()],
        tags=[RunTag(TAG + "onnx", onnx.status)],
    )
    version = mlflow.register_model(
        info.model_uri,
        cfg.tracking.model_name,
        tags={TAG + "run_id": run_id, TAG + "onnx": onnx.status},
    )
    return str(version.version), onnx.status


def _find_version(client: mlflow.MlflowClient, name: str, tag: str, value: str) -> str | None:
    """The version of ``name`` whose tag ``tag`` is ``value``, if any."""
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return None
    return next((str(v.version) for v in versions if v.tags.get(tag) == value), None)


def _alias_version(client: mlflow.MlflowClient, name: str, alias: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


# --- promotion -----------------------------------------------------------------------------


def decide_promotion(new_ap: float, champion_ap: float | None, margin: float) -> tuple[bool, str]:
    """Whether a challenger with AP50 ``new_ap`` replaces a champion with ``champion_ap``.

    It must beat the champion by more than ``margin`` (strictly); no champion means yes.
    """
    if champion_ap is None:
        return True, f"no champion yet; AP50 {new_ap:.4f}"
    if new_ap > champion_ap + margin:
        return True, f"AP50 {new_ap:.4f} beats champion's {champion_ap:.4f} by more than {margin}"
    return False, f"AP50 {new_ap:.4f} does not beat champion's {champion_ap:.4f} by {margin}"


def _version_ap(client: mlflow.MlflowClient, name: str, version: str) -> float | None:
    mv = client.get_model_version(name, version)
    value = mv.tags.get(TAG + "map50")
    if value is None and mv.run_id:  # a version registered by hand: its run's metric
        split = mv.tags.get(TAG + "eval_split", "test")
        value = client.get_run(mv.run_id).data.metrics.get(f"{split}/map50")
    return None if value is None else float(value)


def _crown(client: mlflow.MlflowClient, name: str, version: str, reason: str) -> str | None:
    """Give ``version`` the champion alias; tag the old champion with when and why."""
    old = _alias_version(client, name, CHAMPION)
    if old == version:
        return old
    now = datetime.now(UTC).isoformat(timespec="seconds")
    if old is not None:
        client.set_model_version_tag(name, old, TAG + "replaced_at", now)
        client.set_model_version_tag(name, old, TAG + "replaced_by", version)
        client.set_model_version_tag(name, old, TAG + "replaced_reason", reason)
        client.set_model_version_tag(name, version, TAG + "previous_champion", old)
    client.set_model_version_tag(name, version, TAG + "champion_since", now)
    client.set_model_version_tag(name, version, TAG + "champion_reason", reason)
    client.set_registered_model_alias(name, CHAMPION, version)
    return old


def promotion_lock_path(uri: str) -> Path:
    """The lock file that makes the promotion gate atomic for the store ``uri``.

    A SQLite store: ``<db>.promotion.lock`` beside the database, so every process using that
    store shares it. Any other store (an ``mlflow server``): a file under ``mlruns/`` named
    after the URI, which serializes the promotions started from this machine only; a server
    store shared by several machines needs promotions run from one place (one pipeline at
    a time, as ``prefect.yaml``'s concurrency limit does) or that file on a shared disk.
    """
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        return db.with_name(db.name + ".promotion.lock")
    digest = hashlib.sha256(uri.encode()).hexdigest()[:12]
    return Path("mlruns") / f".promotion-{digest}.lock"


@contextmanager
def promotion_lock(cfg: Config | None = None) -> Iterator[None]:
    """Hold the promotion gate's lock (waiting for it) for the ``with`` body."""
    from polydet.locks import file_lock

    uri = get_tracking_uri(cfg)
    with file_lock(promotion_lock_path(uri), wait=True, what="the promotion gate", record=False):
        yield


def promote_if_better(cfg: Config, version: str, new_ap: float) -> dict[str, Any]:
    """Apply the promotion gate to a freshly registered ``version`` with AP50 ``new_ap``.

    Read champion, compare, set alias happen under :func:`promotion_lock`, so two runs
    finishing together are judged one after the other. After crowning, the alias is read
    back: should another writer (a store the lock does not cover) have moved it meanwhile,
    the gate is applied again against that version.
    """
    client = _client()
    name = cfg.tracking.model_name
    promoted, reason, previous = False, "already champion", None
    with promotion_lock(cfg):
        for _ in range(3):
            champion = _alias_version(client, name, CHAMPION)
            champion_ap = None if champion is None else _version_ap(client, name, champion)
            if champion is not None and champion_ap is None:
                champion_ap = float("-inf")  # a champion with no recorded AP50 loses to any
            if champion == version:  # crowned meanwhile by a re-check of ours
                break
            promoted, reason = decide_promotion(new_ap, champion_ap, cfg.tracking.promote_margin)
            client.set_model_version_tag(name, version, TAG + "gate", reason)
            previous = _crown(client, name, version, reason) if promoted else None
            if not promoted or _alias_version(client, name, CHAMPION) == version:
                break
    return {"promoted": promoted, "reason": reason, "previous_champion": previous}


def promote(cfg: Config, version: str, reason: str = "promoted by hand") -> dict[str, Any]:
    """Make ``version`` the champion by hand (the gate is not applied)."""
    connect(cfg)
    client = _client()
    name = cfg.tracking.model_name
    try:
        client.get_model_version(name, str(version))
    except MlflowException as e:
        raise TrackingError(f"{name} has no version {version} in {get_tracking_uri(cfg)}") from e
    with promotion_lock(cfg):
        previous = _crown(client, name, str(version), reason)
    return {"model_name": name, "champion": str(version), "previous_champion": previous}


def rollback(cfg: Config, reason: str = "rolled back by hand") -> dict[str, Any]:
    """Give the champion alias back to the version the current champion replaced."""
    connect(cfg)
    with promotion_lock(cfg):
        return _rollback(cfg, reason)


def _rollback(cfg: Config, reason: str) -> dict[str, Any]:
    client = _client()
    name = cfg.tracking.model_name
    current = _alias_version(client, name, CHAMPION)
    if current is None:
        raise TrackingError(f"{name} has no champion to roll back in {get_tracking_uri(cfg)}")
    previous = client.get_model_version(name, current).tags.get(TAG + "previous_champion")
    if previous is None:
        raise TrackingError(f"{name} champion v{current} replaced no earlier champion")
    try:
        target = client.get_model_version(name, previous)
    except MlflowException as e:
        raise TrackingError(f"{name} v{previous} (the previous champion) is gone") from e
    now = datetime.now(UTC).isoformat(timespec="seconds")
    client.set_model_version_tag(name, current, TAG + "replaced_at", now)
    client.set_model_version_tag(name, current, TAG + "replaced_by", previous)
    client.set_model_version_tag(name, current, TAG + "replaced_reason", reason)
    client.set_model_version_tag(name, previous, TAG + "champion_since", now)
    client.set_model_version_tag(name, previous, TAG + "champion_reason", reason)
    client.set_registered_model_alias(name, CHAMPION, target.version)
    return {"model_name": name, "champion": str(target.version), "rolled_back_from": current}


# --- model URIs ----------------------------------------------------------------------------


def resolve_model_path(
    uri: str, tracking_uri: str | None = None, filename: str = "model.pt"
) -> Path:
    """Local path of the ``model.pt`` (or ``filename``, e.g. ``model.onnx``) behind a file
    path or a ``models:/``/``runs:/`` URI.

    Registry models are downloaded once per version under ``outputs/models/``; the store is
    ``tracking_uri``, else ``MLFLOW_TRACKING_URI``, else the project's default. Every MLflow
    call here names that store explicitly (a client, an artifact location), so the result
    does not depend on a global URI set earlier in the process: a fresh shell resolves the
    same model as the pipeline that registered it.
    Raises :class:`ModelError` naming the URI when there is no such model.
    """
    if not uri.startswith(("models:/", "runs:/")):
        path = Path(uri)
        if not path.exists():
            raise ModelError(f"{uri}: no such model file")
        return path
    store = tracking_uri or get_tracking_uri()
    if store.startswith("sqlite:///") and not Path(store.removeprefix("sqlite:///")).exists():
        raise ModelError(f"{uri}: no MLflow store at {store}")
    check_reachable(store)
    client = mlflow.MlflowClient(tracking_uri=store, registry_uri=store)
    key, download = _resolve_uri(client, uri, store)
    dst = Path("outputs/models") / f"{key}-{hashlib.sha256(store.encode()).hexdigest()[:8]}"
    if not dst.exists():
        tmp = dst.with_name(dst.name + ".part")  # renamed when complete: never half a model
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            download(str(tmp))
        except (MlflowException, OSError) as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ModelError(f"{uri}: cannot download from {store}: {e}") from e
        tmp.rename(dst)
    found = sorted(dst.rglob(filename))
    if not found:
        raise ModelError(f"{uri}: the downloaded artifacts hold no {filename}")
    return found[0]


def _resolve_uri(client: mlflow.MlflowClient, uri: str, store: str) -> tuple[str, Any]:
    """A cache name for ``uri`` (it names the resolved version, so it changes when an alias
    moves) and a function that downloads its artifacts into a directory."""
    m = re.fullmatch(r"models:/([^/@]+)(?:@([^/]+)|/(\d+))/?", uri)
    if m:
        name, alias, number = m.groups()
        try:
            if alias:
                number = client.get_model_version_by_alias(name, alias).version
            location = client.get_model_version_download_uri(name, str(number))
        except MlflowException as e:
            raise ModelError(f"{uri}: not in the registry at {store}: {store_message(e)}") from e

        def download(dst: str) -> None:
            mlflow.artifacts.download_artifacts(
                artifact_uri=location, dst_path=dst, tracking_uri=store
            )

        return f"{name}-v{number}", download
    m = re.fullmatch(r"runs:/([^/]+)/?(.*)", uri)
    if not m:
        raise ModelError(
            f"{uri}: expected models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID/PATH"
        )
    run_id, path = m.groups()

    def download_run(dst: str) -> None:
        client.download_artifacts(run_id, path.strip("/"), dst)

    return re.sub(r"[^\w.-]", "_", f"{run_id}/{path}".strip("/")), download_run


def serve_command(
    cfg: Config, model_uri: str, host: str = "127.0.0.1", port: int = 5001
) -> tuple[list[str], dict[str, str]]:
    """The ``mlflow models serve`` command for ``model_uri`` and the environment it needs.

    MLflow resolves ``models:/`` URIs against ``MLFLOW_TRACKING_URI`` (in a shell without it,
    against a new ``./mlflow.db``), so the environment names the project's store. Raises
    :class:`ModelError` when the registry has no such model.
    """
    import sys

    store = get_tracking_uri(cfg)
    if model_uri.startswith("models:/"):
        if store.startswith("sqlite:///") and not Path(store[len("sqlite:///") :]).exists():
            raise ModelError(f"{model_uri}: no MLflow store at {store}")
        check_reachable(store)
        _resolve_uri(mlflow.MlflowClient(tracking_uri=store, registry_uri=store), model_uri, store)
    env = {**_MLFLOW_ENV_DEFAULTS, **os.environ, "MLFLOW_TRACKING_URI": store}
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri]
    return [*cmd, "--env-manager", "local", "-h", host, "-p", str(port)], env


# --- the DVC register stage ----------------------------------------------------------------


def registration_path(cfg: Config) -> Path:
    """Where the registration record of the last pipeline run is written."""
    return Path(cfg.tracking.out) / "registration.json"


def record_and_register(
    cfg: Config, cached: Mapping[str, bool] | None = None, run_id: str | None = None
) -> dict[str, Any]:
    """Log the pipeline's outputs and register its model; write ``registration.json``.

    This is the whole ``register`` stage: ``polydet register`` (DVC) calls it with no run
    (one is opened), the Prefect flow with its pipeline run.
    """
    if run_id is None:
        tags = launch_tags()
        origin = tags.get(TAG + "dvc_exp_name") or tags[TAG + "orchestrator"].replace(" ", "-")
        with pipeline_run(cfg, run_name(cfg, origin), tags) as rid:
            return record_and_register(cfg, cached, run_id=rid)
    try:
        logged = log_pipeline_outputs(cfg, run_id, cached)
    except MlflowException as e:
        raise TrackingError(f"MLflow store {get_tracking_uri(cfg)}: {store_message(e)}") from e
    record = register_model(cfg, Path(cfg.train.out) / "model.pt", logged["metrics"], run_id)
    record["tracking_uri"] = get_tracking_uri(cfg)
    record["experiment"] = cfg.tracking.experiment
    write_text(registration_path(cfg), json.dumps(record, indent=2, sort_keys=True) + "\n")
    return record


def run_link(cfg: Config, run_id: str) -> str:
    """A link to the run in the MLflow UI (``make ui`` serves the SQLite store on :5000)."""
    uri = get_tracking_uri(cfg)
    run = _client().get_run(run_id)
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{run.info.experiment_id}/runs/{run_id}"
