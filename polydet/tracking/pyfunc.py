"""The model as an MLflow pyfunc (images in, polyboxes out), its signature, request payloads
and the ``mlflow models serve`` command.
"""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException

from polydet.core.config import Config
from polydet.core.errors import DataError, ModelError
from polydet.core.model_uri import resolve_uri
from polydet.core.store import _MLFLOW_ENV_DEFAULTS, check_reachable, get_tracking_uri

# --- the model -----------------------------------------------------------------------------


class PolydetPyfunc(mlflow.pyfunc.PythonModel):
    """A polydet model as an MLflow pyfunc: images in, polyboxes, scores and labels out.

    Input: a DataFrame with a string column ``image``, each a base64-encoded image file
    (PNG/JPEG) or a path readable by the server. Output: one row per image with
    ``polyboxes`` (K×10, image pixels), ``scores`` (K), ``labels`` (K, 1-based),
    ``classes`` (K names), ``first_corner`` (K, the heading's corner index into the canonical
    ring, -1 unknown) and ``heading`` (K degrees in [0, 360), ``None`` where unknown:
    :mod:`polydet.geometry.heading`). Parameter ``score_thresh`` (default 0.0) drops weaker
    detections; ``runtime`` (``onnx`` or ``torch``; default ``onnx`` when the model carries
    its ONNX export) picks ONNX Runtime or torch (:class:`polydet.deploy.onnx_runtime.Runtimes`).
    """

    def load_context(self, context: Any) -> None:
        from polydet.deploy.onnx_runtime import Runtimes

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
            first, head = _heading_of(out)
            rows.append(
                {
                    "polyboxes": out["polyboxes"][keep].astype("float64").tolist(),
                    "scores": out["scores"][keep].astype("float64").tolist(),
                    "labels": [int(x) for x in labels],
                    "classes": [self._name(int(x)) for x in labels],
                    "first_corner": [int(x) for x in first[keep]],
                    "heading": [None if x != x else float(x) for x in head[keep]],  # NaN: None
                }
            )
        return pd.DataFrame(rows, columns=COLUMNS)

    def _name(self, label: int) -> str:
        return self.classes[label - 1] if 0 < label <= len(self.classes) else str(label)


COLUMNS = ["polyboxes", "scores", "labels", "classes", "first_corner", "heading"]


def _heading_of(out: Mapping[str, Any]) -> tuple[Any, Any]:
    """``first_corner [K]`` (int64, -1 unknown) and ``heading [K]`` (degrees, NaN unknown) of
    one image's detections (numpy): the model's, or unknown when it predicts no heading (a
    model without the head on torch, an ONNX export written before the heading)."""
    import numpy as np

    shape = np.shape(out["scores"])
    first = np.asarray(out.get("first_corner", np.full(shape, -1)), dtype=np.int64)
    head = np.asarray(out.get("heading", np.full(shape, np.nan)), dtype=np.float64)
    return first, np.where(first >= 0, head, np.nan)


def _with_logged_tta(model: Any, model_config: Mapping[str, Any] | None) -> Any:
    """The model with the test-time augmentation logged with it (``evaluate.tta`` when it was
    registered; none for models logged before the setting existed)."""
    from polydet.core.config import tta_config_from_dict
    from polydet.eval.tta import with_tta

    raw = (model_config or {}).get("tta")
    return with_tta(model, tta_config_from_dict(raw)) if raw else model


def model_signature(runtime: str = "torch") -> Any:
    """The pyfunc model's interface: ``image`` strings in; polyboxes, scores, labels,
    classes, first corners and headings out; params ``score_thresh`` and ``runtime``
    (default ``runtime``)."""
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
                ColSpec(Array(DataType.long), "first_corner"),
                ColSpec(Array(DataType.double), "heading"),
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
        resolve_uri(mlflow.MlflowClient(tracking_uri=store, registry_uri=store), model_uri, store)
    env = {**_MLFLOW_ENV_DEFAULTS, **os.environ, "MLFLOW_TRACKING_URI": store}
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri]
    return [*cmd, "--env-manager", "local", "-h", host, "-p", str(port)], env
