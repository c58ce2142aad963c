"""Exported models on ONNX Runtime, without torch: provider choice, sessions, the pyfunc's
runtimes.

* :func:`execution_providers` is the one place that picks ONNX Runtime's providers:
  ``CUDAExecutionProvider`` first when the device asks for CUDA (``auto``, ``cuda``,
  ``cuda:N``) and the installed ONNX Runtime has it (``onnxruntime-gpu``), always
  ``CPUExecutionProvider`` (last, as the fallback).
* :class:`OnnxModel` runs an export directory (``polydet export --format onnx``) on numpy
  arrays; :class:`polydet.deploy.export.OnnxDetector` is its torch-tensor face.
* :class:`Runtimes` is what the registered MLflow model (``polydet.tracking.PolydetPyfunc``)
  runs: ONNX Runtime on the export logged inside it (artifact ``onnx``) or torch on its
  ``model.pt``, chosen per call (``params={"runtime": "onnx" | "torch"}``). Only the
  runtime used is loaded, so the ONNX runtime works where torch is not installed.

Nothing here imports torch (the ``torch`` runtime does, when it is used).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from polydet.core.errors import ModelError

MODEL_FILE = "model.onnx"
INPUT = "images"
OUTPUTS = ("polyboxes", "scores", "labels", "first_corner", "heading")
# Exports written before the heading (issue 15) have only the first three outputs; their
# detections get first_corner -1 and heading NaN (unknown), as a model without the head.
OUTPUTS_BEFORE_HEADING = OUTPUTS[:3]
CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
RUNTIMES = ("onnx", "torch")

Provider = str | tuple[str, dict[str, Any]]


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError as e:
        raise ModelError("onnxruntime is not installed (pip install onnxruntime)") from e
    return onnxruntime


def execution_providers(
    device: str = "auto", available: Sequence[str] | None = None
) -> list[Provider]:
    """ONNX Runtime providers for ``device`` (``auto``, ``cpu``, ``cuda`` or ``cuda:N``), best
    first: CUDA (on GPU ``N``) when the device allows it and ``available`` (default:
    ``onnxruntime.get_available_providers()``) has it, then the CPU. A device that asks for
    CUDA where there is none gets the CPU and a warning on stderr."""
    if available is None:
        available = _ort().get_available_providers()
    device = str(device).strip().lower()
    if device != "auto" and device != "cpu" and not device.startswith("cuda"):
        raise ModelError(f"device {device!r}: expected auto, cpu, cuda or cuda:N")
    out: list[Provider] = []
    if device == "auto" or device.startswith("cuda"):
        if CUDA in available:
            index = device.partition(":")[2]
            out.append((CUDA, {"device_id": int(index)}) if index.isdigit() else CUDA)
        elif device.startswith("cuda"):
            print(
                f"polydet: warning: device {device} asked for CUDA, but ONNX Runtime has no "
                f"{CUDA} (install onnxruntime-gpu); running on the CPU",
                file=sys.stderr,
            )
    return [*out, CPU]


def session(path: str | Path, device: str = "auto") -> Any:
    """An ``onnxruntime.InferenceSession`` of ``path`` on :func:`execution_providers`'s
    providers; a :class:`ModelError` naming the file when ONNX Runtime cannot load it."""
    ort = _ort()
    options = ort.SessionOptions()
    options.log_severity_level = 3  # its warnings about unused initializers are noise
    try:
        return ort.InferenceSession(str(path), options, providers=execution_providers(device))
    except Exception as e:  # onnxruntime raises its own exception types
        raise ModelError(f"{path}: cannot be loaded by ONNX Runtime: {e}") from e


def read_config(directory: str | Path) -> dict[str, Any]:
    """``{"cfg": ModelConfig, "classes": [...], ...}`` from an export directory's
    ``config.json`` (a :class:`ModelError` naming the file if it is missing or broken)."""
    from polydet.core.config import model_config_from_dict

    path = Path(directory) / "config.json"
    try:
        raw = json.loads(path.read_text())
        return {**raw, "cfg": model_config_from_dict(raw["model"]), "classes": raw["classes"]}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelError(f"{path}: not a polydet export config ({e})") from e


class OnnxModel:
    """An exported ``model.onnx`` on ONNX Runtime, numpy in and out. ``path``: the export
    directory or its ``model.onnx``; ``.cfg`` (model section) and ``.classes`` come from the
    directory's ``config.json``; ``device`` as :func:`execution_providers`."""

    def __init__(self, path: str | Path, device: str = "auto") -> None:
        path = Path(path)
        directory = path if path.is_dir() else path.parent
        model_path = directory / MODEL_FILE if path.is_dir() else path
        if not model_path.is_file():
            raise ModelError(f"{model_path}: no such ONNX model (run `polydet export`)")
        meta = read_config(directory)
        self.cfg = meta["cfg"]
        self.classes: list[str] = meta["classes"]
        self.path = model_path
        self.session = session(model_path, device)

    @property
    def provider(self) -> str:
        """The provider ONNX Runtime runs this model on (the first it could use)."""
        return str(self.session.get_providers()[0])

    @property
    def outputs(self) -> tuple[str, ...]:
        """The graph's output names: :data:`OUTPUTS`, or the first three of them for an
        export written before the heading."""
        return tuple(o.name for o in self.session.get_outputs())

    def run(self, images: np.ndarray) -> tuple[np.ndarray, ...]:
        """Raw outputs for a batch ``[B, 3, H, W]`` float32 in [0, 1], in :data:`OUTPUTS`'
        order; for an export without the heading outputs, ``first_corner`` -1 and
        ``heading`` NaN (:func:`with_heading`)."""
        names = [o for o in OUTPUTS if o in self.outputs]
        raw = self.session.run(names, {INPUT: np.ascontiguousarray(images, np.float32)})
        return with_heading(raw)

    def detect(self, images: Sequence[np.ndarray]) -> list[dict[str, np.ndarray]]:
        """Per image ``[3, H, W]`` float32 in [0, 1]: ``{"polyboxes" [K, 10], "scores" [K],
        "labels" [K], "first_corner" [K], "heading" [K]}`` (padding rows dropped); images of
        the same size run as one batch."""
        results: list[dict[str, np.ndarray] | None] = [None] * len(images)
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, image in enumerate(images):
            by_size.setdefault(tuple(image.shape[-2:]), []).append(i)
        for idx in by_size.values():
            for i, det in zip(idx, unpad(self.run(np.stack([images[i] for i in idx])))):
                results[i] = det
        return results  # type: ignore[return-value]


