"""Voxel indices of a slice stack -> patient coordinates (LPS, mm), for SCOORD3D content.

PS3.3 C.7.6.2.1.1: the centre of pixel (row ``j``, column ``i``) of a slice lies at
``S + i * dc * X + j * dr * Y``, where ``S`` is its ImagePositionPatient, ``X`` and ``Y`` the
row and column direction cosines of ImageOrientationPatient (``X`` points along increasing
column index), ``dr`` = PixelSpacing[0] (between rows) and ``dc`` = PixelSpacing[1] (between
columns). A fractional slice index interpolates the positions of its two neighbours (and
extrapolates linearly past the ends), so stacks with uneven spacing come out right. The
coordinates are those of the series' Frame of Reference (PS3.3 C.7.4.1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

from edge.preprocess.volume import frame_geometries


@dataclass(frozen=True, eq=False)
class SliceStack:
    """The patient geometry of a series' slices in volume order.

    ``positions`` is (n, 3): each slice's ImagePositionPatient; ``row_cosine`` / ``column_cosine``
    the ImageOrientationPatient halves; ``pixel_spacing`` (between rows, between columns) in mm.
    """

    positions: np.ndarray
    row_cosine: np.ndarray
    column_cosine: np.ndarray
    pixel_spacing: tuple[float, float]
    thickness: float
    frame_of_reference_uid: str

    @classmethod
    def from_headers(cls, headers: Sequence[Dataset]) -> SliceStack:
        """The stack of single-frame ``headers``, given in volume order.

        Raises:
            ValueError: no headers, or one lacks ImagePositionPatient, ImageOrientationPatient,
                PixelSpacing or FrameOfReferenceUID (the message names the attribute).
        """
        if not headers:
            raise ValueError("SliceStack: no slices")
        frames = [frame_geometries(h)[0] for h in headers]
        for name, missing in (("ImagePositionPatient", [f.position is None for f in frames]),
                              ("ImageOrientationPatient",
                               [f.orientation is None for f in frames]),
                              ("PixelSpacing", [f.pixel_spacing is None for f in frames])):
            if any(missing):
                raise ValueError(f"SliceStack: a slice has no {name}")
        uid = str(headers[0].get("FrameOfReferenceUID", ""))
        if not uid:
            raise ValueError("SliceStack: the series has no FrameOfReferenceUID")
        first = frames[0]
        assert first.orientation is not None and first.pixel_spacing is not None
        orientation = np.asarray(first.orientation, np.float64)
        return cls(positions=np.asarray([f.position for f in frames], np.float64),
                   row_cosine=orientation[:3], column_cosine=orientation[3:],
                   pixel_spacing=first.pixel_spacing,
                   thickness=float(first.slice_thickness or 1.0), frame_of_reference_uid=uid)

    @property
    def normal(self) -> np.ndarray:
        """Unit slice normal (row cosine x column cosine)."""
        n = np.cross(self.row_cosine, self.column_cosine)
        return np.asarray(n / np.linalg.norm(n))

    @property
    def slice_distance(self) -> float:
        """Mean distance between neighbouring slices along the normal (the thickness for one
        slice)."""
        if len(self.positions) < 2:
            return self.thickness
        span = float(np.dot(self.positions[-1] - self.positions[0], self.normal))
        return abs(span) / (len(self.positions) - 1)

    def slice_position(self, index: float) -> np.ndarray:
        """ImagePositionPatient at a fractional slice ``index`` (interpolated/extrapolated)."""
        p = self.positions
        if len(p) < 2:
            return np.asarray(p[0] + index * self.thickness * self.normal)
        lo = int(np.clip(np.floor(index), 0, len(p) - 2))
        return np.asarray(p[lo] + (index - lo) * (p[lo + 1] - p[lo]))

    def to_patient(self, index: float, row: float, column: float) -> np.ndarray:
        """(x, y, z) in mm of voxel (slice ``index``, ``row``, ``column``); pixel centres are at
        integer row/column."""
        return np.asarray(self.slice_position(index)
                          + column * self.pixel_spacing[1] * self.row_cosine
                          + row * self.pixel_spacing[0] * self.column_cosine)
