"""The synthetic study folder written by ``mededge synth`` (docs/data-format.md).

Every CT slice becomes one sample: its slice label (nodule present) and its class map
(background / lung / nodule) from the NIfTI masks. A study whose masks cannot be read keeps its
slices for classification with masks set to :data:`IGNORE`, which segmentation drops.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from edge.core.errors import DataError
from edge.preprocess.imaging import PreprocessSpec
from trainer.datasets.base import SPLITS, LoadSummary, SkippedFile, SliceSet, empty_set, split_for
from trainer.datasets.cache import cache_file, cache_key, load_cached, save_cached
from trainer.datasets.masks import combine_lung_nodule, fit_mask, read_nifti_slices
from trainer.datasets.slices import load_slice

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
IGNORE = 255  # mask value: no reference available for this slice


def read_manifest(data_dir: Path) -> dict[str, Any]:
    """Parse ``manifest.json``.

    Raises:
        DataError: missing, not JSON, or without a ``studies`` list.
    """
    path = data_dir / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read manifest: {exc}") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("studies"), list):
        raise DataError(f"{path}: no 'studies' list")
    return manifest


def _study_masks(data_dir: Path, ct: dict[str, Any], n: int) -> np.ndarray:
    """The (slices, rows, cols) class map of a study. Raises DataError naming the mask file."""
    lung_rel, nodule_rel = ct.get("lung_mask"), ct.get("nodule_mask")
    if not lung_rel:
        raise DataError("manifest names no lung_mask")
    lung = read_nifti_slices(data_dir / lung_rel)
    nodule = read_nifti_slices(data_dir / nodule_rel) if nodule_rel else np.zeros_like(lung)
    if lung.shape[0] != n or nodule.shape != lung.shape:
        raise DataError(f"{lung_rel}: mask shape {lung.shape} / {nodule.shape} does not match "
                        f"{n} slices")
    return combine_lung_nodule(lung, nodule)


def largest_cross_section_mm(nodule: np.ndarray, spacing: tuple[float, float]) -> float:
    """Equivalent-circle diameter (mm) of the largest 8-connected region of a 2D nodule mask;
    0.0 when the mask is empty. ``spacing`` is (row, column) mm per pixel."""
    if not nodule.any():
        return 0.0
    from scipy import ndimage

    regions, n = ndimage.label(nodule, structure=np.ones((3, 3), bool))
    area_px = int(np.bincount(regions.ravel(), minlength=n + 1)[1:].max())
    return float(2.0 * np.sqrt(area_px * spacing[0] * spacing[1] / np.pi))


def load_synthetic(data_dir: Path, spec: PreprocessSpec, *, use_cache: bool = True,
                   progress: bool = True) -> SliceSet:
    """Load (or fetch from the cache) every CT slice of a synthetic folder.

    Raises:
        DataError: the manifest itself is unusable. Bad slices and masks are skipped and listed
            in the returned summary instead.
    """
    data_dir = Path(data_dir)
    manifest_bytes = (data_dir / MANIFEST).read_bytes() if (data_dir / MANIFEST).is_file() else b""
    manifest = read_manifest(data_dir)
    fingerprint = "sha256:" + hashlib.sha256(manifest_bytes).hexdigest()
    studies = manifest["studies"]
    files = [data_dir / s["ct"]["dir"] / f
             for s in studies for f in (s.get("ct") or {}).get("files", [])]
    key = cache_key("synthetic", fingerprint, files, spec)
    cached = load_cached(cache_file(data_dir, key)) if use_cache else None
    if cached is not None:
        log.info("using cached slices %s", cache_file(data_dir, key))
        return cached

    images, labels, masks, groups, splits, sources = [], [], [], [], [], []
    nodule_mm: list[float] = []
    geometries: list[np.ndarray] = []
    skipped: list[SkippedFile] = []
    for study in tqdm(studies, desc="decode studies", unit="study", disable=not progress):
        sid = str(study.get("study_id", "?"))
        ct = study.get("ct") or {}
        names = list(ct.get("files", []))
        split = study.get("split") if study.get("split") in SPLITS else split_for(sid)
        try:
            study_masks: np.ndarray | None = _study_masks(data_dir, ct, len(names))
        except DataError as exc:
            skipped.append(SkippedFile(str(ct.get("lung_mask", sid)), str(exc)))
            study_masks = None
        slice_labels = ct.get("slice_labels") or []
        spacing = ct.get("pixel_spacing")
        for i, name in enumerate(names):
            rel = f"{ct.get('dir', sid)}/{name}"
            try:
                image, _, _, geometry = load_slice(data_dir / rel, spec)
            except DataError as exc:
                skipped.append(SkippedFile(rel, str(exc)))
                continue
            if study_masks is not None:
                mask = fit_mask(study_masks[i], spec)
                label = int(slice_labels[i]) if i < len(slice_labels) else int(
                    (study_masks[i] == 2).any())
                diameter = (largest_cross_section_mm(study_masks[i] == 2, tuple(spacing))
                            if spacing else float("nan"))
            else:
                mask = np.full((spec.height, spec.width), IGNORE, np.uint8)
                label = int(slice_labels[i]) if i < len(slice_labels) else -1
                diameter = float("nan")
            images.append(image)
            labels.append(label)
            masks.append(mask)
            groups.append(sid)
            splits.append(split)
            sources.append(rel)
            nodule_mm.append(diameter)
            geometries.append(geometry)
    summary = LoadSummary(len(images), tuple(skipped))
    if not images:
        return empty_set(spec.height, spec.width, fingerprint, summary, with_masks=True)
    data = SliceSet(
        images=np.stack(images), labels=np.asarray(labels, np.int64), masks=np.stack(masks),
        groups=np.asarray(groups, dtype=object), splits=np.asarray(splits, dtype=object),
        sources=np.asarray(sources, dtype=object), fingerprint=fingerprint, summary=summary,
        nodule_mm=np.asarray(nodule_mm, np.float32), geometry=np.stack(geometries))
    if use_cache:
        save_cached(cache_file(data_dir, key), data)
    return data
