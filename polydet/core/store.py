"""The MLflow store: its address (``MLFLOW_TRACKING_URI``, else ``cfg.tracking.default_uri``),
a fast reachability check, one-line store errors, and :func:`connect`.

In ``core`` because evaluation, prediction and export resolve ``models:/`` URIs
(:mod:`polydet.core.model_uri`) below the tracking layer; nothing here knows a model.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import mlflow
import yaml
from mlflow.exceptions import MlflowException

from polydet.core.config import Config
from polydet.core.errors import TrackingError

FALLBACK_URI = "sqlite:///mlruns/mlflow.db"  # when neither the env nor params.yaml names one
REACH_TIMEOUT_S = 3.0

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
