"""Weight averaging: an exponential moving average (EMA) of a model's weights during training,
and a uniform average of the weights at the end of the last epochs (stochastic weight
averaging, SWA: Izmailov et al. 2018) with its batch-norm statistics recomputed.

The validation splits of small synthetic sets are noisy, so the single epoch with the best
validation score is partly luck; an average over the last few hundred steps is a smoother,
usually better model (Polyak averaging; "model EMA" in timm, YOLO, CenterNet follow-ups).
Both training loops (``trainer/loop.py``, ``trainer/detect_train.py``) keep one and validate it
instead of the raw weights when ``ema_decay > 0``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch.optim.swa_utils import AveragedModel, update_bn


class EmaWeights:
    """An EMA copy of ``model``: parameters and floating-point buffers (batch-norm statistics)
    averaged, integer buffers (batch counters) copied.

    The decay ramps up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates (TensorFlow's
    ``ExponentialMovingAverage`` with ``num_updates``), so the first, random weights are
    forgotten quickly.

    Raises:
        ValueError: ``decay`` is not in (0, 1).
    """

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """Fold the current weights of ``model`` (same architecture) into the average."""
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for avg, cur in zip(self.model.state_dict().values(), model.state_dict().values(),
                            strict=True):
            if avg.dtype.is_floating_point:
                avg.mul_(d).add_(cur.detach().to(avg.dtype), alpha=1.0 - d)
            else:
                avg.copy_(cur)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights, loadable into a model of the same architecture."""
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor], updates: int) -> None:
        """Restore an average (resuming a run) after ``updates`` updates."""
        self.model.load_state_dict(state)
        self.updates = updates


class EpochAverage:
    """A uniform average of ``model``'s parameters over the epochs it is given (SWA).

    The average of weights the optimiser visited late in a run lies in a flatter, wider region
    of the loss than any one of them, and is not the luck of one validation score.
    Batch-norm statistics are not averaged: :meth:`finish` recomputes them for the averaged
    weights on training batches (``torch.optim.swa_utils``: ``AveragedModel``, ``update_bn``).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self._avg = AveragedModel(model, use_buffers=False)

    @property
    def count(self) -> int:
        """How many weight sets are in the average."""
        return int(self._avg.n_averaged)

    def add(self, model: torch.nn.Module) -> None:
        """Fold the current parameters of ``model`` (same architecture) into the average."""
        self._avg.update_parameters(model)

    def finish(self, batches: Iterable[torch.Tensor], device: torch.device) -> torch.nn.Module:
        """The averaged network with batch-norm statistics recomputed on ``batches`` (inputs
        as the training loop feeds them), in eval mode.

        Raises:
            ValueError: nothing was averaged.
        """
        if self.count == 0:
            raise ValueError("no weights in the average")
        with torch.no_grad():
            update_bn(batches, self._avg, device)
        model = self._avg.module.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        return model

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The average and its count (to resume a run)."""
        return {k: v.detach().clone() for k, v in self._avg.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` gave."""
        self._avg.load_state_dict(state)
