"""Numerically stable activations for model outputs (logits -> probabilities)."""

from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Softmax along ``axis``, float32 or wider; the max is subtracted first so exp never overflows.

    Raises:
        ValueError: ``logits`` is empty along ``axis``.
    """
    x = np.asarray(logits)
    if x.shape[axis] == 0:
        raise ValueError("softmax: empty class axis")
    x = x.astype(np.result_type(x.dtype, np.float32), copy=False)
    shifted = x - np.max(x, axis=axis, keepdims=True)
    e = np.exp(shifted)
    out: np.ndarray = e / np.sum(e, axis=axis, keepdims=True)
    return out


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Logistic function without overflow: ``exp(-|x|)`` is always <= 1."""
    x = np.asarray(logits)
    x = x.astype(np.result_type(x.dtype, np.float32), copy=False)
    e = np.exp(-np.abs(x))
    out: np.ndarray = np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(x.dtype, copy=False)
    return out
