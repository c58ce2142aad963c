"""A model reference (a file, ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/...``)
to a local ``model.pt``: registry models are downloaded once per version under
``outputs/models/`` (the model-URI download cache).
"""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException

from polydet.core.errors import ModelError
from polydet.core.store import check_reachable, get_tracking_uri, store_message

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
    key, download = resolve_uri(client, uri, store)
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


def resolve_uri(client: mlflow.MlflowClient, uri: str, store: str) -> tuple[str, Any]:
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