def with_heading(raw: Sequence[Any]) -> tuple[Any, ...]:
    """The five :data:`OUTPUTS` of an export's raw outputs (numpy arrays, or torch tensors
    from TorchScript): as they are, or for an export written before the heading (three
    outputs) with ``first_corner`` -1 (int64) and ``heading`` NaN (float32) added."""
    if len(raw) == len(OUTPUTS):
        return tuple(raw)
    if len(raw) != len(OUTPUTS_BEFORE_HEADING):
        raise ModelError(f"expected the outputs {', '.join(OUTPUTS)}, got {len(raw)} outputs")
    scores = np.asarray(raw[1])
    first = np.full(scores.shape, -1, np.int64)
    heading = np.full(scores.shape, np.nan, np.float32)
    if not isinstance(raw[1], np.ndarray):  # torch tensors in, torch tensors out
        import torch

        first, heading = torch.from_numpy(first), torch.from_numpy(heading)
    return (*raw, first, heading)


def unpad(raw: Sequence[Any]) -> list[dict[str, Any]]:
    """Per image ``{name: [K, ...]}`` of :data:`OUTPUTS` (raw outputs ``[B, K, ...]`` as
    :func:`with_heading` returns them), padding rows (score 0) dropped."""
    outputs = dict(zip(OUTPUTS, with_heading(raw), strict=True))
    keep = outputs["scores"] > 0  # [B, K]
    return [{k: v[b][keep[b]] for k, v in outputs.items()} for b in range(keep.shape[0])]


