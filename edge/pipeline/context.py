"""Streaming a 2.5D model: which slices can run now, and which must wait for the series' end.

A model whose sidecar preprocessing has ``context_slices = k > 0`` takes each slice stacked
with its ``k`` neighbours on each side along the slice normal
(:mod:`edge.preprocess.context`). Slice ``i`` therefore cannot run when it arrives, only once
its neighbours are known. :class:`ContextBuffer` keeps each frame's preprocessed slice per
(series, model) and decides:

- **while the series streams**, a slice runs as soon as every frame its input needs has
  arrived (its ``k`` neighbours on each side; with ``context_spacing_mm``, the frames around
  each point ``k x spacing`` mm away, which must lie inside the frames received) and no frame
  can still arrive among them: one stack (same size, orientation within a degree), steps
  along the normal regular (each within 10 % of their median), and each pair of neighbours
  adjacent by InstanceNumber (single-frame instances) or frame number (frames of one
  instance). Without that proof (no InstanceNumber, gaps, the current ends of the stack) the
  slice waits;
- **at series completion**, the volume order of every frame received is final:
  :meth:`ContextBuffer.at_completion` lists every slice not yet run and every slice whose
  early neighbours differ from the final ones (an interleaved sender, a late slice between
  two others), each with its input stacked from the final order, ends replicated. An early
  run is thus an optimisation that completion verifies, never a different answer.

Frames are grouped into stacks by size and orientation: a localizer in another plane is its
own stack (of one slice, replicated). Everything is in memory; the worker also keeps each
preprocessed slice in the :class:`~edge.pipeline.slices.SliceStore`, from which completion
reloads what a restart lost.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from edge.core.types import ModelId
from edge.preprocess.context import channel_sources, combine
from edge.preprocess.volume import FrameGeometry, slice_order

#: (SOP Instance UID, frame number): one frame of a series.
FrameKey = tuple[str, int]
#: Orientations within this (direction-cosine difference, about a degree) are one stack.
_ORIENTATION_TOLERANCE = 0.0175
#: Steps along the normal may differ from their median by this fraction and still be regular.
_STEP_TOLERANCE = 0.1


@dataclass(frozen=True)
class ContextJob:
    """One slice to run: its key, its (1, 2k + 1, H, W) input, the frames stacked into it
    (channel order) and its stored frame's (rows, columns)."""

    key: FrameKey
    inputs: np.ndarray
    sources: Sources
    source_shape: tuple[int, int]


@dataclass
class _Entry:
    frame: FrameGeometry
    shape: tuple[int, int]  # the preprocessed slice's (H, W)
    value: np.ndarray
    source_shape: tuple[int, int]  # the stored frame's (rows, columns)


@dataclass
class _Model:
    entries: dict[FrameKey, _Entry] = field(default_factory=dict)
    ran: dict[FrameKey, Sources] = field(default_factory=dict)


def _key(frame: FrameGeometry) -> FrameKey:
    return (frame.sop_instance_uid, frame.frame_number)


def _same_stack(a: _Entry, b: _Entry) -> bool:
    if a.shape != b.shape:
        return False
    if a.frame.orientation is None or b.frame.orientation is None:
        return a.frame.orientation is None and b.frame.orientation is None
    diff = np.abs(np.asarray(a.frame.orientation) - np.asarray(b.frame.orientation))
    return float(diff.max()) <= _ORIENTATION_TOLERANCE


def stacks(entries: dict[FrameKey, _Entry]) -> list[tuple[list[FrameKey], list[float]]]:
    """The frames grouped into stacks (size + orientation), each in volume order
    (:func:`edge.preprocess.volume.slice_order`) with its distances along the normal in mm
    (slices 1 mm apart where positions are missing, as the trainer takes them)."""
    groups: list[list[FrameKey]] = []
    for key, entry in entries.items():
        for group in groups:
            if _same_stack(entries[group[0]], entry):
                group.append(key)
                break
        else:
            groups.append([key])
    out = []
    for group in groups:
        order, _, distances = slice_order([entries[k].frame for k in group])
        out.append(([group[i] for i in order],
                    distances or [float(i) for i in range(len(group))]))
    return out


def _adjacent(a: FrameGeometry, b: FrameGeometry) -> bool:
    """Whether nothing can lie between ``a`` and ``b``, next to each other in a stack."""
    if a.sop_instance_uid == b.sop_instance_uid:
        return abs(a.frame_number - b.frame_number) == 1
    if a.frame_number != 1 or b.frame_number != 1:
        return False
    if a.instance_number is None or b.instance_number is None:
        return False
    return abs(a.instance_number - b.instance_number) == 1


def _settled(stack: list[FrameKey], distances: list[float], at: int, k: int,
             spacing_mm: float | None, entries: dict[FrameKey, _Entry]) -> bool:
    """Whether the slice at ``at`` of a partial stack already has every source its input
    needs, and no slice can still arrive among them (see the module docstring)."""
    if any(entries[key].frame.position is None for key in stack):
        return False
    if spacing_mm is None:
        if at - k < 0 or at + k >= len(stack):
            return False
        lo, hi = at - k, at + k
    else:
        reach = k * spacing_mm
        if distances[at] - reach < distances[0] or distances[at] + reach > distances[-1]:
            return False  # the stack may go on beyond the slices received so far
        used = [p for ch in channel_sources(distances, at, k, spacing_mm) for p, _ in ch]
        lo, hi = min(used), max(used)
    frames = [entries[key].frame for key in stack[lo:hi + 1]]
    if not all(_adjacent(a, b) for a, b in zip(frames, frames[1:], strict=False)):
        return False
    steps = np.diff(np.asarray(distances[lo:hi + 1]))
    if steps.size == 0:
        return True
    median = float(np.median(steps))
    return median > 1e-3 and float(np.abs(steps - median).max()) <= _STEP_TOLERANCE * median


