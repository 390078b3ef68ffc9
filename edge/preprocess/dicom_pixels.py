"""Reading pixels and the header fields preprocessing needs from DICOM files.

pydicom Datasets stop here: callers get numpy frames and :class:`PixelMeta`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from edge.core.errors import DataError
from edge.preprocess.imaging import PixelMeta


@dataclass(frozen=True)
class DecodedImage:
    """The stored frames of one instance (frames, rows, cols) and their pixel metadata."""

    frames: np.ndarray
    meta: PixelMeta
    sop_instance_uid: str
    series_instance_uid: str
    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None


def pixel_meta(ds: Dataset) -> PixelMeta:
    """The modality LUT and photometric interpretation of a dataset (defaults when absent)."""
    return PixelMeta(
        rescale_slope=float(getattr(ds, "RescaleSlope", 1.0) or 1.0),
        rescale_intercept=float(getattr(ds, "RescaleIntercept", 0.0) or 0.0),
        photometric_interpretation=str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")),
    )


def decode(ds: Dataset, source: str = "<dataset>") -> DecodedImage:
    """Decode a dataset's pixels (any transfer syntax pydicom's plugins handle).

    Raises:
        DataError: no pixel data, or it cannot be decoded; the message names ``source``.
    """
    if "PixelData" not in ds:
        raise DataError(f"{source}: no PixelData")
    try:
        arr = ds.pixel_array
    except Exception as exc:  # pydicom raises many types for undecodable data
        raise DataError(f"{source}: cannot decode pixels: {exc}") from exc
    if arr.ndim == 2:
        arr = arr[np.newaxis]
    elif arr.ndim == 4:  # colour: keep luminance-like mean
        arr = arr.mean(axis=-1)
    position = tuple(float(v) for v in ds.ImagePositionPatient) \
        if "ImagePositionPatient" in ds else None
    orientation = tuple(float(v) for v in ds.ImageOrientationPatient) \
        if "ImageOrientationPatient" in ds else None
    return DecodedImage(
        frames=arr,
        meta=pixel_meta(ds),
        sop_instance_uid=str(getattr(ds, "SOPInstanceUID", "")),
        series_instance_uid=str(getattr(ds, "SeriesInstanceUID", "")),
        position=position,  # type: ignore[arg-type]
        orientation=orientation,
    )


def read_image(path: Path) -> DecodedImage:
    """Read and decode one DICOM file.

    Raises:
        DataError: the file is unreadable, not DICOM, or its pixels cannot be decoded.
    """
    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:
        raise DataError(f"{path}: not readable as DICOM: {exc}") from exc
    return decode(ds, str(path))
