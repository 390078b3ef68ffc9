"""Assembling a series' frames into a volume in patient space (PS3.3 C.7.6.2).

Slices are ordered by their ImagePositionPatient projected on the slice normal (the cross
product of the ImageOrientationPatient row and column cosines), not by InstanceNumber or by
arrival order; that is right for oblique stacks too. Multi-frame instances are split into their
frames first (enhanced objects carry one position per frame in the Per-frame Functional Groups,
PS3.3 C.7.6.16). Without positions, InstanceNumber then frame number decide.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge.core.errors import DataError

Vector = tuple[float, float, float]


@dataclass(frozen=True)
class FrameGeometry:
    """Where one frame lies: its instance, frame number (1-based) and patient geometry."""

    sop_instance_uid: str
    frame_number: int = 1
    position: Vector | None = None  # ImagePositionPatient of the first voxel, mm
    orientation: tuple[float, ...] | None = None  # six direction cosines
    pixel_spacing: tuple[float, float] | None = None  # row, column spacing in mm
    instance_number: int | None = None
    slice_thickness: float | None = None  # mm


@dataclass(frozen=True, eq=False)
class Volume:
    """Frames stacked in slice order: ``voxels[i]`` is ``frames[i]``.

    ``spacing`` is (slice, row, column) in mm; the slice spacing is the median distance between
    neighbouring positions along ``normal`` (or the thickness when positions are missing).
    """

    voxels: np.ndarray
    frames: tuple[FrameGeometry, ...]
    spacing: Vector
    normal: Vector | None

    @property
    def source_sop_instance_uids(self) -> tuple[str, ...]:
        return tuple(f.sop_instance_uid for f in self.frames)


def _floats(value: Any, count: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == count and all(math.isfinite(v) for v in out) else None


def _item(sequence: Any, keyword: str) -> Any:
    """``sequence[0].keyword`` or None (functional group macros nest one item deep)."""
    try:
        return getattr(sequence[0], keyword, None)
    except (IndexError, TypeError):
        return None


def _int(value: Any) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def frame_geometries(header: Any) -> tuple[FrameGeometry, ...]:
    """The geometry of each frame of one instance (a header with DICOM keyword attributes).

    Single-frame objects use the top-level Image Plane attributes; enhanced multi-frame objects
    the Shared and Per-frame Functional Groups; other multi-frame objects repeat the top-level
    geometry (their frames then order by frame number).
    """
    uid = str(getattr(header, "SOPInstanceUID", ""))
    frames = _int(getattr(header, "NumberOfFrames", None)) or 1
    instance_number = _int(getattr(header, "InstanceNumber", None))
    thickness = _floats([getattr(header, "SliceThickness", None)], 1)
    base_position = _floats(getattr(header, "ImagePositionPatient", None) or (), 3)
    base_orientation = _floats(getattr(header, "ImageOrientationPatient", None) or (), 6)
    base_spacing = _floats(getattr(header, "PixelSpacing", None) or (), 2)
    shared = getattr(header, "SharedFunctionalGroupsSequence", None)
    per_frame = getattr(header, "PerFrameFunctionalGroupsSequence", None) or ()
    if shared is not None:
        plane = _item(shared, "PlaneOrientationSequence")
        if plane is not None:
            base_orientation = base_orientation or _floats(
                _item(plane, "ImageOrientationPatient") or (), 6)
        measures = _item(shared, "PixelMeasuresSequence")
        if measures is not None:
            base_spacing = base_spacing or _floats(_item(measures, "PixelSpacing") or (), 2)
            thickness = thickness or _floats([_item(measures, "SliceThickness")], 1)
    out = []
    for index in range(frames):
        position, orientation, spacing = base_position, base_orientation, base_spacing
        if index < len(per_frame):
            group = per_frame[index]
            plane = getattr(group, "PlanePositionSequence", None)
            if plane is not None:
                position = _floats(_item(plane, "ImagePositionPatient") or (), 3) or position
            plane_o = getattr(group, "PlaneOrientationSequence", None)
            if plane_o is not None:
                orientation = _floats(_item(plane_o, "ImageOrientationPatient") or (), 6) \
                    or orientation
            measures = getattr(group, "PixelMeasuresSequence", None)
            if measures is not None:
                spacing = _floats(_item(measures, "PixelSpacing") or (), 2) or spacing
        placed = position is not None and (index < len(per_frame) or frames == 1)
        out.append(FrameGeometry(  # one top-level position cannot place several frames
            sop_instance_uid=uid, frame_number=index + 1,
            position=(position[0], position[1], position[2]) if placed and position else None,
            orientation=orientation,
            pixel_spacing=(spacing[0], spacing[1]) if spacing else None,
            instance_number=instance_number, slice_thickness=thickness[0] if thickness else None))
    return tuple(out)


def _normal(orientation: tuple[float, ...]) -> Vector | None:
    r, c = orientation[:3], orientation[3:]
    n = (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])
    norm = math.sqrt(sum(v * v for v in n))
    return None if norm < 1e-6 else (n[0] / norm, n[1] / norm, n[2] / norm)


def slice_order(frames: Sequence[FrameGeometry]) -> tuple[list[int], Vector | None, list[float]]:
    """Indices of ``frames`` in volume order, the slice normal used, and each ordered frame's
    distance along it (empty when positions are missing and numbers decided)."""
    orientation = next((f.orientation for f in frames if f.orientation is not None), None)
    normal = _normal(orientation) if orientation is not None else None
    if normal is not None and all(f.position is not None for f in frames):
        distance = [float(np.dot(f.position or (0.0, 0.0, 0.0), normal)) for f in frames]
        order = sorted(range(len(frames)), key=lambda i: (
            distance[i], frames[i].instance_number or 0, frames[i].frame_number))
        return order, normal, [distance[i] for i in order]
    order = sorted(range(len(frames)), key=lambda i: (
        frames[i].instance_number if frames[i].instance_number is not None else 1 << 31,
        frames[i].sop_instance_uid, frames[i].frame_number))
    return order, normal, []


def assemble_volume(pixels: Sequence[np.ndarray], frames: Sequence[FrameGeometry]) -> Volume:
    """Stack 2D arrays (one per frame, any dtype) in slice order.

    Raises:
        DataError: no frames, a count mismatch, frames of different sizes, or orientations that
            differ by more than a degree (not one stack).
    """
    if not frames or len(pixels) != len(frames):
        raise DataError(f"volume: {len(pixels)} pixel arrays for {len(frames)} frames")
    shapes = {np.shape(p) for p in pixels}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise DataError(f"volume: frames must be 2D and of one size, got {sorted(shapes)}")
    orientations = [f.orientation for f in frames if f.orientation is not None]
    if orientations:
        first = np.asarray(orientations[0])
        for other in orientations[1:]:
            if float(np.abs(np.asarray(other) - first).max()) > 0.0175:  # ~1 degree
                raise DataError("volume: frames have different ImageOrientationPatient")
    order, normal, distance = slice_order(frames)
    steps = np.diff(distance) if len(distance) > 1 else np.array([])
    steps = steps[steps > 1e-4]
    thickness = next((f.slice_thickness for f in frames if f.slice_thickness), None)
    slice_mm = float(np.median(steps)) if steps.size else float(thickness or 1.0)
    spacing = next((f.pixel_spacing for f in frames if f.pixel_spacing is not None), (1.0, 1.0))
    voxels = np.stack([np.asarray(pixels[i]) for i in order])
    return Volume(voxels=voxels, frames=tuple(frames[i] for i in order),
                  spacing=(slice_mm, float(spacing[0]), float(spacing[1])), normal=normal)