#: A slice's input recipe: per channel, (source frame, weight) pairs.
Sources = tuple[tuple[tuple[FrameKey, float], ...], ...]


def _sources(stack: list[FrameKey], distances: list[float], at: int, k: int,
             spacing_mm: float | None) -> Sources:
    return tuple(tuple((stack[p], w) for p, w in channel)
                 for channel in channel_sources(distances, at, k, spacing_mm))


def _channels(state: _Model, sources: Sources) -> np.ndarray:
    """(1, 2k + 1, H, W) float32 (:func:`edge.preprocess.context.combine`, as the trainer)."""
    keys = list(dict.fromkeys(key for channel in sources for key, _ in channel))
    planes = [state.entries[key].value for key in keys]
    where = {key: n for n, key in enumerate(keys)}
    return combine(planes, [tuple((where[key], w) for key, w in channel)
                            for channel in sources])[np.newaxis]


class ContextBuffer:
    """Preprocessed slices of 2.5D models per (series, model), and which ran with which
    neighbours. Thread-safe; a slice is handed out to one caller only."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._models: dict[tuple[str, ModelId], _Model] = {}

    def add(self, series: str, model: ModelId, k: int, frame: FrameGeometry,
            value: np.ndarray, source_shape: tuple[int, int],
            spacing_mm: float | None = None) -> list[ContextJob]:
        """Keep one frame's preprocessed (H, W) slice (its stored size ``source_shape``);
        return the slices (this one or its neighbours) that can run now, each claimed for the
        caller.

        Raises:
            ValueError: ``value`` is not 2D, or ``k`` < 1.
        """
        if value.ndim != 2 or k < 1:
            raise ValueError(f"context: a 2D slice and k >= 1, got {value.shape} and {k}")
        with self._lock:
            state = self._models.setdefault((series, model), _Model())
            key = _key(frame)
            state.entries[key] = _Entry(frame, (int(value.shape[0]), int(value.shape[1])),
                                        value, source_shape)
            stack, distances = next(s for s in stacks(state.entries) if key in s[0])
            at = stack.index(key)
            # the slices whose sources the new one may complete (k places, or k x spacing)
            near = [i for i in range(len(stack)) if abs(i - at) <= k or (
                spacing_mm is not None
                and abs(distances[i] - distances[at]) <= k * spacing_mm + 1e-6)]
            jobs = []
            for i in near:
                candidate = stack[i]
                if candidate in state.ran or not _settled(stack, distances, i, k, spacing_mm,
                                                          state.entries):
                    continue
                sources = _sources(stack, distances, i, k, spacing_mm)
                state.ran[candidate] = sources
                jobs.append(ContextJob(candidate, _channels(state, sources), sources,
                                       state.entries[candidate].source_shape))
            return jobs

    def known(self, series: str, model: ModelId) -> set[FrameKey]:
        """The frames kept for (series, model)."""
        with self._lock:
            state = self._models.get((series, model))
            return set(state.entries) if state is not None else set()

    def at_completion(self, series: str, model: ModelId, k: int,
                      frames: Sequence[FrameGeometry],
                      source_shapes: Mapping[str, tuple[int, int]],
                      load: Callable[[FrameKey], np.ndarray | None],
                      has_output: Callable[[FrameKey], bool],
                      spacing_mm: float | None = None) -> list[ContextJob]:
        """The slices still to run once the series is complete: over ``frames`` (every frame
        of the series with a preprocessed slice, in memory or loadable with ``load``; an
        instance's stored (rows, columns) in ``source_shapes``), those never run, without an
        output (``has_output``), or run with other neighbours than the final volume order
        gives. Each is claimed with its final neighbours.

        Raises:
            ValueError: ``k`` < 1.
        """
        if k < 1:
            raise ValueError(f"context: k >= 1, got {k}")
        with self._lock:
            state = self._models.setdefault((series, model), _Model())
            for frame in frames:
                key = _key(frame)
                if key not in state.entries and frame.sop_instance_uid in source_shapes:
                    value = load(key)
                    if value is not None and value.ndim == 2:
                        state.entries[key] = _Entry(
                            frame, (int(value.shape[0]), int(value.shape[1])),
                            value.astype(np.float32, copy=False),
                            source_shapes[frame.sop_instance_uid])
            jobs = []
            for stack, distances in stacks(state.entries):
                for i, key in enumerate(stack):
                    sources = _sources(stack, distances, i, k, spacing_mm)
                    if state.ran.get(key) == sources and has_output(key):
                        continue
                    state.ran[key] = sources
                    jobs.append(ContextJob(key, _channels(state, sources), sources,
                                           state.entries[key].source_shape))
            return jobs

    def input_for(self, series: str, model: ModelId, key: FrameKey) -> np.ndarray | None:
        """The (1, 2k + 1, H, W) input a slice last ran with (after completion: its final
        neighbours), or None when it never ran or a source slice is no longer kept."""
        with self._lock:
            state = self._models.get((series, model))
            sources = state.ran.get(key) if state is not None else None
            if state is None or sources is None or any(
                    s not in state.entries for channel in sources for s, _ in channel):
                return None
            return _channels(state, sources)

    def forget(self, series: str, model: ModelId, key: FrameKey) -> None:
        """A claimed slice failed to run: let completion try it again."""
        with self._lock:
            state = self._models.get((series, model))
            if state is not None:
                state.ran.pop(key, None)

    def drop(self, series: str) -> None:
        """Forget a series (finished)."""
        with self._lock:
            for owner in [o for o in self._models if o[0] == series]:
                del self._models[owner]
