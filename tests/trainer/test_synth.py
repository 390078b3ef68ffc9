"""``mededge synth``: the folder contract of docs/data-format.md, HU, determinism, DICOM validity.

One tiny set (4 studies of 128x128, 8-12 slices; 3 of them compressed, one per lossless syntax;
every DX MONOCHROME1) is made once per module, then read back by the checks.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from edge.cli import main
from edge.preprocess.dicom_pixels import read_image
from edge.preprocess.imaging import to_modality_units

DCIODVFY = "/usr/bin/dciodvfy"
ARGS = ["--studies", "4", "--seed", "5", "--size", "128", "--slices-min", "8", "--slices-max",
        "12", "--compressed-fraction", "0.75", "--monochrome1-fraction", "1", "--quiet"]


def _synth(out: Path, *extra: str) -> None:
    assert main(["synth", "--out", str(out), *ARGS, *extra]) == 0


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "data"
    _synth(out)
    return out


@pytest.fixture(scope="module")
def manifest(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "manifest.json").read_text())


def _hu(path: Path) -> np.ndarray:
    image = read_image(path)
    return to_modality_units(image.frames[0], image.meta)


def _mask(folder: Path, rel: str) -> np.ndarray:
    """A NIfTI mask as (slices, rows, columns), per the contract's transpose."""
    img: Any = nib.load(folder / rel)
    return np.asarray(img.dataobj).transpose(2, 1, 0)


def _tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_manifest_lists_exactly_the_files_written(folder: Path, manifest: dict[str, Any]) -> None:
    assert manifest["generator"] == "mededge synth" and manifest["seed"] == 5
    listed = {"manifest.json", "labels/slices.csv", "labels/boxes_coco.json"}
    for study in manifest["studies"]:
        ct, dx = study["ct"], study["dx"]
        listed |= {f"{ct['dir']}/{f}" for f in ct["files"]}
        listed |= {f"{dx['dir']}/{f}" for f in dx["files"]}
        listed |= {ct["lung_mask"], ct["nodule_mask"]}
        assert len(ct["slice_labels"]) == len(ct["files"])
        assert 8 <= len(ct["files"]) <= 12
        assert study["nodule_present"] == int(any(ct["slice_labels"]))
    assert listed == set(_tree_hashes(folder))


def test_splits_by_study_with_val_and_test(manifest: dict[str, Any]) -> None:
    splits = [s["split"] for s in manifest["studies"]]
    assert {"train", "val", "test"} <= set(splits), splits


