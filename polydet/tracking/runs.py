"""MLflow runs and lineage: one parent run per pipeline run (params, lineage tags, metrics,
every stage's reports as artifacts), with one nested run per stage.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import yaml
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException

from polydet.core.config import Config, flatten, flatten_dict, to_dict
from polydet.core.errors import TrackingError
from polydet.core.store import connect, get_tracking_uri, store_message
from polydet.stages.table import STAGES as STAGE_TABLE

TAG = "polydet."  # prefix of every tag this module writes
STAGES = tuple(s.name for s in STAGE_TABLE)  # one nested run each, in this order


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
    from polydet.model.device import resolve_device as device_of

    return device_of("auto").type


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
    """Per stage: its summary file and output directory (what gets logged; the stage table)."""
    return {s.name: {"summary": s.summary(cfg), "dir": s.artifacts(cfg)} for s in STAGE_TABLE}


# Large or already-versioned outputs that are not worth copying into every run.
_SKIP_ARTIFACTS = {s.name: s.skip_artifacts for s in STAGE_TABLE if s.skip_artifacts}


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
