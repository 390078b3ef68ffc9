"""Slice context for 2.5D models: a slice's input stacked with its neighbours along the normal.

A model whose :class:`~edge.preprocess.imaging.PreprocessSpec` has ``context_slices = k > 0``
takes ``2k + 1`` channels. Slices are taken in **volume order** (ascending distance along the
slice normal, :func:`edge.preprocess.volume.slice_order`); the slice itself is channel ``k``,
what lies below it along the normal comes first. Each source is the single-slice
preprocessing (:func:`~edge.preprocess.imaging.preprocess_image`) of its own frame.

- ``context_spacing_mm`` None: channel ``j`` is the slice ``j - k`` places away in the stack;
  beyond either end the outermost slice is repeated (edge replication).
- ``context_spacing_mm = d``: channel ``j`` is the volume at ``(j - k) * d`` mm from the slice
  along the normal, linearly interpolated between the two slices around that point; beyond
  either end of the stack, the outermost slice. A fixed distance in mm makes the context mean
  the same at 1 mm and at 3 mm slices (a small nodule has ended a few mm away; a vessel goes
  on).

A channel is described by its sources: ``(position in the stack, weight)`` pairs whose weights
sum to 1 (:func:`channel_sources`); :func:`combine` adds the weighted slices. The trainer and
the runtime both stack with these functions (numpy only), so they cannot disagree.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: The most neighbours a spec may ask for on each side (a 2D model with 2k + 1 channels).
MAX_CONTEXT_SLICES = 8

#: One channel: (position in the stack, weight) pairs.
Channel = tuple[tuple[int, float], ...]


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


def channel_sources(distances: Sequence[float], index: int, k: int,
                    spacing_mm: float | None = None) -> tuple[Channel, ...]:
    """The sources of each of the ``2k + 1`` channels of slice ``index``.

    ``distances``: each slice's distance along the normal (mm), ascending (volume order).
    ``spacing_mm`` None: neighbours by place (:func:`context_positions`), weight 1.

    Raises:
        ValueError: no slices, ``index`` outside, ``k`` < 0, or ``spacing_mm`` <= 0.
    """
    count = len(distances)
    if spacing_mm is None:
        return tuple(((p, 1.0),) for p in context_positions(index, count, k))
    if spacing_mm <= 0 or count < 1 or not 0 <= index < count or k < 0:
        raise ValueError(f"context: slice {index} of {count}, k={k}, spacing {spacing_mm}")
    z = np.asarray(distances, np.float64)
    out: list[Channel] = []
    for offset in range(-k, k + 1):
        target = z[index] + offset * spacing_mm
        if offset == 0 or target <= z[0] or target >= z[-1]:
            where = index if offset == 0 else (0 if target <= z[0] else count - 1)
            out.append(((where, 1.0),))
            continue
        upper = int(np.searchsorted(z, target, side="right"))  # z[upper - 1] <= target < z[upper]
        lower = upper - 1
        gap = z[upper] - z[lower]
        w = float((target - z[lower]) / gap) if gap > 0 else 0.0
        pairs = ((lower, 1.0 - w), (upper, w))
        out.append(tuple((p, wt) for p, wt in pairs if wt > 0.0))
    return tuple(out)


def combine(planes: Sequence[np.ndarray], channels: Sequence[Channel]) -> np.ndarray:
    """(len(channels), H, W) float32: each channel the weighted sum of its source planes
    (``planes`` indexed by stack position)."""
    first = np.asarray(planes[channels[0][0][0]])
    out = np.zeros((len(channels), *first.shape), np.float32)
    for c, pairs in enumerate(channels):
        for position, weight in pairs:
            plane = np.asarray(planes[position], np.float32)
            if weight == 1.0:
                out[c] += plane
            else:
                out[c] += np.float32(weight) * plane
    return out


def stack_context(slices: Sequence[np.ndarray] | np.ndarray, k: int,
                  indices: Sequence[int] | None = None,
                  distances: Sequence[float] | None = None,
                  spacing_mm: float | None = None) -> np.ndarray:
    """Stack preprocessed slices, given in volume order, into 2.5D inputs.

    ``slices``: ``count`` arrays of shape (H, W) or (1, H, W) (or one array (count, H, W) /
    (count, 1, H, W)). Returns (len(indices), 2k + 1, H, W) float32 for the slices at
    ``indices`` (default: all). ``k = 0`` gives the slices themselves as one channel. With
    ``spacing_mm``, ``distances`` (mm along the normal, ascending) place the slices; without
    them the slices are taken as 1 mm apart.

    Raises:
        ValueError: no slices, slices of different shapes or not 2D, an index outside the
            stack, ``k`` < 0, or ``distances`` of another length.
    """
    planes = [np.asarray(s) for s in slices]
    if not planes:
        raise ValueError("context: no slices")
    planes = [p[0] if p.ndim == 3 and p.shape[0] == 1 else p for p in planes]
    shapes = {p.shape for p in planes}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"context: slices must be 2D and of one size, got {sorted(shapes)}")
    if k < 0:
        raise ValueError(f"context: k={k}")
    z = list(distances) if distances is not None else [float(i) for i in range(len(planes))]
    if len(z) != len(planes):
        raise ValueError(f"context: {len(z)} distances for {len(planes)} slices")
    rows = range(len(planes)) if indices is None else list(indices)
    h, w = planes[0].shape
    out = np.empty((len(rows), 2 * k + 1, h, w), np.float32)
    for n, i in enumerate(rows):
        if not 0 <= i < len(planes):
            raise ValueError(f"context: slice {i} outside a stack of {len(planes)}")
        out[n] = combine(planes, channel_sources(z, i, k, spacing_mm))
    return out
