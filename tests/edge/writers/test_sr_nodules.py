"""TID 1500 SR with one planar-ROI group (SCOORD) and one volumetric group (SCOORD3D ellipsoid)
per detected nodule: dciodvfy clean, each SCOORD outline lands on its ground-truth nodule
(centre and slice) in a synthetic phantom, each ellipsoid on the nodule's centre in patient
coordinates (from the ground-truth NIfTI's affine), also on an oblique, anisotropic stack."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest

from edge.cli import main as cli
from edge.core.types import ModelId
from edge.postprocess.nodules3d import detect_series
from edge.postprocess.results import Box, SeriesDetection, SliceDetection, VoxelSpacing
from edge.preprocess.volume import frame_geometries
from edge.writers.codes import AlgorithmInfo
from edge.writers.sr import build_report

MODEL, ALGO = ModelId("noddet", 1), AlgorithmInfo("noddet", "1")
DCIODVFY = shutil.which("dciodvfy") or "/usr/bin/dciodvfy"
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])

Study = tuple[dict[str, Any], list[pydicom.Dataset], np.ndarray]


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Study:
    """A phantom with nodules: its manifest entry, CT headers and the masks' NIfTI affine."""
    out = tmp_path_factory.mktemp("synth") / "data"
    assert cli(["synth", "--out", str(out), "--studies", "3", "--seed", "4", "--size", "128",
                "--slices-min", "16", "--slices-max", "20", "--quiet"]) == 0
    study = next(s for s in json.loads((out / "manifest.json").read_text())["studies"]
                 if s["nodules"])
    ct = study["ct"]
    mask = nib.load(str(out / ct["nodule_mask"]))
    assert isinstance(mask, nib.Nifti1Image)
    affine = mask.affine  # (column, row, slice) -> RAS mm
    return study, [pydicom.dcmread(out / ct["dir"] / f, stop_before_pixels=True)
                   for f in ct["files"]], affine


def detect_truth(manifest: dict[str, Any], headers: list[pydicom.Dataset]) -> SeriesDetection:
    """The ground-truth boxes merged into 3D candidates, as if the detector had found them."""
    per_slice: list[list[Box]] = [[] for _ in headers]
    for nodule in manifest["nodules"]:
        for index, (x, y, w, h) in nodule["boxes"].items():
            per_slice[int(index)].append(Box(x, y, x + w, y + h, 0.9, "nodule"))
    slices = [SliceDetection(str(h.SOPInstanceUID), tuple(b)) for h, b in zip(headers, per_slice,
                                                                              strict=True)]
    ct = manifest["ct"]
    spacing = VoxelSpacing(row_mm=ct["pixel_spacing"][0], column_mm=ct["pixel_spacing"][1],
                           slice_mm=ct["slice_spacing"])
    frames = [f for h in headers for f in frame_geometries(h)]
    detection = detect_series(MODEL, ("nodule",), slices, spacing, frames)
    assert detection.candidates
    return detection


def write_checked(report: hd.sr.ComprehensiveSR | hd.sr.Comprehensive3DSR, path: Path) -> None:
    """Save ``report`` and assert dciodvfy finds no errors in it."""
    report.save_as(path)
    if not Path(DCIODVFY).exists():
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    proc = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    assert [ln for ln in (proc.stdout + proc.stderr).splitlines()
            if ln.startswith("Error")] == []


def report_of(path: Path) -> hd.sr.MeasurementReport:
    content = hd.sr.srread(path).content
    assert isinstance(content, hd.sr.MeasurementReport)
    return content


def ellipsoids(path: Path) -> list[tuple[str, np.ndarray[Any, Any], str]]:
    """(tracking UID, the six points, frame of reference UID) of each volumetric group."""
    out = []
    for group in report_of(path).get_volumetric_roi_measurement_groups():
        surface = group.roi
        assert isinstance(surface, hd.sr.VolumeSurface)
        assert surface.graphic_type == hd.sr.GraphicTypeValues3D.ELLIPSOID
        points = surface.graphic_data  # one (6, 3) array for an ellipsoid
        out.append((str(group.tracking_uid), np.asarray(points, np.float64).reshape(6, 3),
                    str(surface.frame_of_reference_uid)))
    return out


def test_nodule_groups_land_on_the_nodules(study: Study, tmp_path: Path) -> None:
    manifest, headers, _ = study
    detection = detect_truth(manifest, headers)
    path = tmp_path / "sr.dcm"
    write_checked(build_report(headers, ALGO, detection=detection), path)
    groups = report_of(path).get_planar_roi_measurement_groups()
    assert len(groups) == len(detection.candidates)
    index_of = {str(h.SOPInstanceUID): i for i, h in enumerate(headers)}
    truths = manifest["nodules"]
    for group, candidate in zip(groups, detection.candidates, strict=True):
        region = group.roi
        assert isinstance(region, hd.sr.ImageRegion)  # the SCOORD, not a SCOORD3D
        points = region.value[:4]  # closed polyline: the 4 corners, then the first again
        col, row = points.mean(axis=0) - 0.5  # continuous -> voxel index
        uid = region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        z = index_of[uid]
        nearest = min(truths, key=lambda t: np.hypot(t["center_voxel"][1] - row,
                                                     t["center_voxel"][2] - col))
        _, y, x = nearest["center_voxel"]
        assert abs(row - y) <= 1.5 and abs(col - x) <= 1.5, (row, col, nearest)
        assert nearest["slice_range"][0] <= z <= nearest["slice_range"][1]
        values = {m.name.meaning: m.value for m in group.get_measurements()}
        assert values["Long axis"] == pytest.approx(candidate.diameter_mm, abs=0.01)
        assert values["Probability"] == pytest.approx(0.9)
        assert group.finding_type is not None
        assert group.finding_type.value == "27925004"  # Nodule


