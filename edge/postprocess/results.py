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
