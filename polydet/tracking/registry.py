"""The model registry: register a version, the promotion gate (``champion`` / ``challenger``
aliases), promote and roll back by hand, and the DVC ``register`` stage.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from polydet.core.config import Config, to_dict
from polydet.core.errors import DataError, ModelError, TrackingError
from polydet.core.files import file_sha256, write_text
from polydet.core.store import connect, get_tracking_uri, store_message
from polydet.tracking.pyfunc import _MODEL_CODE, _example_image, _pip_requirements, model_signature
from polydet.tracking.runs import (
    TAG,
    _client,
    launch_tags,
    log_pipeline_outputs,
    params_hash,
    pipeline_run,
    run_name,
)

CHAMPION, CHALLENGER = "champion", "challenger"


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
    the ONNX status (:func:`polydet.deploy.export.export_for_registry`)."""
    from mlflow.models import Model

    from polydet.deploy.export import export_for_registry

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
            Path(__file__).resolve().parents[1],  # the polydet package
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
    from polydet.core.locks import file_lock

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
