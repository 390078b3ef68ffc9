"""TID 1500 SR with one planar-ROI group per detected nodule: dciodvfy clean, and each group's
SCOORD outline lands on its ground-truth nodule (centre and slice) in a synthetic phantom."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest

from edge.cli import main as cli
from edge.core.types import ModelId
from edge.postprocess.nodules3d import detect_series
from edge.postprocess.results import Box, SliceDetection, VoxelSpacing
from edge.preprocess.volume import frame_geometries
from edge.writers.codes import AlgorithmInfo
from edge.writers.sr import build_report

MODEL, ALGO = ModelId("noddet", 1), AlgorithmInfo("noddet", "1")
DCIODVFY = shutil.which("dciodvfy") or "/usr/bin/dciodvfy"


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], list[pydicom.Dataset]]:
    out = tmp_path_factory.mktemp("synth") / "data"
    assert cli(["synth", "--out", str(out), "--studies", "3", "--seed", "4", "--size", "128",
                "--slices-min", "16", "--slices-max", "20", "--quiet"]) == 0
    study = next(s for s in json.loads((out / "manifest.json").read_text())["studies"]
                 if s["nodules"])
    ct = study["ct"]
    return study, [pydicom.dcmread(out / ct["dir"] / f, stop_before_pixels=True)
                   for f in ct["files"]]


def test_nodule_groups_land_on_the_nodules(study: tuple[dict[str, Any], list[pydicom.Dataset]],
                                           tmp_path: Path) -> None:
    manifest, headers = study
    n = len(headers)
    per_slice: list[list[Box]] = [[] for _ in range(n)]
    for nodule in manifest["nodules"]:  # ground-truth boxes as if the detector found them
        for index, (x, y, w, h) in nodule["boxes"].items():
            per_slice[int(index)].append(Box(x, y, x + w, y + h, 0.9, "nodule"))
    slices = [SliceDetection(str(h.SOPInstanceUID), tuple(b)) for h, b in zip(headers, per_slice,
                                                                              strict=True)]
    ct = manifest["ct"]
    spacing = VoxelSpacing(*ct["pixel_spacing"], ct["slice_spacing"])
    frames = [f for h in headers for f in frame_geometries(h)]
    detection = detect_series(MODEL, ("nodule",), slices, spacing, frames)
    assert detection.candidates
    path = tmp_path / "sr.dcm"
    build_report(headers, ALGO, detection=detection).save_as(path)
    proc = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60) \
        if Path(DCIODVFY).exists() else None
    if proc is not None:
        assert [ln for ln in (proc.stdout + proc.stderr).splitlines()
                if ln.startswith("Error")] == []
    groups = hd.sr.srread(path).content.get_planar_roi_measurement_groups()
    assert len(groups) == len(detection.candidates)
    index_of = {str(h.SOPInstanceUID): i for i, h in enumerate(headers)}
    truths = manifest["nodules"]
    for group, candidate in zip(groups, detection.candidates, strict=True):
        region = group.roi
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
        assert group.finding_type.value == "27925004"  # Nodule
