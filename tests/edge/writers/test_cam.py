"""CAM heatmaps as DICOM: the Secondary Capture overlay and the Parametric Map are dciodvfy
clean, derived, reference their source slice, and put the heat where the map has it."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from edge.cli import main as cli
from edge.core.types import ModelId
from edge.preprocess.imaging import PreprocessSpec
from edge.writers.cam import build_cam_pm, build_cam_sc, cam_to_frame
from edge.writers.codes import AlgorithmInfo

MODEL, ALGO = ModelId("nodcls", 2), AlgorithmInfo("nodcls", "2")
SPEC = PreprocessSpec(height=64, width=64, window_center=-600, window_width=1500)
DCIODVFY = shutil.which("dciodvfy") or "/usr/bin/dciodvfy"


def dciodvfy_errors(path: Path) -> list[str]:
    if not Path(DCIODVFY).exists():
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    proc = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    return [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("Error")]


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> pydicom.Dataset:
    out = tmp_path_factory.mktemp("synth") / "data"
    assert cli(["synth", "--out", str(out), "--studies", "1", "--seed", "2", "--size", "128",
                "--slices-min", "4", "--slices-max", "4", "--quiet"]) == 0
    ct = json.loads((out / "manifest.json").read_text())["studies"][0]["ct"]
    return pydicom.dcmread(out / ct["dir"] / ct["files"][2])


def _cam() -> np.ndarray:
    cam = np.zeros((64, 64), np.float32)
    cam[40:44, 10:14] = 1.0  # rows 80-88, columns 20-28 of the 128x128 source
    return cam


def test_secondary_capture_overlay(source: pydicom.Dataset, tmp_path: Path) -> None:
    sc = build_cam_sc(source, _cam(), SPEC, MODEL, ALGO, probability=0.93)
    path = tmp_path / "sc.dcm"
    sc.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
    assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"] and ds.BurnedInAnnotation == "YES"
    assert ds.PhotometricInterpretation == "RGB" and (ds.Rows, ds.Columns) == (128, 128)
    assert ds.StudyInstanceUID == source.StudyInstanceUID
    assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    rgb = ds.pixel_array.astype(int)
    redness = rgb[..., 0] - rgb[..., 2]
    assert redness[82:86, 22:26].mean() > 40  # red (jet at 1) where the map is 1
    assert abs(redness[110:120, 100:110]).mean() < 5  # plain gray elsewhere


def test_parametric_map(source: pydicom.Dataset, tmp_path: Path) -> None:
    pm = build_cam_pm(source, _cam(), SPEC, MODEL, ALGO)
    path = tmp_path / "pm.dcm"
    pm.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30"  # Parametric Map Storage
    values = ds.pixel_array
    assert values.shape == (128, 128) and values.dtype == np.float32
    assert values[82:86, 22:26].min() > 0.9 and values[110:, 100:].max() == 0.0


def test_cam_to_frame_letterbox() -> None:
    spec = PreprocessSpec(height=64, width=64, resize="letterbox")
    cam = np.zeros((64, 64), np.float32)
    cam[16:48, :] = 1.0  # the letterboxed image of a 64 x 128 frame
    out = cam_to_frame(cam, (64, 128), spec)
    assert out.shape == (64, 128) and out.min() > 0.99
