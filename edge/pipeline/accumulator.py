"""What the series-level work needs, gathered while the series streams in.

The workers read each instance's header and infer its frames anyway; keeping the header (no
pixel data) and each frame's output already mapped back to the source geometry means the
finalize only stacks and writes: it re-reads no file, decodes nothing and restores no slice.
Everything here is a cache of what is on disk (spool files, :class:`~edge.pipeline.slices.
SliceStore` outputs): after a restart, or for instances finished in an earlier epoch, the
finalize falls back to the disk.

:func:`contiguous_stack` decides whether the frames received form one gap-free stack, which
lets the series complete a short grace after the association's release instead of a full
quiet period (see :mod:`edge.pipeline.tracker`).
"""

from __future__ import annotations

import threading
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import numpy as np
from pydicom.dataset import Dataset

from edge.core.types import ModelId
from edge.preprocess.volume import FrameGeometry, slice_order

#: Pixel data and what pydicom's ``stop_before_pixels`` also leaves out (PS3.5 7.1: the
#: Float / Double Float Pixel Data elements come first).
_FIRST_PIXEL_TAG = 0x7FE00008
#: Steps along the normal may differ from the median step by this fraction (rounding in
#: ImagePositionPatient) and still count as one regular stack.
_STEP_TOLERANCE = 0.1


def strip_pixels(dataset: Dataset) -> Dataset:
    """``dataset`` without pixel data and what follows it (in place; returned for chaining):
    the same elements as ``dcmread(..., stop_before_pixels=True)`` gives."""
    for tag in [t for t in list(dataset.keys()) if t >= _FIRST_PIXEL_TAG]:
        del dataset[tag]
    return dataset


@dataclass(frozen=True)
class SourceHeader:
    """One instance's header (no pixel data) and the geometry of its frames."""

    header: Dataset
    frames: tuple[FrameGeometry, ...]


@dataclass
class _Parts:
    headers: dict[str, SourceHeader] = field(default_factory=dict)
    outputs: dict[tuple[ModelId, str, int], np.ndarray] = field(default_factory=dict)


class SeriesAccumulator:
    """Per series: source headers and per-frame outputs (segmenters: label maps in the source
    geometry; classifiers: scores). Thread-safe; values are never modified once added."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._series: dict[str, _Parts] = {}

    def add_header(self, series_instance_uid: str, sop_instance_uid: str,
                   source: SourceHeader) -> None:
        with self._lock:
            self._series.setdefault(series_instance_uid, _Parts()).headers[
                sop_instance_uid] = source

    def add_output(self, series_instance_uid: str, model: ModelId, sop_instance_uid: str,
                   frame: int, value: np.ndarray) -> None:
        with self._lock:
            self._series.setdefault(series_instance_uid, _Parts()).outputs[
                (model, sop_instance_uid, frame)] = value

    def header(self, series_instance_uid: str, sop_instance_uid: str) -> SourceHeader | None:
        with self._lock:
            parts = self._series.get(series_instance_uid)
            return parts.headers.get(sop_instance_uid) if parts is not None else None

    def output(self, series_instance_uid: str, model: ModelId, sop_instance_uid: str,
               frame: int) -> np.ndarray | None:
        with self._lock:
            parts = self._series.get(series_instance_uid)
            return parts.outputs.get((model, sop_instance_uid, frame)) \
                if parts is not None else None

    def frames(self, series_instance_uid: str, sop_instance_uids: Collection[str]
               ) -> list[FrameGeometry] | None:
        """The frames of exactly these instances, or None when a header is missing."""
        with self._lock:
            parts = self._series.get(series_instance_uid)
            if parts is None or any(uid not in parts.headers for uid in sop_instance_uids):
                return None
            return [f for uid in sop_instance_uids for f in parts.headers[uid].frames]

    def drop(self, series_instance_uid: str) -> None:
        with self._lock:
            self._series.pop(series_instance_uid, None)


def contiguous_stack(frames: Sequence[FrameGeometry]) -> bool:
    """Whether ``frames`` form one complete stack: at least two frames, all placed, one
    orientation, distinct positions at a regular step along the normal (no missing slice), and
    InstanceNumbers, where every frame has one and instances are single-frame, consecutive.

    A stack that is complete by these rules may still be the first part of a series a sender
    splits over several associations; the release grace covers a sender that goes on at once.
    """
    if len(frames) < 2 or any(f.position is None or f.orientation is None for f in frames):
        return False
    first = np.asarray(frames[0].orientation)
    if any(float(np.abs(np.asarray(f.orientation) - first).max()) > 1e-3 for f in frames):
        return False
    _, normal, distance = slice_order(frames)
    if normal is None or len(distance) != len(frames):
        return False
    steps = np.diff(np.asarray(distance))
    median = float(np.median(steps))
    if median <= 1e-3 or float(np.abs(steps - median).max()) > _STEP_TOLERANCE * median:
        return False
    numbers = [f.instance_number for f in frames]
    if all(f.frame_number == 1 for f in frames) and all(n is not None for n in numbers):
        values = sorted(int(n) for n in numbers if n is not None)
        if values[-1] - values[0] + 1 != len(values) or len(set(values)) != len(values):
            return False
    return True
