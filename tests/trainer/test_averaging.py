"""The weights' exponential moving average (trainer/averaging.py)."""

from __future__ import annotations

import pytest
import torch

from trainer.averaging import EmaWeights


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))


def test_average_follows_the_weights_with_the_ramped_decay() -> None:
    net = _net()
    ema = EmaWeights(net, decay=0.9)
    start = ema.state_dict()["0.weight"].clone()
    with torch.no_grad():
        net[0].weight.add_(1.0)
    net(torch.randn(4, 1, 8, 8))  # train mode: batch-norm statistics and counter move
    ema.update(net)
    d = min(0.9, 2 / 11)  # the ramp after one update
    torch.testing.assert_close(ema.state_dict()["0.weight"],
                               d * start + (1 - d) * net[0].weight.detach())
    assert int(ema.state_dict()["1.num_batches_tracked"]) == 1  # integers copied
    assert not any(p.requires_grad for p in ema.model.parameters())
    assert not ema.model.training


def test_average_of_constant_weights_is_those_weights() -> None:
    net = _net()
    ema = EmaWeights(net, decay=0.99)
    for _ in range(50):
        ema.update(net)
    for k, v in net.state_dict().items():
        torch.testing.assert_close(ema.state_dict()[k], v)


def test_restored_average_continues_where_it_stopped() -> None:
    net = _net()
    a = EmaWeights(net, decay=0.9)
    for _ in range(3):
        with torch.no_grad():
            net[0].weight.mul_(1.1)
        a.update(net)
    b = EmaWeights(_net(), decay=0.9)
    b.load_state_dict(a.state_dict(), a.updates)
    a.update(net)
    b.update(net)
    torch.testing.assert_close(a.state_dict()["0.weight"], b.state_dict()["0.weight"])


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.5])
def test_decay_outside_0_1_is_refused(decay: float) -> None:
    with pytest.raises(ValueError, match="decay"):
        EmaWeights(_net(), decay)
