"""The one rule from a ``train.device`` setting to a torch device (training, evaluation,
prediction, the debug report and the tracking tags all use it)."""

from __future__ import annotations

import torch

from polydet.core.config import ConfigError


def resolve_device(spec: str, local_rank: int = 0, distributed: bool = False) -> torch.device:
    """``train.device`` -> a device: ``auto`` is CUDA when present, else CPU; ``cuda`` is
    ``cuda:LOCAL_RANK`` (under torchrun each rank takes its own; ``cuda:N`` too then).
    Raises :class:`ConfigError` naming ``train.device`` for CUDA without CUDA or a bad name."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device is {spec!r} but CUDA is not available here")
        if distributed or spec == "cuda":
            return torch.device("cuda", local_rank)
        try:
            return torch.device(spec)
        except RuntimeError as e:
            raise ConfigError(f"train.device: {spec!r} is not a device ({e})") from e
    raise ConfigError(f"train.device: {spec!r} is not one of auto, cpu, cuda, cuda:N")
