"""Preprocessed samples for calibration and for the accuracy gate, and the calibration reader.

Sources, by what ``path`` is:

- a synthetic study folder (``manifest.json``) or a DICOM folder with a label CSV: read with
  ``trainer.datasets.load_data`` (numpy and ``edge.preprocess`` only, no torch), which gives
  labels and masks for the gate;
- any other folder: every DICOM file under it (no labels; calibration only);
- a ``.npy`` (images) or ``.npz`` (``images``, optional ``labels``, ``masks``) of
  already-preprocessed (N, C, H, W) float32 arrays.

Every image goes through :func:`edge.preprocess.imaging.preprocess_image` with the model's own
sidecar spec, exactly as serving does. For a 2.5D model (``context_slices`` > 0) each slice is
stacked with its neighbours as serving stacks them: the trainer's
``SliceSet.with_context`` for a dataset, :func:`edge.preprocess.series_input.series_inputs`
per series for a DICOM folder.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge.core.errors import DataError
from edge.core.types import Task
from edge.preprocess.imaging import PreprocessSpec

log = logging.getLogger(__name__)

IGNORE = 255  # mask value without a reference (trainer.datasets.IGNORE)


@dataclass(frozen=True, eq=False)
class DetectionTruth:
    """What the detection metric needs beside the images: the slices with their boxes and
    COCO image ids (``trainer.detect.DetectionSet``, row i = image i), the COCO file, the
    manifest of a synthetic folder (None for user data), and the preprocessing that made the
    images (boxes are mapped back to each slice's frame with it)."""

    data: Any
    coco: Path
    manifest: dict[str, Any] | None
    spec: PreprocessSpec


@dataclass(frozen=True)
class SampleSet:
    """Preprocessed images (N, C, H, W) float32, optional labels (N,) and masks (N, H, W),
    and for a detection model the boxes (``detection``)."""

    images: np.ndarray
    labels: np.ndarray | None
    masks: np.ndarray | None
    source: str
    detection: DetectionTruth | None = None

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def fingerprint(self) -> str:
        """sha256 of exactly the arrays fed to the model (shape, dtype and bytes)."""
        digest = hashlib.sha256(f"{self.images.shape}:{self.images.dtype}".encode())
        digest.update(np.ascontiguousarray(self.images).tobytes())
        return "sha256:" + digest.hexdigest()


def _take(samples: SampleSet, limit: int | None, seed: int) -> SampleSet:
    if limit is None or limit >= len(samples):
        return samples
    keep = np.sort(np.random.default_rng(seed).choice(len(samples), size=limit, replace=False))
    detection = samples.detection
    if detection is not None:
        from trainer.detect import DetectionSet

        data = detection.data
        mask = np.zeros(len(samples), bool)
        mask[keep] = True
        detection = DetectionTruth(DetectionSet(
            data.slices.select(mask), tuple(data.boxes[i] for i in keep),
            tuple(data.original_shapes[i] for i in keep),
            tuple(data.image_ids[i] for i in keep), data.labels),
            detection.coco, detection.manifest, detection.spec)
    return SampleSet(samples.images[keep],
                     None if samples.labels is None else samples.labels[keep],
                     None if samples.masks is None else samples.masks[keep], samples.source,
                     detection)


def _detection_samples(path: Path, spec: PreprocessSpec, split: str | None,
                       labels: Sequence[str], coco: Path | None) -> SampleSet:
    """Slices of a synthetic or labelled folder joined with their COCO boxes, as the detector
    trainer loads them (all slices stacked first, so each gets its real neighbours).

    Raises:
        DataError: no COCO file, or no annotated slice in the split.
    """
    import json

    from trainer.datasets import load_data
    from trainer.detect import attach_boxes

    coco = Path(coco) if coco is not None else path / "labels" / "boxes_coco.json"
    if not coco.is_file():
        raise DataError(f"{coco}: detection needs the held-out boxes as COCO JSON (--coco)")
    data = load_data(path, spec.single_slice(), labels=("no_nodule", *labels), progress=False)
    data = data.with_context(spec.context_slices, spec.context_spacing_mm)
    dset = attach_boxes(data, coco, spec, labels)
    if split is not None:
        dset = dset.subset(split)
    if not len(dset):
        raise DataError(f"{path}: no annotated slices in split {split!r}")
    manifest_path = path / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else None
    return SampleSet(dset.slices.images, None, None,
                     f"{path}" + (f" [{split}]" if split else ""),
                     DetectionTruth(dset, coco, manifest, spec))


def _from_arrays(path: Path) -> SampleSet:
    try:
        data = np.load(path)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read arrays: {exc}") from exc
    if isinstance(data, np.ndarray):
        return SampleSet(data.astype(np.float32, copy=False), None, None, str(path))
    if "images" not in data:
        raise DataError(f"{path}: no 'images' array")
    labels = data.get("labels")
    masks = data.get("masks")
    return SampleSet(data["images"].astype(np.float32, copy=False), labels, masks, str(path))


def _from_dicom_folder(path: Path, spec: PreprocessSpec) -> SampleSet:
    if spec.context_slices:
        return _series_from_dicom_folder(path, spec)
    from edge.preprocess.dicom_pixels import read_image
    from edge.preprocess.imaging import preprocess_image

    images = []
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        try:
            decoded = read_image(file)
        except DataError as exc:
            log.debug("calibration: skipping %s: %s", file, exc)
            continue
        images += [preprocess_image(frame, decoded.meta, spec) for frame in decoded.frames]
    if not images:
        raise DataError(f"{path}: no readable DICOM images")
    return SampleSet(np.stack(images), None, None, str(path))


def _series_from_dicom_folder(path: Path, spec: PreprocessSpec) -> SampleSet:
    """2.5D inputs: the DICOM files grouped by series, each series stacked as serving does;
    unreadable files and series that cannot be stacked (multi-frame) are skipped and logged."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    from edge.preprocess.series_input import series_inputs

    series: dict[str, list[pydicom.Dataset]] = {}
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(file)
            series.setdefault(str(ds.SeriesInstanceUID), []).append(ds)
        except (InvalidDicomError, AttributeError, OSError) as exc:
            log.debug("calibration: skipping %s: %s", file, exc)
    images = []
    for uid, datasets in series.items():
        try:
            images.append(series_inputs(datasets, spec))
        except DataError as exc:
            log.warning("calibration: skipping series %s: %s", uid, exc)
    if not images:
        raise DataError(f"{path}: no DICOM series that can be stacked for a 2.5D model")
    return SampleSet(np.concatenate(images), None, None, str(path))


def load_samples(path: Path, spec: PreprocessSpec, *, split: str | None = None,
                 labels: Sequence[str] = (), limit: int | None = None,
                 seed: int = 0, task: Task | None = None, coco: Path | None = None
                 ) -> SampleSet:
    """Load up to ``limit`` preprocessed samples from ``path`` (``split`` where it has splits).
    For ``task`` DETECT on a synthetic or labelled folder, the samples carry their boxes
    (``coco``, default ``labels/boxes_coco.json`` of a synthetic folder).

    Raises:
        DataError: nothing readable, the split is empty, the images do not match ``spec``, or
            detection boxes are missing.
    """
    path = Path(path)
    labelled = path.is_dir() and ((path / "manifest.json").is_file()
                                  or (path / "labels.csv").is_file())
    if task is Task.DETECT and labelled:
        samples = _detection_samples(path, spec, split, labels, coco)
    elif path.suffix in (".npy", ".npz"):
        samples = _from_arrays(path)
    elif labelled:
        from trainer.datasets import load_data

        data = load_data(path, spec.single_slice(), labels=labels, progress=False)
        if spec.context_slices:
            data = data.with_context(spec.context_slices, spec.context_spacing_mm)
        if split is not None:
            data = data.subset(split)
        if not len(data):
            raise DataError(f"{path}: no slices in split {split!r}")
        samples = SampleSet(data.images, data.labels, data.masks,
                            f"{path}" + (f" [{split}]" if split else ""))
    elif path.is_dir():
        samples = _from_dicom_folder(path, spec)
    else:
        raise DataError(f"{path}: not a folder, .npy or .npz")
    if samples.images.ndim != 4 or samples.images.shape[-2:] != (spec.height, spec.width):
        raise DataError(f"{path}: images of shape {samples.images.shape[1:]}, the model takes "
                        f"(C, {spec.height}, {spec.width})")
    return _take(samples, limit, seed)


def batches(images: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """Contiguous float32 batches of ``images`` along axis 0."""
    for start in range(0, len(images), batch_size):
        yield np.ascontiguousarray(images[start:start + batch_size], dtype=np.float32)


def calibration_reader(input_name: str, images: np.ndarray, batch_size: int = 8) -> object:
    """An ``onnxruntime.quantization.CalibrationDataReader`` feeding ``images`` in batches.

    Built lazily so that importing this module does not import onnxruntime.
    """
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self._iter: Iterator[np.ndarray] = iter(())
            self.rewind()

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._iter, None)
            return None if batch is None else {input_name: batch}

        def rewind(self) -> None:
            self._iter = batches(images, batch_size)

    return _Reader()
