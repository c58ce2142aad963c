"""No checkpoint with NaN weights is ever called good (survey case 2).

The survey's run (a huge learning rate) stopped at step 4 naming ``last.pt`` of step 3 as the
last good checkpoint, though it held 86 non-finite tensors. Here the weights are poisoned
right after a step whose loss was still finite, and a validation loss is made NaN.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import one_thread  # noqa: F401  (a fixture, used below)
from test_engine import make_dataset, tiny_config
from torch.optim.optimizer import register_optimizer_step_post_hook

from polydet.core.errors import ModelError
from polydet.model import PolyDetector
from polydet.train.checkpoint import load_checkpoint, save_checkpoint
from polydet.train.engine import NonFiniteLossError, train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("prepared"))


def _all_finite(path: Path) -> bool:
    state = load_checkpoint(path)["model"]
    return all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_nan_weights_after_a_finite_loss_are_never_checkpointed(
    prepared: Path, tmp_path: Path
) -> None:
    steps = {"n": 0}

    def poison_after_step_4(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        steps["n"] += 1
        if steps["n"] == 4:  # step 4's loss was finite; the weights it leaves are not
            with torch.no_grad():
                optimizer.param_groups[0]["params"][0].fill_(float("nan"))

    hook = register_optimizer_step_post_hook(poison_after_step_4)
    cfg = tiny_config(prepared, tmp_path, "train.checkpoint_every=2")
    try:
        with pytest.raises(NonFiniteLossError) as info:
            train(cfg)
    finally:
        hook.remove()
    last = tmp_path / "checkpoints" / "last.pt"
    report = json.loads((tmp_path / "nonfinite.json").read_text())
    # What the message calls good is good: finite weights, and it resumes.
    assert report["last_checkpoint_step"] == 2
    assert "step 2" in str(info.value) and str(last) in str(info.value)
    assert load_checkpoint(last)["step"] == 2 and _all_finite(last)
    assert train(cfg, resume="last")["steps"] == 10


def test_nan_validation_loss_writes_no_checkpoint(
    prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_loss = PolyDetector.loss

    def nan_in_validation(self: PolyDetector, images: list, targets: list) -> dict:
        losses = real_loss(self, images, targets)
        if not self.training:
            losses["loss_classifier"] = losses["loss_classifier"] * float("nan")
        return losses

    monkeypatch.setattr(PolyDetector, "loss", nan_in_validation)
    # 5 steps per epoch: validation at step 5, then a checkpoint at step 5.
    cfg = tiny_config(prepared, tmp_path, "train.checkpoint_every=5")
    with pytest.raises(NonFiniteLossError, match=r"validation loss at step 5.*no good checkpoint"):
        train(cfg)
    assert not (tmp_path / "checkpoints" / "last.pt").exists()


def test_resume_refuses_a_checkpoint_with_nan_weights(prepared: Path, tmp_path: Path) -> None:
    cfg = tiny_config(prepared, tmp_path, "train.max_steps=2")
    train(cfg)
    last = tmp_path / "checkpoints" / "last.pt"
    state = load_checkpoint(last)
    name = next(k for k, v in state["model"].items() if v.is_floating_point())
    state["model"][name] = torch.full_like(state["model"][name], float("nan"))
    save_checkpoint({k: v for k, v in state.items() if k != "format"}, last)
    with pytest.raises(ModelError, match=r"last\.pt: 1 weight tensors hold NaN"):
        train(tiny_config(prepared, tmp_path, "train.max_steps=4"), resume="last")
