"""What routing knows about a series: a frozen :class:`SeriesInfo` read from one header.

The header is any object with DICOM keyword attributes (a pydicom Dataset read with
``stop_before_pixels``); nothing here decodes pixels or keeps the dataset.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


class Orientation(str, enum.Enum):
    """The plane of a slice, from the dominant axis of its normal (PS3.3 C.7.6.2.1.1)."""

    AXIAL = "axial"  # normal along the patient's z (feet-head)
    CORONAL = "coronal"  # normal along y (anterior-posterior)
    SAGITTAL = "sagittal"  # normal along x (right-left)
    UNKNOWN = "unknown"  # no or a degenerate ImageOrientationPatient


class DimsePriority(enum.IntEnum):
    """The C-STORE request's Priority (PS3.7 9.1.1.1.8)."""

    MEDIUM = 0
    HIGH = 1
    LOW = 2


def slice_normal(orientation: Sequence[float]) -> tuple[float, float, float] | None:
    """The unit normal (row x column direction cosines), or None when ``orientation`` is not six
    numbers spanning a plane."""
    if len(orientation) != 6:
        return None
    r, c = orientation[:3], orientation[3:]
    n = (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])
    norm = math.sqrt(sum(v * v for v in n))
    if not math.isfinite(norm) or norm < 1e-6:
        return None
    return (n[0] / norm, n[1] / norm, n[2] / norm)


def orientation_of(orientation: Sequence[float] | None) -> Orientation:
    """Axial, coronal or sagittal by the dominant component of the slice normal."""
    normal = slice_normal(orientation) if orientation is not None else None
    if normal is None:
        return Orientation.UNKNOWN
    axis = max(range(3), key=lambda i: abs(normal[i]))
    return (Orientation.SAGITTAL, Orientation.CORONAL, Orientation.AXIAL)[axis]


def _text(header: Any, keyword: str) -> str:
    value = getattr(header, keyword, None)
    return "" if value is None else str(value).strip()


def _number(header: Any, keyword: str) -> float | None:
    value = getattr(header, keyword, None)
    try:
        number = float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None
    return number if number is not None and math.isfinite(number) else None


def _orientation(header: Any) -> tuple[float, ...] | None:
    value = getattr(header, "ImageOrientationPatient", None)
    if value is None:  # enhanced multi-frame: the shared functional groups carry it
        try:
            value = header.SharedFunctionalGroupsSequence[0] \
                .PlaneOrientationSequence[0].ImageOrientationPatient
        except (AttributeError, IndexError, KeyError):
            return None
    try:
        return tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class SeriesInfo:
    """The routing-relevant attributes of a series, taken from its first instance's header."""

    study_instance_uid: str
    series_instance_uid: str
    modality: str = ""
    body_part: str = ""  # BodyPartExamined
    sop_class_uid: str = ""
    series_description: str = ""
    image_type: tuple[str, ...] = ()
    slice_thickness: float | None = None  # mm
    orientation: Orientation = Orientation.UNKNOWN
    calling_ae: str = ""
    priority: DimsePriority = DimsePriority.MEDIUM
    images_in_acquisition: int | None = None  # (0020,1002), the expected count when given
    number_of_frames: int = 1

    @classmethod
    def from_header(cls, header: Any, calling_ae: str = "",
                    priority: int = DimsePriority.MEDIUM) -> SeriesInfo:
        """Read a header (DICOM keywords as attributes). Missing attributes become empty.

        Raises:
            ValueError: the header has no StudyInstanceUID or SeriesInstanceUID.
        """
        study, series = _text(header, "StudyInstanceUID"), _text(header, "SeriesInstanceUID")
        if not study or not series:
            raise ValueError("header without StudyInstanceUID or SeriesInstanceUID")
        image_type = getattr(header, "ImageType", None) or ()
        if isinstance(image_type, str):
            image_type = image_type.split("\\")
        expected = _number(header, "ImagesInAcquisition")
        frames = _number(header, "NumberOfFrames")
        try:
            dimse = DimsePriority(int(priority))
        except ValueError:
            dimse = DimsePriority.MEDIUM
        return cls(
            study_instance_uid=study, series_instance_uid=series,
            modality=_text(header, "Modality").upper(),
            body_part=_text(header, "BodyPartExamined").upper(),
            sop_class_uid=_text(header, "SOPClassUID"),
            series_description=_text(header, "SeriesDescription"),
            image_type=tuple(str(v).strip().upper() for v in image_type),
            slice_thickness=_number(header, "SliceThickness"),
            orientation=orientation_of(_orientation(header)),
            calling_ae=calling_ae.strip(),
            priority=dimse,
            images_in_acquisition=int(expected) if expected and expected > 0 else None,
            number_of_frames=int(frames) if frames and frames > 1 else 1,
        )
