"""Slice context for 2.5D models: a slice's input stacked with its neighbours along the normal.

A model whose :class:`~edge.preprocess.imaging.PreprocessSpec` has ``context_slices = k > 0``
takes ``2k + 1`` channels. For the slice at position ``i`` of a series in **volume order**
(ascending distance along the slice normal, :func:`edge.preprocess.volume.slice_order`),
channel ``j`` (0 .. 2k) holds the preprocessed slice at position ``i + j - k``: the slice
itself is channel ``k``, the slices below it along the normal come first. Beyond either end of
the stack the outermost slice is repeated (edge replication), so every slice gets an input of
the same shape. Each channel is the single-slice preprocessing
(:func:`~edge.preprocess.imaging.preprocess_image`) of its own frame; stacking never mixes
pixels. The trainer and the runtime both stack with these functions (numpy only).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: The most neighbours a spec may ask for on each side (a 2D model with 2k + 1 channels).
MAX_CONTEXT_SLICES = 8


def context_positions(index: int, count: int, k: int) -> tuple[int, ...]:
    """The volume positions feeding each of the ``2k + 1`` channels of slice ``index`` in a
    stack of ``count`` slices (edge replication at the ends).

    Raises:
        ValueError: ``count`` < 1, ``index`` outside the stack, or ``k`` < 0.
    """
    if count < 1 or not 0 <= index < count or k < 0:
        raise ValueError(f"context: slice {index} of {count} with k={k}")
    return tuple(min(max(index + offset, 0), count - 1) for offset in range(-k, k + 1))


def context_table(count: int, k: int) -> np.ndarray:
    """(count, 2k + 1) int64: row ``i`` is :func:`context_positions` of slice ``i``.

    Raises:
        ValueError: ``count`` < 1 or ``k`` < 0.
    """
    if count < 1 or k < 0:
        raise ValueError(f"context: {count} slices with k={k}")
    return np.asarray([context_positions(i, count, k) for i in range(count)], np.int64)


def stack_context(slices: Sequence[np.ndarray] | np.ndarray, k: int,
                  indices: Sequence[int] | None = None) -> np.ndarray:
    """Stack preprocessed slices, given in volume order, into 2.5D inputs.

    ``slices``: ``count`` arrays of shape (H, W) or (1, H, W) (or one array (count, H, W) /
    (count, 1, H, W)). Returns (len(indices), 2k + 1, H, W) float32 for the slices at
    ``indices`` (default: all). ``k = 0`` gives the slices themselves as one channel.

    Raises:
        ValueError: no slices, slices of different shapes or not 2D, an index outside the
            stack, or ``k`` < 0.
    """
    planes = [np.asarray(s) for s in slices]
    if not planes:
        raise ValueError("context: no slices")
    planes = [p[0] if p.ndim == 3 and p.shape[0] == 1 else p for p in planes]
    shapes = {p.shape for p in planes}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"context: slices must be 2D and of one size, got {sorted(shapes)}")
    table = context_table(len(planes), k)
    rows = range(len(planes)) if indices is None else list(indices)
    h, w = planes[0].shape
    out = np.empty((len(rows), 2 * k + 1, h, w), np.float32)
    for n, i in enumerate(rows):
        if not 0 <= i < len(planes):
            raise ValueError(f"context: slice {i} outside a stack of {len(planes)}")
        for c, source in enumerate(table[i]):
            out[n, c] = planes[int(source)]
    return out