def test_slices_csv_and_coco_agree_with_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    with open(folder / "labels/slices.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    coco = json.loads((folder / "labels/boxes_coco.json").read_text())
    assert len(rows) == len(coco["images"]) == sum(len(s["ct"]["files"])
                                                   for s in manifest["studies"])
    boxed = {a["image_id"] for a in coco["annotations"]}
    for row, image in zip(rows, coco["images"], strict=True):
        assert row["file"] == image["file_name"]
        assert (folder / row["file"]).is_file()
        assert (image["id"] in boxed) == (row["nodule_present"] == "1")
        ds = pydicom.dcmread(folder / row["file"], stop_before_pixels=True)
        assert ds.SOPInstanceUID == row["sop_instance_uid"]
        assert ds.SeriesInstanceUID == row["series_instance_uid"]
    assert coco["categories"] == [{"id": 1, "name": "nodule", "supercategory": "lesion"}]


def test_masks_align_with_pixels_and_hu(folder: Path, manifest: dict[str, Any]) -> None:
    nodule_values: list[np.ndarray] = []
    for study in manifest["studies"]:
        ct = study["ct"]
        lung = _mask(folder, ct["lung_mask"])
        nodules = _mask(folder, ct["nodule_mask"])
        assert lung.shape == nodules.shape == (len(ct["files"]), ct["rows"], ct["columns"])
        hu = np.stack([_hu(folder / ct["dir"] / f) for f in ct["files"]])
        assert np.median(hu[lung > 0]) == pytest.approx(-850, abs=40)
        assert np.median(hu[lung == 0]) > -1000  # the body, not only air, is outside the lungs
        assert np.all(lung[nodules > 0] == 1), "nodules must lie inside the lungs"
        assert list(nodules.any(axis=(1, 2)).astype(int)) == ct["slice_labels"]
        nodule_values.append(hu[nodules > 0])
        for nodule in study["nodules"]:
            z = round(nodule["center_voxel"][0])
            assert nodule["slice_range"][0] <= z <= nodule["slice_range"][1]
            x, y, w, h = nodule["boxes"][str(z)]
            assert nodules[z, y:y + h, x:x + w].any()
        nii: Any = nib.load(folder / ct["lung_mask"])
        assert np.allclose(np.abs(np.diag(nii.affine))[:2], ct["pixel_spacing"])
    values = np.concatenate(nodule_values)
    assert values.size, "the tiny set should hold at least one nodule"
    assert np.median(values) > -600  # solid cores ~ +30, ground-glass halo ~ -500


def test_same_seed_gives_identical_files(folder: Path, tmp_path: Path) -> None:
    """Also whether the studies are made in worker processes (the fixture, on a machine
    with more than one CPU) or one after the other in this process (here)."""
    _synth(tmp_path / "again", "--workers", "1")
    assert _tree_hashes(tmp_path / "again") == _tree_hashes(folder)


def test_transfer_syntaxes_and_representations(folder: Path, manifest: dict[str, Any]) -> None:
    syntaxes = {s["ct"]["transfer_syntax_uid"] for s in manifest["studies"]}
    assert syntaxes == {ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, RLELossless}
    representations = set()
    for study in manifest["studies"]:
        ds = pydicom.dcmread(folder / study["ct"]["dir"] / study["ct"]["files"][0])
        assert ds.file_meta.TransferSyntaxUID == study["ct"]["transfer_syntax_uid"]
        representations.add((int(ds.PixelRepresentation), float(ds.RescaleIntercept)))
        assert ds.Modality == "CT" and ds.BodyPartExamined == "CHEST"
        assert ds.Manufacturer == "mededge synth" and len(ds.StudyInstanceUID) <= 64
    assert representations == {(1, 0.0), (0, -1024.0)}


def test_compressed_files_decode_bit_exactly(folder: Path, manifest: dict[str, Any],
                                              tmp_path: Path) -> None:
    """The same seed written uncompressed holds the very values the compressed files decode to."""
    plain = tmp_path / "plain"
    assert main(["synth", "--out", str(plain), *ARGS, "--compressed-fraction", "0"]) == 0
    compressed = 0
    for study in manifest["studies"]:
        ct, dx = study["ct"], study["dx"]
        if ct["transfer_syntax_uid"] == ExplicitVRLittleEndian:
            continue
        compressed += 1
        for rel in [f"{ct['dir']}/{f}" for f in ct["files"]] + [f"{dx['dir']}/{dx['files'][0]}"]:
            ds = pydicom.dcmread(folder / rel)
            reference = pydicom.dcmread(plain / rel)
            assert ds.file_meta.TransferSyntaxUID.is_compressed, rel
            assert reference.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
            assert np.array_equal(ds.pixel_array, reference.pixel_array), rel
            assert ds.pixel_array.dtype == reference.pixel_array.dtype
    assert compressed == 3


def test_dx_monochrome1_when_forced(folder: Path, manifest: dict[str, Any]) -> None:
    for study in manifest["studies"]:
        dx = study["dx"]
        assert dx["photometric_interpretation"] == "MONOCHROME1"
        ds = pydicom.dcmread(folder / dx["dir"] / dx["files"][0])
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.1.1"
        assert ds.PhotometricInterpretation == "MONOCHROME1"
        assert ds.PresentationIntentType == "FOR PRESENTATION"
        assert ds.StudyInstanceUID == study["study_instance_uid"]
        assert int(ds.pixel_array.max()) <= 4095


def _dciodvfy_errors(path: Path) -> list[str]:
    result = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, check=False)
    return [line for line in (result.stdout + result.stderr).splitlines()
            if line.startswith("Error")]


@pytest.mark.skipif(shutil.which(DCIODVFY) is None, reason="dicom3tools' dciodvfy not installed")
def test_dciodvfy_reports_no_errors(folder: Path, manifest: dict[str, Any]) -> None:
    checked = []
    for study in manifest["studies"]:
        ct, dx = study["ct"], study["dx"]
        for path in (folder / ct["dir"] / ct["files"][1], folder / dx["dir"] / dx["files"][0]):
            assert _dciodvfy_errors(path) == [], f"{path} ({ct['transfer_syntax_uid']})"
            checked.append(path)
    assert len(checked) == 8
