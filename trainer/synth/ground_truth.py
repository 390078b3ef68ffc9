"""Ground truth of a synthetic study folder (docs/data-format.md): NIfTI masks, slices.csv,
COCO boxes and manifest.json. Everything is written deterministically (no clocks, sorted keys,
gzip without a timestamp)."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

from trainer.synth.phantom import Geometry, Phantom

#: [x, y, w, h] in pixels: x = first column, y = first row.
Box = list[int]


@dataclass(frozen=True)
class SliceBox:
    """One connected nodule region on one slice."""

    slice_index: int
    bbox: Box
    area: int


@dataclass(frozen=True)
class WrittenStudy:
    """What was written for one study: its phantom and the file names, UIDs and syntaxes."""

    study_id: str
    split: str
    patient_id: str
    study_instance_uid: str
    phantom: Phantom
    slice_thickness: float
    signed: bool
    ct_series_uid: str
    ct_files: list[tuple[str, str]]  # (file name, SOP Instance UID)
    ct_transfer_syntax: str
    dx_series_uid: str
    dx_file: str
    dx_transfer_syntax: str
    dx_photometric: str


def assign_splits(n: int, rng: np.random.Generator) -> list[str]:
    """train / val / test per study, about 70/15/15; val and test non-empty when ``n >= 3``."""
    n_val = max(1, round(0.15 * n)) if n >= 3 else (1 if n == 2 else 0)
    n_test = max(1, round(0.15 * n)) if n >= 3 else 0
    splits = ["val"] * n_val + ["test"] * n_test
    splits += ["train"] * (n - len(splits))
    return [splits[i] for i in rng.permutation(n)]


def nifti_affine(g: Geometry) -> np.ndarray:
    """Voxel (column, row, slice) -> RAS mm, from the DICOM geometry (LPS, axial orientation)."""
    x0 = -(g.columns - 1) / 2 * g.pixel_spacing
    y0 = -(g.rows - 1) / 2 * g.pixel_spacing
    lps = np.array([[g.pixel_spacing, 0, 0, x0],
                    [0, g.pixel_spacing, 0, y0],
                    [0, 0, g.slice_spacing, g.z0],
                    [0, 0, 0, 1]], dtype=np.float64)
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def write_mask(mask: np.ndarray, g: Geometry, path: Path) -> None:
    """Write a (slices, rows, columns) mask as uint8 NIfTI indexed [column, row, slice]."""
    img = nib.Nifti1Image(np.ascontiguousarray(mask.transpose(2, 1, 0)).astype(np.uint8),
                          nifti_affine(g))
    img.header.set_xyzt_units("mm")
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    nib.save(img, str(path))  # nibabel writes gzip with mtime 0: byte-identical per seed


def _box(sl: tuple[slice, slice]) -> Box:
    return [sl[1].start, sl[0].start, sl[1].stop - sl[1].start, sl[0].stop - sl[0].start]


def slice_boxes(nodule_mask: np.ndarray) -> list[SliceBox]:
    """Boxes of the 8-connected nodule regions of every slice, in slice then label order."""
    out = []
    for i, plane in enumerate(nodule_mask):
        if not plane.any():
            continue
        labels, n = ndimage.label(plane, structure=np.ones((3, 3)))
        areas = ndimage.sum_labels(plane > 0, labels, index=np.arange(1, n + 1))
        for k, sl in enumerate(ndimage.find_objects(labels)):
            if sl is not None:
                out.append(SliceBox(i, _box(sl), int(areas[k])))
    return out


def nodule_entries(phantom: Phantom) -> list[dict[str, Any]]:
    """The manifest's ``nodules`` list: centre, size, kind, slice range and per-slice boxes."""
    entries = []
    for k, nodule in enumerate(phantom.nodules):
        mine = phantom.nodule_labels == k + 1
        slices = np.flatnonzero(mine.any(axis=(1, 2)))
        boxes = {}
        for i in slices:
            rows, cols = np.nonzero(mine[i])
            x0, y0 = int(cols.min()), int(rows.min())
            boxes[str(int(i))] = [x0, y0, int(cols.max()) - x0 + 1, int(rows.max()) - y0 + 1]
        entries.append({
            "center_voxel": list(nodule.center_voxel), "diameter_mm": nodule.diameter_mm,
            "kind": nodule.kind, "semi_axes_mm": list(nodule.semi_axes_mm),
            "slice_range": [int(slices.min()), int(slices.max())], "boxes": boxes})
    return entries


