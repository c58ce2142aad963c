"""An exponential moving average of the model's weights (``train.ema_decay``).

After every optimizer step the average moves towards the current weights,
``avg = d * avg + (1 - d) * weights``, over the whole ``state_dict`` (parameters and
floating-point buffers such as BatchNorm's running statistics; integer buffers are copied).
As in TensorFlow's ``ExponentialMovingAverage(num_updates=...)`` and timm / Ultralytics'
model EMA, the decay ramps up from 0 so the start of training does not weigh on the average:
``d_t = min(decay, (1 + t) / (10 + t))`` after update ``t``.

The average is what training hands on: the saved ``model.pt``, the validation loss and the
snapshots use it; the optimizer keeps stepping the raw weights, and a checkpoint holds both,
so ``--resume`` continues the same average. On a short run, the average of the last ~1 /
(1 - decay) steps is a less noisy model than the last step's weights (README "Training").
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

# Updates over which the decay ramps up (TensorFlow's num_updates rule: (1 + t) / (10 + t)).
RAMP = 10


def ema_factor(decay: float, updates: int) -> float:
    """The decay used by update number ``updates`` (1-based)."""
    return min(decay, (1.0 + updates) / (RAMP + updates))


class WeightEma:
    """The moving average of ``model``'s ``state_dict`` (module docstring)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.ema_decay: must be in (0, 1) when on, got {decay}")
        self.decay = decay
        self.updates = 0
        self.shadow: dict[str, Tensor] = {
            k: v.detach().clone() for k, v in model.state_dict().items()
        }

    def _pairs(self, model: nn.Module) -> tuple[list[Tensor], list[Tensor], list[tuple]]:
        state = model.state_dict()
        if state.keys() != self.shadow.keys():
            missing = sorted(set(state) ^ set(self.shadow))[:3]
            raise ValueError(f"the model's weights do not match the moving average: {missing}")
        avg, cur, other = [], [], []
        for k, s in self.shadow.items():
            v = state[k].detach()
            if s.dtype.is_floating_point:
                avg.append(s)
                cur.append(v)
            else:
                other.append((s, v))
        return avg, cur, other

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model``'s current weights (one optimizer step)."""
        self.updates += 1
        d = ema_factor(self.decay, self.updates)
        avg, cur, other = self._pairs(model)
        if avg:
            # One fused kernel per device and dtype instead of one per tensor.
            torch._foreach_lerp_(avg, cur, 1.0 - d)
        for s, v in other:
            s.copy_(v)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Load the average into ``model`` (its current weights are overwritten)."""
        model.load_state_dict(self.shadow)

    @contextmanager
    def applied(self, model: nn.Module) -> Iterator[None]:
        """``model`` holds the average inside the block and its own weights again after."""
        saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.copy_to(model)
        try:
            yield
        finally:
            with torch.no_grad():
                model.load_state_dict(saved)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["shadow"].keys() != self.shadow.keys():
            raise ValueError("the checkpoint's moving average does not match the model")
        with torch.no_grad():
            for k, v in state["shadow"].items():
                self.shadow[k].copy_(v)
        self.updates = int(state["updates"])
