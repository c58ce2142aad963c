"""ONNX Runtime's provider choice (one place: ``polydet.deploy.onnx_runtime.execution_providers``).

There is no GPU here: ``onnxruntime.get_available_providers`` is replaced by what a CUDA build
(``onnxruntime-gpu``) reports, and ``InferenceSession`` by a recorder, to check which
providers, in which order, a session is asked for.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnxruntime
import pytest
from helpers import tiny_cfg

from polydet.core.config import to_dict
from polydet.core.errors import ModelError
from polydet.deploy import onnx_runtime
from polydet.deploy.onnx_runtime import CPU, CUDA, OnnxModel, execution_providers

GPU_BUILD = ["TensorrtExecutionProvider", CUDA, CPU]


@pytest.mark.parametrize(
    ("device", "available", "expected"),
    [
        ("auto", GPU_BUILD, [CUDA, CPU]),  # CUDA when present...
        ("cuda", GPU_BUILD, [CUDA, CPU]),
        ("cuda:1", GPU_BUILD, [(CUDA, {"device_id": 1}), CPU]),  # ...on the GPU asked for
        ("CUDA:0", GPU_BUILD, [(CUDA, {"device_id": 0}), CPU]),
        ("cpu", GPU_BUILD, [CPU]),  # the CPU when asked, even with a GPU
        ("auto", [CPU], [CPU]),  # the CPU build
        ("cuda", [CPU], [CPU]),  # asked for CUDA without it: the CPU, with a warning
    ],
)
def test_provider_order(device, available, expected, monkeypatch, capsys):
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: list(available))
    assert execution_providers(device) == expected
    warned = "has no CUDAExecutionProvider" in capsys.readouterr().err
    assert warned == (device.startswith("cuda") and CUDA not in available)


def test_unknown_device_is_refused():
    with pytest.raises(ModelError, match="device 'mps'"):
        execution_providers("mps", available=[CPU])


def test_sessions_are_opened_with_those_providers(tmp_path: Path, monkeypatch):
    """OnnxModel (what `polydet predict --runtime onnx`, the pyfunc and OnnxDetector run)
    asks ONNX Runtime for the providers of its device."""
    opened: list[tuple[str, list]] = []

    class Recorder:
        def __init__(self, path, options, providers):
            opened.append((path, providers))

        def get_providers(self):
            return [p if isinstance(p, str) else p[0] for p in opened[-1][1]]

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: GPU_BUILD)
    monkeypatch.setattr(onnxruntime, "InferenceSession", Recorder)
    (tmp_path / "model.onnx").write_bytes(b"not read by the recorder")
    config = {"model": to_dict(tiny_cfg()), "classes": ["a", "b"]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    for device, first in (("auto", CUDA), ("cuda:2", (CUDA, {"device_id": 2})), ("cpu", CPU)):
        model = OnnxModel(tmp_path, device=device)
        assert opened[-1] == (str(tmp_path / "model.onnx"), execution_providers(device))
        assert opened[-1][1][0] == first and opened[-1][1][-1] == CPU
        assert model.provider == (CUDA if device != "cpu" else CPU)
    # The same rule through the session helper used by the export's own parity check.
    onnx_runtime.session(tmp_path / "model.onnx", device="cpu")
    assert opened[-1][1] == [CPU]
