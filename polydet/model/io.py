"""Model files (``model.pt``): the weights plus everything needed to rebuild the model.

A model file is ``torch.save`` of a plain dict, readable with ``torch.load(...,
weights_only=True)`` (no pickled code)::

    {"format": "polydet-model/1", "model": to_dict(cfg.model), "classes": [...],
     "anchors": {"sizes": ..., "aspect_ratios": ...}, "state_dict": {...}}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from polydet.core.config import ConfigError, ModelConfig, model_config_from_dict, to_dict
from polydet.core.errors import ModelError
from polydet.core.files import torch_load_problem, torch_save
from polydet.model.detector import PolyDetector, build_model, plain_anchors

FORMAT = "polydet-model/1"


def save_model(
    model: PolyDetector,
    path: str | Path,
    model_cfg: ModelConfig,
    classes: Sequence[str],
    anchors: Mapping[str, Any] | None,
) -> Path:
    """Write ``model`` to ``path`` (atomically: a reader never sees half a file).

    ``classes``: class names, label ``i + 1`` is ``classes[i]``; ``anchors`` as given to
    :func:`polydet.model.build_model` (``None``: the config's anchors).
    """
    if len(classes) != model_cfg.num_classes - 1:
        raise ModelError(
            f"{path}: {len(classes)} classes but model.num_classes is {model_cfg.num_classes} "
            "(background included)"
        )
    payload = {
        "format": FORMAT,
        "model": to_dict(model_cfg),
        "classes": [str(c) for c in classes],
        "anchors": model.anchors if anchors is None else plain_anchors(anchors),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    # Atomic and serialised in memory first: the zip entries are named "archive/..." whatever
    # the (temporary) file name, so identical weights give identical bytes (DVC, the
    # registry); a failure (a full disk, a read-only directory) removes its temp file and
    # names the path and the cause.
    return torch_save(payload, path)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> PolyDetector:
    """Rebuild the model saved at ``path`` on ``device``, in eval mode, with ``.classes`` set.

    A :class:`ModelError` names the file when it is missing, unreadable or not a polydet
    model. Pretrained-weight files named in the saved config are not needed (the state dict
    holds every weight).
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: model file does not exist")
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # corrupt or foreign files raise many different types
        raise ModelError(f"{path}: not a polydet model file: {torch_load_problem(path, e)}") from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ModelError(
            f"{path}: not a polydet model file (format {found!r}, expected {FORMAT!r})"
        )
    try:
        cfg = model_config_from_dict(payload["model"])
        classes = [str(c) for c in payload["classes"]]
        anchors = payload["anchors"]
        state = payload["state_dict"]
    except (KeyError, TypeError, ConfigError) as e:
        raise ModelError(f"{path}: invalid polydet model file: {e}") from e
    try:
        model = build_model(cfg, anchors, load_weights=False)
        model.load_state_dict(state)
    except (ModelError, RuntimeError) as e:
        raise ModelError(f"{path}: weights do not fit the saved configuration: {e}") from e
    model.classes = classes
    return model.to(device).eval()
