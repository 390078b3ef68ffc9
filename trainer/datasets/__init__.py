"""Training data: synthetic study folders, user DICOM folders with a label CSV, masks (NIfTI,
DICOM SEG) and boxes (COCO). Everything is preprocessed with ``edge.preprocess`` so training
sees exactly what serving will.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from edge.core.errors import DataError
from edge.preprocess.imaging import PreprocessSpec
from trainer.datasets.base import (
    CLASSIFY_LABELS,
    IGNORED_LABEL,
    SEGMENT_LABELS,
    SPLITS,
    LoadSummary,
    SkippedFile,
    SliceSet,
    visible_nodule_labels,
)
from trainer.datasets.coco import CocoDataset, load_coco
from trainer.datasets.dicom_folder import load_dicom_folder
from trainer.datasets.synthetic import IGNORE, MANIFEST, load_synthetic

__all__ = [
    "CLASSIFY_LABELS", "IGNORE", "IGNORED_LABEL", "SEGMENT_LABELS", "SPLITS", "CocoDataset",
    "LoadSummary", "SkippedFile", "SliceSet", "load_coco", "load_data", "load_dicom_folder",
    "load_synthetic", "visible_nodule_labels",
]


def load_data(data_dir: Path, spec: PreprocessSpec, *, labels: Sequence[str],
              labels_csv: Path | None = None, label_column: str = "label",
              mask_labels: Sequence[str] = SEGMENT_LABELS, use_cache: bool = True,
              progress: bool = True) -> SliceSet:
    """Load a data folder: synthetic when it has ``manifest.json``, else DICOM + label CSV.

    Raises:
        DataError: neither a manifest nor a label CSV (``labels_csv`` or ``DIR/labels.csv``).
    """
    data_dir = Path(data_dir)
    if labels_csv is None and (data_dir / MANIFEST).is_file():
        return load_synthetic(data_dir, spec, use_cache=use_cache, progress=progress)
    csv_path = labels_csv or data_dir / "labels.csv"
    if not Path(csv_path).is_file():
        raise DataError(f"{data_dir}: no {MANIFEST} and no label CSV ({csv_path})")
    return load_dicom_folder(data_dir, Path(csv_path), spec, labels=labels,
                             label_column=label_column, mask_labels=mask_labels,
                             progress=progress)
