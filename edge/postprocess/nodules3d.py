"""Slice detections merged into 3D nodule candidates.

Boxes of one label on neighbouring slices are linked into tracks: a box joins the track whose
last box (at most ``max_gap`` slices back) overlaps it by IoU >= ``min_iou`` or whose centre lies
within ``max_center_mm`` in plane; pairs are taken greedily, best IoU first, each track and box
once. Each track becomes a :class:`NoduleCandidate`:

- ``center_voxel``: the box-area-weighted mean of the box centres (slice, row, column) in voxel
  index units (a box over columns 10..14 is centred on column 12), which approximates a blob's
  centroid; ``center_mm`` is that point in patient coordinates (PS3.3 C.7.6.2.1.1), the slice
  position interpolated between neighbouring frames' ImagePositionPatient;
- ``diameter_mm``: the long axis of the largest box (width x column spacing, height x row
  spacing), the RECIST-like axial measurement;
- ``slice_range``: first and last slice (inclusive); ``score``: max (default) or mean of the
  boxes' scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from edge.core.types import ModelId
from edge.postprocess.results import (
    Box,
    NoduleCandidate,
    SeriesDetection,
    SliceDetection,
    VoxelSpacing,
)
from edge.preprocess.volume import FrameGeometry


@dataclass(frozen=True)
class MergeSpec:
    """How slice boxes are linked into candidates."""

    min_iou: float = 0.3
    max_center_mm: float = 5.0
    max_gap: int = 1  # slices a track may skip (one missed detection)
    min_slices: int = 1  # shorter tracks are dropped
    score: str = "max"  # or "mean"

    def __post_init__(self) -> None:
        if self.score not in ("max", "mean"):
            raise ValueError(f"MergeSpec.score must be max or mean, got {self.score!r}")
        if self.max_gap < 0 or self.min_slices < 1:
            raise ValueError("MergeSpec: max_gap must be >= 0 and min_slices >= 1")


@dataclass
class _Track:
    boxes: list[tuple[int, Box]] = field(default_factory=list)


def _iou(a: Box, b: Box) -> float:
    w = max(0.0, min(a.x1, b.x1) - max(a.x0, b.x0))
    h = max(0.0, min(a.y1, b.y1) - max(a.y0, b.y0))
    inter = w * h
    union = a.area + b.area - inter
    return inter / union if union > 0 else 0.0


def _center_mm(a: Box, b: Box, spacing: VoxelSpacing) -> float:
    dx = ((a.x0 + a.x1) - (b.x0 + b.x1)) / 2 * spacing.column_mm
    dy = ((a.y0 + a.y1) - (b.y0 + b.y1)) / 2 * spacing.row_mm
    return float(np.hypot(dx, dy))


def _link(per_slice: Sequence[Sequence[Box]], spacing: VoxelSpacing,
          spec: MergeSpec) -> list[_Track]:
    """Tracks of one label's boxes, ``per_slice[z]`` being slice z's boxes."""
    tracks: list[_Track] = []
    for z, boxes in enumerate(per_slice):
        open_tracks = [t for t in tracks if z - t.boxes[-1][0] - 1 <= spec.max_gap]
        pairs = []
        for ti, track in enumerate(open_tracks):
            last = track.boxes[-1][1]
            for bi, box in enumerate(boxes):
                iou, dist = _iou(last, box), _center_mm(last, box, spacing)
                if iou >= spec.min_iou or dist <= spec.max_center_mm:
                    pairs.append((-iou, dist, ti, bi))
        used_t: set[int] = set()
        used_b: set[int] = set()
        for _, _, ti, bi in sorted(pairs):
            if ti not in used_t and bi not in used_b:
                used_t.add(ti)
                used_b.add(bi)
                open_tracks[ti].boxes.append((z, boxes[bi]))
        tracks += [_Track([(z, box)]) for bi, box in enumerate(boxes) if bi not in used_b]
    return tracks


def _patient_mm(center: tuple[float, float, float], frames: Sequence[FrameGeometry],
                spacing: VoxelSpacing) -> tuple[float, float, float] | None:
    positions = [f.position for f in frames]
    orientation = next((f.orientation for f in frames if f.orientation is not None), None)
    if orientation is None or any(p is None for p in positions):
        return None
    z, row, col = center
    ipp = np.asarray(positions, np.float64)
    at = [float(np.interp(z, np.arange(len(ipp)), ipp[:, k])) for k in range(3)]
    point = (np.asarray(at) + col * spacing.column_mm * np.asarray(orientation[:3])
             + row * spacing.row_mm * np.asarray(orientation[3:]))
    return float(point[0]), float(point[1]), float(point[2])


def _candidate(track: _Track, label: str, frames: Sequence[FrameGeometry] | None,
               spacing: VoxelSpacing, spec: MergeSpec) -> NoduleCandidate:
    z = np.array([s for s, _ in track.boxes], np.float64)
    boxes = [b for _, b in track.boxes]
    weight = np.array([max(b.area, 1e-9) for b in boxes])
    rows = np.array([(b.y0 + b.y1) / 2 - 0.5 for b in boxes])
    cols = np.array([(b.x0 + b.x1) / 2 - 0.5 for b in boxes])
    center = (float(np.average(z, weights=weight)), float(np.average(rows, weights=weight)),
              float(np.average(cols, weights=weight)))
    largest = max(boxes, key=lambda b: b.area * spacing.row_mm * spacing.column_mm)
    scores = [b.score for b in boxes]
    return NoduleCandidate(
        label=label, score=float(max(scores) if spec.score == "max" else np.mean(scores)),
        center_voxel=center,
        center_mm=_patient_mm(center, frames, spacing) if frames else None,
        diameter_mm=max(largest.width * spacing.column_mm, largest.height * spacing.row_mm),
        slice_range=(int(z.min()), int(z.max())), boxes=tuple(track.boxes))


def merge_slices(slices: Sequence[SliceDetection], spacing: VoxelSpacing,
                 frames: Sequence[FrameGeometry] | None = None,
                 spec: MergeSpec | None = None) -> tuple[NoduleCandidate, ...]:
    """3D candidates from per-slice detections in volume order, by decreasing score.

    ``frames`` (``Volume.frames``, same order) place the candidates in patient space.

    Raises:
        ValueError: ``frames`` given for a different number of slices or other instances.
    """
    spec = spec or MergeSpec()
    if frames is not None and (len(frames) != len(slices) or any(
            f.sop_instance_uid != s.sop_instance_uid for f, s in zip(frames, slices,
                                                                    strict=True))):
        raise ValueError(f"merge_slices: {len(frames)} frames do not match the "
                         f"{len(slices)} slices' instances")
    labels = sorted({b.label for s in slices for b in s.boxes})
    out = []
    for label in labels:
        per_slice = [[b for b in s.boxes if b.label == label] for s in slices]
        for track in _link(per_slice, spacing, spec):
            if len(track.boxes) >= spec.min_slices:
                out.append(_candidate(track, label, frames, spacing, spec))
    return tuple(sorted(out, key=lambda c: (-c.score, c.slice_range, c.center_voxel)))


def detect_series(model: ModelId, labels: Sequence[str], slices: Sequence[SliceDetection],
                  spacing: VoxelSpacing, frames: Sequence[FrameGeometry] | None = None,
                  spec: MergeSpec | None = None) -> SeriesDetection:
    """The series result of a detector: its slices and their merged candidates.

    Raises:
        ValueError: as :func:`merge_slices`, or a box label not in ``labels``.
    """
    return SeriesDetection(model=model, labels=tuple(labels),
                           candidates=merge_slices(slices, spacing, frames, spec),
                           slices=tuple(slices))
