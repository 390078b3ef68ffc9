"""A user's folder of DICOM images with a CSV of labels.

CSV columns (header required):

- ``file`` (path relative to the folder) or ``sop_instance_uid`` (the folder is indexed by
  reading headers only); one of them is required;
- the label column (``label`` by default): a class index or a class name;
- optional ``split`` (train/val/test); otherwise by a hash of ``study_id``,
  ``study_instance_uid`` or ``series_instance_uid`` (whichever is present), else of the file;
- optional ``mask``: a NIfTI file (with ``slice_index``) or a DICOM SEG file, relative to the
  folder, giving the slice's class map.

Every bad row or file is skipped and listed in the load summary.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from tqdm import tqdm

from edge.core.errors import DataError
from edge.preprocess.imaging import PreprocessSpec
from trainer.datasets.base import SPLITS, LoadSummary, SkippedFile, SliceSet, empty_set, split_for
from trainer.datasets.masks import fit_mask, read_nifti_slices, read_seg_by_source
from trainer.datasets.slices import load_slice
from trainer.datasets.synthetic import IGNORE

log = logging.getLogger(__name__)

GROUP_COLUMNS = ("study_id", "study_instance_uid", "series_instance_uid")


def index_by_sop_uid(data_dir: Path, skipped: list[SkippedFile]) -> dict[str, Path]:
    """SOP Instance UID -> file for every DICOM file under ``data_dir`` (headers only)."""
    index: dict[str, Path] = {}
    for path in sorted(p for p in data_dir.rglob("*") if p.is_file()):
        if path.suffix.lower() in (".csv", ".json", ".gz", ".nii", ".npz", ".txt", ".md"):
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True,
                                 specific_tags=["SOPInstanceUID"])
            index[str(ds.SOPInstanceUID)] = path
        except Exception as exc:  # not DICOM, truncated header
            skipped.append(SkippedFile(str(path.relative_to(data_dir)),
                                       f"not readable as DICOM: {exc}"))
    return index


def _label(value: str, labels: Sequence[str]) -> int:
    text = value.strip()
    names = {n.lower(): k for k, n in enumerate(labels)}
    if text.lower() in names:
        return names[text.lower()]
    try:
        k = int(float(text))
    except ValueError as exc:
        raise DataError(f"label {text!r} is neither a class index nor one of {list(labels)}") \
            from exc
    if not 0 <= k < len(labels):
        raise DataError(f"label {k} outside 0..{len(labels) - 1}")
    return k


class _MaskReader:
    """Reads and remembers mask files referenced from many CSV rows."""

    def __init__(self, data_dir: Path, labels: Sequence[str]) -> None:
        self._dir, self._labels = data_dir, labels
        self._nifti: dict[str, np.ndarray] = {}
        self._seg: dict[str, dict[str, np.ndarray]] = {}

    def mask(self, rel: str, slice_index: str | None, sop_uid: str) -> np.ndarray:
        """The class map of one slice. Raises DataError naming the mask file."""
        path = self._dir / rel
        if rel.endswith((".nii", ".nii.gz")):
            if rel not in self._nifti:
                self._nifti[rel] = read_nifti_slices(path)
            vol = self._nifti[rel]
            if slice_index is None or not slice_index.strip().isdigit():
                raise DataError(f"{rel}: a NIfTI mask needs a slice_index column")
            i = int(slice_index)
            if i >= vol.shape[0]:
                raise DataError(f"{rel}: slice_index {i} beyond {vol.shape[0]} slices")
            return vol[i]
        if rel not in self._seg:
            self._seg[rel] = read_seg_by_source(path, self._labels)
        by_uid = self._seg[rel]
        if sop_uid not in by_uid:
            raise DataError(f"{rel}: SEG does not reference this slice's SOP Instance UID")
        return by_uid[sop_uid]


def load_dicom_folder(data_dir: Path, csv_path: Path, spec: PreprocessSpec, *,
                      labels: Sequence[str], label_column: str = "label",
                      mask_labels: Sequence[str] = (), progress: bool = True) -> SliceSet:
    """Load the slices a label CSV lists, preprocessed with ``spec``.

    Raises:
        DataError: the CSV is unreadable or lacks the ``file``/``sop_instance_uid`` or label
            column. Bad rows, images and masks are skipped and listed in the summary.
    """
    data_dir = Path(data_dir)
    try:
        text = Path(csv_path).read_text()
    except OSError as exc:
        raise DataError(f"{csv_path}: cannot read label CSV: {exc}") from exc
    rows = list(csv.DictReader(text.splitlines()))
    columns = set(rows[0]) if rows else set()
    if not ({"file", "sop_instance_uid"} & columns):
        raise DataError(f"{csv_path}: needs a 'file' or 'sop_instance_uid' column")
    if label_column not in columns:
        raise DataError(f"{csv_path}: no label column {label_column!r}")
    skipped: list[SkippedFile] = []
    by_uid = index_by_sop_uid(data_dir, skipped) if "file" not in columns else {}
    masks_reader = _MaskReader(data_dir, mask_labels) if "mask" in columns else None
    group_col = next((c for c in GROUP_COLUMNS if c in columns), None)
    digest = hashlib.sha256(text.encode())
    images, ys, masks, groups, splits, sources = [], [], [], [], [], []
    geometries: list[np.ndarray] = []
    for n, row in enumerate(tqdm(rows, desc="decode slices", unit="img", disable=not progress)):
        rel = (row.get("file") or "").strip()
        where = f"{csv_path.name} row {n + 2}"
        try:
            if rel:
                path = data_dir / rel
            else:
                uid = (row.get("sop_instance_uid") or "").strip()
                if uid not in by_uid:
                    raise DataError(f"{where}: no file with this sop_instance_uid")
                path = by_uid[uid]
                rel = str(path.relative_to(data_dir))
            y = _label(row[label_column], labels)
            image, sop_uid, _, geometry = load_slice(path, spec)
            mask = None
            if masks_reader is not None and (row.get("mask") or "").strip():
                raw = masks_reader.mask(row["mask"].strip(), row.get("slice_index"), sop_uid)
                mask = fit_mask(raw, spec)
        except DataError as exc:
            skipped.append(SkippedFile(rel or where, str(exc)))
            continue
        group = (row.get(group_col) or "").strip() if group_col else ""
        split = (row.get("split") or "").strip()
        images.append(image)
        ys.append(y)
        masks.append(mask if mask is not None else
                     np.full((spec.height, spec.width), IGNORE, np.uint8))
        groups.append(group or rel)
        splits.append(split if split in SPLITS else split_for(group or rel))
        sources.append(rel)
        geometries.append(geometry)
        digest.update(f"{rel}:{path.stat().st_size}".encode())
    fingerprint = "sha256:" + digest.hexdigest()
    summary = LoadSummary(len(images), tuple(skipped))
    if not images:
        return empty_set(spec.height, spec.width, fingerprint, summary, with_masks=True)
    return SliceSet(
        images=np.stack(images), labels=np.asarray(ys, np.int64), masks=np.stack(masks),
        groups=np.asarray(groups, dtype=object), splits=np.asarray(splits, dtype=object),
        sources=np.asarray(sources, dtype=object), fingerprint=fingerprint, summary=summary,
        geometry=np.stack(geometries))