def test_ellipsoids_land_on_the_nodule_centres_in_patient_space(study: Study,
                                                                tmp_path: Path) -> None:
    manifest, headers, affine = study
    detection = detect_truth(manifest, headers)
    path = tmp_path / "sr.dcm"
    write_checked(build_report(headers, ALGO, detection=detection), path)
    assert pydicom.dcmread(path).SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comp. 3D SR
    planar = report_of(path).get_planar_roi_measurement_groups()
    found = ellipsoids(path)
    assert [uid for uid, _, _ in found] == [g.tracking_uid for g in planar]
    ct = manifest["ct"]
    pixel, step = ct["pixel_spacing"][0], ct["slice_spacing"]
    truths = []
    for nodule in manifest["nodules"]:
        z, y, x = nodule["center_voxel"]
        truths.append((LPS_FROM_RAS @ (affine @ [x, y, z, 1.0])[:3], nodule))
    whole = 0
    for (_, points, frame_uid), candidate in zip(found, detection.candidates, strict=True):
        assert frame_uid == headers[0].FrameOfReferenceUID
        centre = points.mean(axis=0)
        mm, nodule = min(truths, key=lambda t: float(np.linalg.norm(t[0] - centre)))
        # the box centres are whole pixels / slices: within a pixel in plane, a slice along z
        assert np.all(np.abs(centre[:2] - mm[:2]) <= 1.5 * pixel), (centre, mm)
        half = np.linalg.norm(points[1::2] - points[::2], axis=1) / 2  # x, y, z semi-axes
        semi = np.asarray(nodule["semi_axes_mm"])  # (x, y, z)
        assert np.all(np.abs(half[:2] - semi[:2]) <= 1.5 * pixel), (half, semi)
        if nodule["slice_range"][0] > 0 and nodule["slice_range"][1] < len(headers) - 1:
            # along z only where the stack holds the whole nodule (a cut one's visible part is
            # centred elsewhere)
            whole += 1
            assert abs(centre[2] - mm[2]) <= step, (centre, mm)
            assert abs(half[2] - semi[2]) <= step, (half, semi)
        assert candidate.center_mm is not None  # the merge's own centre agrees with the SR's
        assert np.allclose(centre, candidate.center_mm, atol=1e-3)
    assert whole, "no nodule lies wholly inside the stack: the z checks did not run"


def test_ellipsoid_follows_an_oblique_anisotropic_stack(study: Study, tmp_path: Path) -> None:
    """The same slices tilted 30 deg about x and 20 deg about z, pixels 0.8 (between rows) by
    1.1 mm (between columns), 3 mm apart along the normal: each ellipsoid centre is the
    affine image of the candidate's centre voxel."""
    manifest, original, _ = study
    a, b = np.radians(30), np.radians(20)
    rot = (np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
           @ np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]]))
    row_dir, col_dir, normal = rot[:, 0], rot[:, 1], rot[:, 2]
    origin = np.array([-120.0, 35.5, 410.0])
    voxel_to_mm = np.eye(4)  # columns: per column index, per row index, per slice, origin
    voxel_to_mm[:3, 0], voxel_to_mm[:3, 1] = 1.1 * row_dir, 0.8 * col_dir
    voxel_to_mm[:3, 2], voxel_to_mm[:3, 3] = 3.0 * normal, origin
    headers = []
    for k, h in enumerate(original):
        h = pydicom.Dataset(h)
        h.ImageOrientationPatient = [round(float(v), 8) for v in (*row_dir, *col_dir)]
        h.ImagePositionPatient = [round(float(v), 6) for v in voxel_to_mm[:3] @ [0, 0, k, 1]]
        h.PixelSpacing = [0.8, 1.1]
        headers.append(h)
    detection = detect_truth(manifest, headers)
    path = tmp_path / "sr.dcm"
    write_checked(build_report(headers, ALGO, detection=detection), path)
    for (_, points, _), candidate in zip(ellipsoids(path), detection.candidates, strict=True):
        z, row, col = candidate.center_voxel
        assert np.allclose(points.mean(axis=0), voxel_to_mm[:3] @ [col, row, z, 1], atol=1e-3)
        _, box = max(candidate.boxes, key=lambda item: item[1].area)
        first, last = candidate.slice_range
        expected = [box.width * 1.1 * row_dir, box.height * 0.8 * col_dir,
                    (last - first + 1) * 3.0 * normal]
        assert np.allclose(points[1::2] - points[::2], expected, atol=1e-3)
