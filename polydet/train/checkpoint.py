"""Training checkpoints: atomic writes, ``weights_only`` loading, and RNG state capture.

A checkpoint is a plain dict (``format`` = :data:`CHECKPOINT_FORMAT`) of tensors, numbers,
strings and lists, so that ``torch.load(weights_only=True)`` can read it without running
pickled code: model / optimizer / scheduler / grad-scaler state dicts, the step, the data
position, every random generator (torch, CUDA, NumPy, Python) and the config. NumPy's and
Python's generator states are converted to tensors and lists for that reason.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from polydet.core.errors import ModelError
from polydet.core.files import torch_load_problem, torch_save

CHECKPOINT_FORMAT = "polydet-checkpoint/1"


def capture_rng_state() -> dict[str, Any]:
    """Every global random generator's state, as ``weights_only``-loadable values."""
    # NumPy's legacy global generator: what third-party code calling np.random.* draws from.
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()  # noqa: NPY002
    version, py_state, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": {"version": int(version), "state": list(py_state), "gauss_next": gauss_next},
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put back the generator states of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"].cpu())
    cuda_states = state["cuda"]
    if cuda_states and torch.cuda.is_available():
        # A job resumed on fewer GPUs restores the devices it has.
        n = min(len(cuda_states), torch.cuda.device_count())
        for i in range(n):
            torch.cuda.set_rng_state(cuda_states[i].cpu(), device=i)
    np_state = state["numpy"]
    np.random.set_state(  # noqa: NPY002
        (
            "MT19937",
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write a training checkpoint atomically (``state`` gains the ``format`` tag): a temp file
    beside ``path``, fsync, ``os.replace`` (:func:`polydet.core.files.torch_save`), so a crash
    mid-write leaves the previous checkpoint intact and a full disk is a one-line
    :class:`~polydet.core.files.WriteError`."""
    return torch_save({"format": CHECKPOINT_FORMAT, **state}, path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``; a :class:`ModelError` names a bad file."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated file, foreign pickle, ...: all mean "not usable"
        raise ModelError(f"{path}: not a readable checkpoint: {torch_load_problem(path, e)}") from e
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ModelError(f"{path}: not a polydet training checkpoint")
    return state