def export_dir(model: str | Path, tracking_uri: str | None = None) -> Path:
    """Where the ONNX model behind ``model`` is: a path (a directory of ``polydet export`` or
    its ``model.onnx``) as given, or for a ``models:/`` / ``runs:/`` URI of a registered model
    that carries one, its export directory (downloaded once into the model cache, as for
    ``--runtime torch``)."""
    text = str(model)
    if not text.startswith(("models:/", "runs:/")):
        return Path(text)
    from polydet.core.model_uri import resolve_model_path

    try:
        return resolve_model_path(text, tracking_uri, filename=MODEL_FILE).parent
    except ModelError as e:
        if f"hold no {MODEL_FILE}" not in str(e):
            raise
        raise ModelError(
            f"{text}: this model version carries no ONNX model (registered before ONNX was "
            "logged, or its export failed the parity check: see the version's tag "
            "polydet.onnx); use --runtime torch, or `polydet export --model "
            f"{text} --out DIR` and --model DIR"
        ) from e


# --- the registered model's runtimes -------------------------------------------------------


class Runtimes:
    """The detectors of a registered polydet model: ``onnx`` (ONNX Runtime on the artifact
    ``onnx``, an export directory) and ``torch`` (``model.pt``, the artifact ``model``).

    ``config`` is the MLflow model config: ``runtime`` (the default; else ``onnx`` when the
    model carries an export) and ``device`` (``auto``: CUDA when present). The default
    runtime is loaded at once (a broken model fails when loaded), the other on first use.
    """

    def __init__(
        self,
        artifacts: Mapping[str, str],
        config: Mapping[str, Any] | None = None,
        wrap: Callable[[Any], Any] | None = None,
    ):
        self.artifacts = dict(artifacts)
        # Applied to the torch model (e.g. test-time augmentation), not to ONNX Runtime's.
        self.wrap = wrap or (lambda model: model)
        config = dict(config or {})
        self.default = str(config.get("runtime") or ("onnx" if "onnx" in artifacts else "torch"))
        self.device = str(config.get("device") or "auto")
        self._models: dict[str, Any] = {}
        self.classes: list[str] = list(self.model(self.default).classes or [])

    def model(self, runtime: str | None) -> Any:
        """The loaded model of ``runtime`` (``None``: the default); a :class:`ModelError`
        saying why when there is no such runtime in this model."""
        runtime = runtime or self.default
        if runtime not in RUNTIMES:
            raise ModelError(f"runtime {runtime!r}: expected one of {', '.join(RUNTIMES)}")
        if runtime == "onnx" and "onnx" not in self.artifacts:
            raise ModelError(
                "runtime 'onnx': this model version carries no ONNX model (registered before "
                "ONNX was logged, or its export failed the parity check: see the version's "
                "tag polydet.onnx); use runtime 'torch'"
            )
        if runtime not in self._models:
            if runtime == "onnx":
                model = OnnxModel(self.artifacts["onnx"], self.device)
            else:
                model = self.wrap(_load_torch(self.artifacts["model"], self.device))
            self._models[runtime] = model
        return self._models[runtime]

    def detect(
        self, images: Sequence[np.ndarray], runtime: str | None = None
    ) -> list[dict[str, np.ndarray]]:
        """Detections per image (``[H, W, 3]`` float32 in [0, 1]) as numpy arrays."""
        model = self.model(runtime)
        if isinstance(model, OnnxModel):
            return model.detect([np.ascontiguousarray(a.transpose(2, 0, 1)) for a in images])
        import torch

        device = next(model.parameters()).device
        tensors = [torch.from_numpy(a).permute(2, 0, 1).contiguous().to(device) for a in images]
        with torch.no_grad():
            outputs = model.predict(tensors)
        return [{k: v.cpu().numpy() for k, v in out.items()} for out in outputs]


def _load_torch(path: str, device: str) -> Any:
    import torch

    from polydet.model import load_model

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return load_model(path, device=device)


__all__ = [
    "OUTPUTS",
    "OnnxModel",
    "Runtimes",
    "execution_providers",
    "export_dir",
    "read_config",
    "session",
    "unpad",
    "with_heading",
]