def manifest_entry(s: WrittenStudy) -> dict[str, Any]:
    """One study of ``manifest.json``."""
    g = s.phantom.geometry
    slice_labels = [int(v) for v in np.asarray(s.phantom.nodule_mask.any(axis=(1, 2)))]
    return {
        "study_id": s.study_id, "split": s.split, "patient_id": s.patient_id,
        "study_instance_uid": s.study_instance_uid,
        "nodule_present": int(bool(s.phantom.nodules)),
        "ct": {"series_instance_uid": s.ct_series_uid, "dir": f"{s.study_id}/ct",
               "files": [name for name, _ in s.ct_files],
               "rows": g.rows, "columns": g.columns,
               "pixel_spacing": [g.pixel_spacing, g.pixel_spacing],
               "slice_thickness": s.slice_thickness, "slice_spacing": g.slice_spacing,
               "pixel_representation": int(s.signed),
               "transfer_syntax_uid": s.ct_transfer_syntax,
               "lung_mask": f"labels/{s.study_id}_lung.nii.gz",
               "nodule_mask": f"labels/{s.study_id}_nodules.nii.gz",
               "slice_labels": slice_labels},
        "dx": {"series_instance_uid": s.dx_series_uid, "dir": f"{s.study_id}/dx",
               "files": [s.dx_file], "photometric_interpretation": s.dx_photometric,
               "transfer_syntax_uid": s.dx_transfer_syntax},
        "nodules": nodule_entries(s.phantom),
    }


@dataclass(frozen=True)
class StudyGroundTruth:
    """What the folder-wide tables need of one study once its phantom is gone."""

    entry: dict[str, Any]
    sop_instance_uids: tuple[str, ...]
    boxes: tuple[SliceBox, ...]


def write_study_labels(s: WrittenStudy, out: Path) -> StudyGroundTruth:
    """Write the two NIfTI masks of one study under ``out/labels``; return its ground truth."""
    labels = out / "labels"
    labels.mkdir(parents=True, exist_ok=True)
    g = s.phantom.geometry
    write_mask(s.phantom.lung_mask, g, labels / f"{s.study_id}_lung.nii.gz")
    write_mask(s.phantom.nodule_mask, g, labels / f"{s.study_id}_nodules.nii.gz")
    return StudyGroundTruth(entry=manifest_entry(s),
                            sop_instance_uids=tuple(uid for _, uid in s.ct_files),
                            boxes=tuple(slice_boxes(s.phantom.nodule_mask)))


def write_tables(studies: list[StudyGroundTruth], seed: int, out: Path) -> None:
    """``labels/slices.csv``, ``labels/boxes_coco.json`` and ``manifest.json``."""
    labels = out / "labels"
    labels.mkdir(parents=True, exist_ok=True)
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    with open(labels / "slices.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["study_id", "series_instance_uid", "sop_instance_uid", "file",
                         "slice_index", "nodule_present"])
        for s in studies:
            ct, study_id = s.entry["ct"], s.entry["study_id"]
            boxes: dict[int, list[SliceBox]] = {}
            for box in s.boxes:
                boxes.setdefault(box.slice_index, []).append(box)
            for i, (name, sop_uid) in enumerate(zip(ct["files"], s.sop_instance_uids,
                                                    strict=True)):
                file_name = f"{ct['dir']}/{name}"
                writer.writerow([study_id, ct["series_instance_uid"], sop_uid, file_name, i,
                                 ct["slice_labels"][i]])
                image_id = len(images) + 1
                images.append({"id": image_id, "file_name": file_name, "width": ct["columns"],
                               "height": ct["rows"], "study_id": study_id, "slice_index": i,
                               "sop_instance_uid": sop_uid})
                for box in boxes.get(i, []):
                    annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                        "category_id": 1, "bbox": box.bbox, "area": box.area,
                                        "iscrowd": 0})
    coco = {"info": {"description": "mededge synth nodule boxes", "version": "1"},
            "images": images, "annotations": annotations,
            "categories": [{"id": 1, "name": "nodule", "supercategory": "lesion"}]}
    (labels / "boxes_coco.json").write_text(json.dumps(coco, indent=1) + "\n", encoding="utf-8")
    manifest = {"generator": "mededge synth", "format_version": 1, "seed": seed,
                "studies": [s.entry for s in studies]}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
