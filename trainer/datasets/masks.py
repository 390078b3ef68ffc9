"""Label masks from NIfTI volumes and DICOM SEG, brought onto the model's input grid.

NIfTI volumes follow docs/data-format.md: data indexed ``[column, row, slice]``, so
``data.transpose(2, 1, 0)[i]`` is the (rows, columns) mask of slice ``i``. DICOM SEG is read
with highdicom (PS3.3 A.51); segments are mapped to class indices by their label.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from edge.core.errors import DataError
from edge.preprocess.imaging import PreprocessSpec, ResizeMode


def read_nifti_slices(path: Path) -> np.ndarray:
    """A NIfTI mask as uint8 ``(slices, rows, columns)``.

    Raises:
        DataError: the file is missing, truncated or not NIfTI; the message names it.
    """
    import nibabel as nib

    try:
        data = np.asarray(nib.load(str(path)).dataobj)
    except Exception as exc:  # nibabel raises many types for bad files
        raise DataError(f"{path}: cannot read NIfTI mask: {exc}") from exc
    if data.ndim == 2:
        data = data[:, :, np.newaxis]
    if data.ndim != 3:
        raise DataError(f"{path}: expected a 3D mask, got shape {data.shape}")
    return np.ascontiguousarray(data.transpose(2, 1, 0)).astype(np.uint8)


def read_seg_by_source(path: Path, labels: Sequence[str]) -> dict[str, np.ndarray]:
    """Class-index maps ``(rows, columns)`` uint8 per referenced source SOP Instance UID.

    A segment whose SegmentLabel matches a name in ``labels`` (case-insensitive) gets that
    class index; otherwise its segment number is used. Where segments overlap the higher class
    wins.

    Raises:
        DataError: the file cannot be read as a DICOM SEG; the message names it.
    """
    import highdicom as hd

    try:
        seg = hd.seg.segread(str(path))
        names = {name.lower(): k for k, name in enumerate(labels)}
        classes: dict[int, int] = {}
        for number in seg.segment_numbers:
            label = str(seg.get_segment_description(number).segment_label).lower()
            classes[number] = names.get(label, number)
        uids = [uid for _, _, uid in seg.get_source_image_uids()]
        out: dict[str, np.ndarray] = {}
        for uid in uids:
            planes = seg.get_pixels_by_source_instance(
                [uid], segment_numbers=sorted(classes), assert_missing_frames_are_empty=True)
            plane = planes[0]  # (rows, cols, segments)
            label_map = np.zeros(plane.shape[:2], np.uint8)
            for idx, number in sorted(enumerate(sorted(classes)), key=lambda t: classes[t[1]]):
                label_map[plane[..., idx] > 0] = classes[number]
            out[str(uid)] = label_map
    except DataError:
        raise
    except Exception as exc:  # highdicom/pydicom raise many types for bad files
        raise DataError(f"{path}: cannot read DICOM SEG: {exc}") from exc
    return out


def fit_mask(mask: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Resize or letterbox a class-index map to ``spec``'s size with nearest neighbour.

    Mirrors :func:`edge.preprocess.imaging.fit_to_size` geometry (padding is background), so
    masks stay aligned with the images it produces.
    """
    h, w = mask.shape
    m = mask.astype(np.uint8)
    if (h, w) == (spec.height, spec.width):
        return m
    if spec.resize is ResizeMode.RESIZE:
        return cv2.resize(m, (spec.width, spec.height), interpolation=cv2.INTER_NEAREST)
    scale = min(spec.height / h, spec.width / w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    out = np.zeros((spec.height, spec.width), np.uint8)
    top, left = (spec.height - nh) // 2, (spec.width - nw) // 2
    out[top:top + nh, left:left + nw] = cv2.resize(m, (nw, nh), interpolation=cv2.INTER_NEAREST)
    return out


def combine_lung_nodule(lung: np.ndarray, nodule: np.ndarray) -> np.ndarray:
    """One class map: 0 background, 1 lung, 2 nodule (a nodule overrides lung)."""
    out = (lung > 0).astype(np.uint8)
    out[nodule > 0] = 2
    return out
