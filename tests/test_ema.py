"""The weights' moving average (polydet.train.ema) against a hand-written reference."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from polydet.train.ema import RAMP, WeightEma, ema_factor


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def test_decay_ramps_up_as_tensorflow_num_updates_then_caps() -> None:
    assert ema_factor(0.999, 1) == pytest.approx(2 / 11)
    assert ema_factor(0.999, 90) == pytest.approx(91 / 100)
    assert ema_factor(0.9, 1000) == 0.9  # capped by the configured decay
    assert RAMP == 10


def test_update_matches_a_hand_computed_average_of_every_state_entry() -> None:
    model, decay = small_model(), 0.95
    ema = WeightEma(model, decay)
    ref = {k: v.detach().double().clone() for k, v in model.state_dict().items()}
    for t in range(1, 8):
        with torch.no_grad():  # a training step's change of weights and BatchNorm statistics
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.train()(torch.randn(5, 3))  # moves running_mean/var, counts num_batches_tracked
        ema.update(model)
        d = min(decay, (1 + t) / (10 + t))
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                ref[k] = d * ref[k] + (1 - d) * v.double()
            else:
                ref[k] = v.double().clone()
    assert ema.updates == 7
    for k, v in ema.shadow.items():
        torch.testing.assert_close(v.double(), ref[k], rtol=1e-6, atol=1e-6, msg=k)
    assert int(ema.shadow["1.num_batches_tracked"]) == 7  # copied, not averaged


def test_applied_swaps_the_average_in_and_restores_the_weights_exactly() -> None:
    model = small_model()
    ema = WeightEma(model, 0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    ema.update(model)
    own = {k: v.clone() for k, v in model.state_dict().items()}
    with ema.applied(model):
        for k, v in model.state_dict().items():
            assert torch.equal(v, ema.shadow[k])
    for k, v in model.state_dict().items():
        assert torch.equal(v, own[k])


def test_state_round_trip_and_refusals() -> None:
    model = small_model()
    ema = WeightEma(model, 0.9)
    ema.update(model)
    other = WeightEma(small_model(), 0.9)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 1
    assert all(torch.equal(other.shadow[k], v) for k, v in ema.shadow.items())
    with pytest.raises(ValueError, match="ema_decay"):
        WeightEma(model, 1.0)
    with pytest.raises(ValueError, match="do not match"):
        ema.update(nn.Linear(3, 4))
