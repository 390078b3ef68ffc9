"""Streaming a 2.5D model: which slices can run now, and which must wait for the series' end.

A model whose sidecar preprocessing has ``context_slices = k > 0`` takes each slice stacked
with its ``k`` neighbours on each side along the slice normal
(:mod:`edge.preprocess.context`). Slice ``i`` therefore cannot run when it arrives, only once
its neighbours are known. :class:`ContextBuffer` keeps each frame's preprocessed slice per
(series, model) and decides:

- **while the series streams**, a slice runs as soon as its ``2k`` nearest frames along the
  normal have arrived and are provably its true neighbours: one stack (same size, orientation
  within a degree), steps along the normal regular (each within 10 % of their median), and
  no slice missing between them: InstanceNumbers (single-frame instances) or frame numbers
  (frames of one instance) differ by exactly their distance in the sorted stack. Without that
  proof (no InstanceNumber, gaps, the current ends of the stack) the slice waits;
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
from edge.preprocess.context import context_positions
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
    sources: tuple[FrameKey, ...]
    source_shape: tuple[int, int]


@dataclass
class _Entry:
    frame: FrameGeometry
    shape: tuple[int, int]  # the preprocessed slice's (H, W)
    value: np.ndarray
    source_shape: tuple[int, int]  # the stored frame's (rows, columns)


@dataclass
class _Model:
    k: int
    entries: dict[FrameKey, _Entry] = field(default_factory=dict)
    ran: dict[FrameKey, tuple[FrameKey, ...]] = field(default_factory=dict)


def _key(frame: FrameGeometry) -> FrameKey:
    return (frame.sop_instance_uid, frame.frame_number)


def _same_stack(a: _Entry, b: _Entry) -> bool:
    if a.shape != b.shape:
        return False
    if a.frame.orientation is None or b.frame.orientation is None:
        return a.frame.orientation is None and b.frame.orientation is None
    diff = np.abs(np.asarray(a.frame.orientation) - np.asarray(b.frame.orientation))
    return float(diff.max()) <= _ORIENTATION_TOLERANCE


def stacks(entries: dict[FrameKey, _Entry]) -> list[list[FrameKey]]:
    """The frames grouped into stacks (size + orientation), each in volume order
    (:func:`edge.preprocess.volume.slice_order`)."""
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
        order, _, _ = slice_order([entries[k].frame for k in group])
        out.append([group[i] for i in order])
    return out


def _adjacent(a: FrameGeometry, b: FrameGeometry, apart: int) -> bool:
    """Whether nothing can lie between ``a`` and ``b``, ``apart`` places apart in a stack."""
    if a.sop_instance_uid == b.sop_instance_uid:
        return abs(a.frame_number - b.frame_number) == apart
    if a.frame_number != 1 or b.frame_number != 1:
        return False
    if a.instance_number is None or b.instance_number is None:
        return False
    return abs(a.instance_number - b.instance_number) == apart


def _settled(stack: list[FrameKey], at: int, k: int, entries: dict[FrameKey, _Entry]) -> bool:
    """Whether the slice at ``at`` of a partial stack has its true ``k`` neighbours on each
    side already (see the module docstring)."""
    if at - k < 0 or at + k >= len(stack):
        return False
    frames = [entries[key].frame for key in stack[at - k:at + k + 1]]
    if any(f.position is None or f.orientation is None for f in frames):
        return False
    centre = frames[k]
    if not all(_adjacent(centre, f, abs(i - k)) for i, f in enumerate(frames) if i != k):
        return False
    _, _, distance = slice_order(frames)
    steps = np.diff(np.asarray(distance))
    median = float(np.median(steps))
    return median > 1e-3 and float(np.abs(steps - median).max()) <= _STEP_TOLERANCE * median


def _channels(state: _Model, sources: Sequence[FrameKey]) -> np.ndarray:
    """(1, 2k + 1, H, W) float32: the source slices in channel order (the positions of
    :func:`edge.preprocess.context.context_positions`)."""
    return np.stack([state.entries[s].value for s in sources]).astype(np.float32)[np.newaxis]


class ContextBuffer:
    """Preprocessed slices of 2.5D models per (series, model), and which ran with which
    neighbours. Thread-safe; a slice is handed out to one caller only."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._models: dict[tuple[str, ModelId], _Model] = {}

    def add(self, series: str, model: ModelId, k: int, frame: FrameGeometry,
            value: np.ndarray, source_shape: tuple[int, int]) -> list[ContextJob]:
        """Keep one frame's preprocessed (H, W) slice (its stored size ``source_shape``);
        return the slices (this one or its neighbours) that can run now, each claimed for the
        caller.

        Raises:
            ValueError: ``value`` is not 2D, or ``k`` < 1.
        """
        if value.ndim != 2 or k < 1:
            raise ValueError(f"context: a 2D slice and k >= 1, got {value.shape} and {k}")
        with self._lock:
            state = self._models.setdefault((series, model), _Model(k))
            key = _key(frame)
            state.entries[key] = _Entry(frame, (int(value.shape[0]), int(value.shape[1])),
                                        value, source_shape)
            stack = next(s for s in stacks(state.entries) if key in s)
            at = stack.index(key)
            jobs = []
            for i in range(max(0, at - k), min(len(stack), at + k + 1)):
                candidate = stack[i]
                if candidate in state.ran or not _settled(stack, i, k, state.entries):
                    continue
                sources = tuple(stack[p] for p in context_positions(i, len(stack), k))
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
                      has_output: Callable[[FrameKey], bool]) -> list[ContextJob]:
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
            state = self._models.setdefault((series, model), _Model(k))
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
            for stack in stacks(state.entries):
                for i, key in enumerate(stack):
                    sources = tuple(stack[p] for p in context_positions(i, len(stack), k))
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
            if state is None or sources is None or any(s not in state.entries for s in sources):
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
