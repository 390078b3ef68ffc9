"""Results handed from postprocess to the writers (see ``docs/dicom-pipeline-interfaces.md``).

Frozen dataclasses only. They carry no pydicom objects: a writer joins them with the source
instances' headers to build DICOM Segmentation (PS3.3 A.51) and TID 1500 SR objects.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from edge.core.types import ModelId


@dataclass(frozen=True)
class VoxelSpacing:
    """Voxel size in mm: Pixel Spacing (row, column; PS3.3 C.7.6.2.1.1) and slice spacing."""

    row_mm: float
    column_mm: float
    slice_mm: float

    def __post_init__(self) -> None:
        for name in ("row_mm", "column_mm", "slice_mm"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"VoxelSpacing.{name} must be > 0, got {value}")

    @property
    def voxel_ml(self) -> float:
        """Volume of one voxel in mL (1 mL = 1000 mm^3)."""
        return self.row_mm * self.column_mm * self.slice_mm / 1000.0


@dataclass(frozen=True)
class SliceClassification:
    """One instance's class probabilities, one per label."""

    sop_instance_uid: str
    probabilities: tuple[float, ...]


@dataclass(frozen=True)
class SeriesClassification:
    """Series verdict of a classifier: ``probability`` of ``positive_label`` vs ``threshold``."""

    model: ModelId
    labels: tuple[str, ...]
    slices: tuple[SliceClassification, ...]  # in volume order
    probability: float
    positive: bool  # probability >= threshold
    threshold: float
    positive_label: str = ""  # "" means the last label
    aggregation: str = "max"  # how slice probabilities became ``probability``

    def __post_init__(self) -> None:
        if not self.labels:
            raise ValueError("SeriesClassification.labels is empty")
        if not self.positive_label:
            object.__setattr__(self, "positive_label", self.labels[-1])
        if self.positive_label not in self.labels:
            raise ValueError(f"SeriesClassification.positive_label {self.positive_label!r} "
                             f"is not one of {self.labels}")
        for s in self.slices:
            if len(s.probabilities) != len(self.labels):
                raise ValueError(f"SeriesClassification: slice {s.sop_instance_uid} has "
                                 f"{len(s.probabilities)} probabilities for {len(self.labels)} "
                                 "labels")


@dataclass(frozen=True, eq=False)
class SeriesSegmentation:
    """A label map in the source frames' geometry; label ``i`` of ``label_map`` is ``labels[i]``.

    ``eq=False``: equality of numpy arrays is element-wise, so instances compare by identity.
    """

    model: ModelId
    labels: tuple[str, ...]  # index 0 is background
    label_map: np.ndarray  # (slices, rows, columns) uint8, original geometry
    source_sop_instance_uids: tuple[str, ...]  # the instance of each label_map slice
    volumes_ml: Mapping[str, float] = field(default_factory=dict)  # per foreground label
    component_counts: Mapping[str, int] = field(default_factory=dict)  # per foreground label
    spacing: VoxelSpacing | None = None

    def __post_init__(self) -> None:
        lm = self.label_map
        if lm.ndim != 3 or lm.dtype != np.uint8:
            raise ValueError(f"SeriesSegmentation.label_map must be 3D uint8, got "
                             f"{lm.ndim}D {lm.dtype}")
        if lm.shape[0] != len(self.source_sop_instance_uids):
            raise ValueError(f"SeriesSegmentation: {lm.shape[0]} slices but "
                             f"{len(self.source_sop_instance_uids)} source_sop_instance_uids")
        if len(self.labels) < 2:
            raise ValueError("SeriesSegmentation.labels needs background and >= 1 foreground")
        if lm.size and int(lm.max()) >= len(self.labels):
            raise ValueError(f"SeriesSegmentation.label_map has value {int(lm.max())} but only "
                             f"{len(self.labels)} labels")

    @property
    def foreground_labels(self) -> tuple[str, ...]:
        """Labels 1..n: one DICOM segment each, segment number = label index."""
        return self.labels[1:]


# -- detection (see docs/detection.md) ----------------------------------------------------------


@dataclass(frozen=True)
class Box:
    """An axis-aligned box in continuous pixel coordinates of the source frame.

    Pixel ``(row, column)`` covers ``[column, column + 1) x [row, row + 1)``, as in COCO; so a box
    over columns 10..14 has ``x0 = 10`` and ``x1 = 15``, and its centre voxel index is
    ``(x0 + x1) / 2 - 0.5``.
    """

    x0: float
    y0: float
    x1: float
    y1: float
    score: float
    label: str

    def __post_init__(self) -> None:
        if not (self.x1 >= self.x0 and self.y1 >= self.y0):
            raise ValueError(f"Box: corners out of order ({self.x0}, {self.y0}, {self.x1}, "
                             f"{self.y1})")

    @property
    def width(self) -> float:
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        return self.y1 - self.y0

    @property
    def area(self) -> float:
        return self.width * self.height


@dataclass(frozen=True)
class SliceDetection:
    """The boxes found on one instance (one frame), in that frame's geometry."""

    sop_instance_uid: str
    boxes: tuple[Box, ...] = ()


@dataclass(frozen=True)
class NoduleCandidate:
    """Boxes on neighbouring slices merged into one 3D finding.

    ``center_voxel`` is (slice, row, column) in voxel index units of the volume (fractional);
    ``center_mm`` the same point in patient coordinates (LPS, mm; None without frame positions).
    ``slice_range`` is inclusive, in volume order. ``diameter_mm`` is the long axis of the
    largest box. ``boxes`` pairs each slice index with its box.
    """

    label: str
    score: float
    center_voxel: tuple[float, float, float]
    center_mm: tuple[float, float, float] | None
    diameter_mm: float
    slice_range: tuple[int, int]
    boxes: tuple[tuple[int, Box], ...] = ()

    def __post_init__(self) -> None:
        if self.slice_range[0] > self.slice_range[1]:
            raise ValueError(f"NoduleCandidate.slice_range {self.slice_range} is reversed")


@dataclass(frozen=True)
class SeriesDetection:
    """A detector's findings on one series: per-slice boxes and the merged 3D candidates."""

    model: ModelId
    labels: tuple[str, ...]
    candidates: tuple[NoduleCandidate, ...]  # by decreasing score
    slices: tuple[SliceDetection, ...]  # in volume order

    def __post_init__(self) -> None:
        known = set(self.labels)
        for c in self.candidates:
            if c.label not in known:
                raise ValueError(f"SeriesDetection: candidate label {c.label!r} is not one of "
                                 f"{self.labels}")
