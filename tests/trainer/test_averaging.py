"""Weight averaging (trainer/averaging.py): the moving average and the epoch average."""

from __future__ import annotations

import pytest
import torch

from trainer.averaging import EmaWeights, EpochAverage


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


def test_epoch_average_is_the_mean_with_batch_norm_measured_anew() -> None:
    net = _net()
    avg = EpochAverage(net)
    weights = []
    for step in range(3):
        with torch.no_grad():
            net[0].weight.add_(float(step))
        weights.append(net[0].weight.detach().clone())
        avg.add(net)
    assert avg.count == 3
    batches = [torch.randn(4, 1, 8, 8) for _ in range(2)]
    model = avg.finish(batches, torch.device("cpu"))
    torch.testing.assert_close(model[0].weight, torch.stack(weights).mean(0))
    with torch.no_grad():  # the statistics are those of the averaged weights on the batches
        features = model[0](torch.cat(batches))
    torch.testing.assert_close(model[1].running_mean, features.mean(dim=(0, 2, 3)))
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_restored_epoch_average_continues_where_it_stopped() -> None:
    net = _net()
    a = EpochAverage(net)
    a.add(net)
    b = EpochAverage(_net())
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        net[0].weight.add_(2.0)
    a.add(net)
    b.add(net)
    assert b.count == 2
    batch = [torch.randn(2, 1, 8, 8)]
    torch.testing.assert_close(a.finish(batch, torch.device("cpu"))[0].weight,
                               b.finish(batch, torch.device("cpu"))[0].weight)


def test_empty_epoch_average_is_refused() -> None:
    with pytest.raises(ValueError, match="no weights"):
        EpochAverage(_net()).finish([], torch.device("cpu"))
