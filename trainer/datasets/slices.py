"""Decoding one DICOM slice into a model input with the shared preprocessing."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge.core.errors import DataError
from edge.preprocess.dicom_pixels import read_image
from edge.preprocess.imaging import PreprocessSpec, preprocess_image


def frame_geometry_row(position: tuple[float, ...] | None,
                       orientation: tuple[float, ...] | None) -> np.ndarray:
    """(9,) float64: ImagePositionPatient then ImageOrientationPatient, NaN where missing."""
    row = np.full(9, np.nan)
    if position is not None and len(position) == 3:
        row[:3] = position
    if orientation is not None and len(orientation) == 6:
        row[3:] = orientation
    return row


def load_slice(path: Path, spec: PreprocessSpec
               ) -> tuple[np.ndarray, str, tuple[int, int], np.ndarray]:
    """The preprocessed (1, H, W) float32 image, its SOP Instance UID, its stored size and its
    geometry row (:func:`frame_geometry_row`).

    Uses :func:`edge.preprocess.dicom_pixels.read_image` and
    :func:`edge.preprocess.imaging.preprocess_image`, exactly as serving does.

    Raises:
        DataError: unreadable, undecodable, multi-frame, or not a 2D image; names the file.
    """
    decoded = read_image(path)
    if decoded.frames.shape[0] != 1:
        raise DataError(f"{path}: {decoded.frames.shape[0]} frames; only single-frame images")
    frame = decoded.frames[0]
    try:
        image = preprocess_image(frame, decoded.meta, spec)
    except ValueError as exc:
        raise DataError(f"{path}: {exc}") from exc
    if not np.all(np.isfinite(image)):
        raise DataError(f"{path}: non-finite pixel values after preprocessing")
    return (image, decoded.sop_instance_uid, (int(frame.shape[0]), int(frame.shape[1])),
            frame_geometry_row(decoded.position, decoded.orientation))
