"""Weight averaging: an exponential moving average (EMA) of a model's weights during training.

The validation splits of small synthetic sets are noisy, so the single epoch with the best
validation score is partly luck; an average over the last few hundred steps is a smoother,
usually better model (Polyak averaging; "model EMA" in timm, YOLO, CenterNet follow-ups).
Both training loops (``trainer/loop.py``, ``trainer/detect_train.py``) keep one and validate it
instead of the raw weights when ``ema_decay > 0``.
"""

from __future__ import annotations

import copy

import torch


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
