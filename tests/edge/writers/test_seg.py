"""DICOM SEG from a real synthetic CT series and its ground-truth masks: round trip, coding,
references, UIDs, and dciodvfy (PS3.3 A.51)."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from edge.cli import main as cli
from edge.core.errors import ConfigError
from edge.core.types import ModelId
from edge.postprocess.masks import component_counts, volumes_ml
from edge.postprocess.results import SeriesSegmentation, VoxelSpacing
from edge.writers.codes import AlgorithmInfo
from edge.writers.seg import build_segmentation
from edge.writers.uids import result_uid

LABELS = ("background", "lung", "nodule")
MODEL = ModelId("lungseg", 3)
ALGORITHM = AlgorithmInfo(name="lungseg", version="3")
DCIODVFY = shutil.which("dciodvfy") or "/usr/bin/dciodvfy"


@dataclass(frozen=True)
class Series:
    headers: list[Dataset]
    label_map: np.ndarray
    spacing: VoxelSpacing


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> Series:
    """The synthetic study with nodules: CT headers and lung=1 / nodule=2 from the NIfTI masks."""
    out = tmp_path_factory.mktemp("synth") / "data"
    assert cli(["synth", "--out", str(out), "--studies", "2", "--seed", "1", "--size", "128",
                "--slices-min", "12", "--slices-max", "16", "--quiet"]) == 0
    study = next(s for s in json.loads((out / "manifest.json").read_text())["studies"]
                 if s["nodules"])
    ct = study["ct"]
    masks = [np.asarray(nib.load(out / ct[k]).dataobj).transpose(2, 1, 0)
             for k in ("lung_mask", "nodule_mask")]
    label_map = np.where(masks[1] > 0, 2, np.where(masks[0] > 0, 1, 0)).astype(np.uint8)
    headers = [pydicom.dcmread(out / ct["dir"] / f, stop_before_pixels=True) for f in ct["files"]]
    return Series(headers, label_map, VoxelSpacing(*ct["pixel_spacing"], ct["slice_spacing"]))


def make_result(s: Series, label_map: np.ndarray | None = None) -> SeriesSegmentation:
    lm = s.label_map if label_map is None else label_map
    return SeriesSegmentation(
        model=MODEL, labels=LABELS, label_map=lm,
        source_sop_instance_uids=tuple(str(h.SOPInstanceUID) for h in s.headers),
        volumes_ml=volumes_ml(lm, LABELS, s.spacing),
        component_counts=component_counts(lm, LABELS), spacing=s.spacing)


def dciodvfy_errors(path: Path) -> list[str]:
    """The "Error" lines dciodvfy prints for ``path`` (skips the test when it is not installed)."""
    if not Path(DCIODVFY).exists():
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    proc = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    return [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("Error")]


@pytest.fixture(scope="module")
def written(series: Series, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("seg") / "seg.dcm"
    build_segmentation(make_result(series), series.headers, ALGORITHM).save_as(path)
    return path


def test_pixels_round_trip_per_segment_on_the_referenced_frames(series: Series,
                                                                written: Path) -> None:
    seg = hd.seg.segread(written)
    uids = [str(h.SOPInstanceUID) for h in series.headers]
    assert seg.get_segment_numbers() == [1, 2]
    for number in (1, 2):
        pixels = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=uids, segment_numbers=[number], combine_segments=False,
            ignore_spatial_locations=True)
        np.testing.assert_array_equal(pixels[..., 0], series.label_map == number,
                                      err_msg=f"segment {number}")


def test_empty_frames_are_omitted(series: Series) -> None:
    lm = series.label_map.copy()
    lm[0] = 0
    lm[-1][lm[-1] == 2] = 1  # last slice: lung only
    seg = build_segmentation(make_result(series, lm), series.headers, ALGORITHM)
    expected = sum(int((lm[i] == n).any()) for i in range(len(lm)) for n in (1, 2))
    assert int(seg.NumberOfFrames) == expected <= 2 * len(lm) - 3


def test_segments_are_coded_and_name_the_algorithm(written: Path) -> None:
    ds = pydicom.dcmread(written, stop_before_pixels=True)
    lung, nodule = ds.SegmentSequence
    assert lung.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "91723000"
    assert lung.SegmentedPropertyTypeCodeSequence[0].CodeValue == "39607008"
    assert nodule.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    assert nodule.SegmentedPropertyTypeCodeSequence[0].CodeValue == "27925004"
    assert nodule.AnatomicRegionSequence[0].CodeValue == "39607008"
    for item in (lung, nodule):
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        algo = item.SegmentationAlgorithmIdentificationSequence[0]
        assert (algo.AlgorithmName, algo.AlgorithmVersion) == ("lungseg", "3")
        assert algo.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"  # CID 7162 AI


def test_header_uids_and_references(series: Series, written: Path) -> None:
    ds = pydicom.dcmread(written, stop_before_pixels=True)
    source_series = str(series.headers[0].SeriesInstanceUID)
    assert ds.SeriesInstanceUID == result_uid(source_series, MODEL, "seg-series")
    assert ds.SOPInstanceUID == result_uid(source_series, MODEL, "seg")
    assert ds.StudyInstanceUID == series.headers[0].StudyInstanceUID
    assert ds.Manufacturer == "mededge" and ds.ManufacturerModelName == "lungseg"
    assert "lungseg 3" in ds.SoftwareVersions and ds.DeviceSerialNumber
    assert ds.SegmentationType == "BINARY" and ds.SeriesNumber == 9901
    ref = ds.ReferencedSeriesSequence[0]
    assert ref.SeriesInstanceUID == source_series
    assert {r.ReferencedSOPInstanceUID for r in ref.ReferencedInstanceSequence} == {
        str(h.SOPInstanceUID) for h in series.headers}


def test_same_result_same_uids_new_version_new_uids(series: Series) -> None:
    again = build_segmentation(make_result(series), series.headers, ALGORITHM)
    ds = again
    assert ds.SOPInstanceUID == result_uid(str(series.headers[0].SeriesInstanceUID), MODEL, "seg")
    newer = SeriesSegmentation(ModelId("lungseg", 4), LABELS, series.label_map,
                               make_result(series).source_sop_instance_uids)
    other = build_segmentation(newer, series.headers, AlgorithmInfo("lungseg", "4"))
    assert other.SOPInstanceUID != ds.SOPInstanceUID
    assert other.SeriesInstanceUID != ds.SeriesInstanceUID


def test_dciodvfy_reports_no_errors(written: Path) -> None:
    assert dciodvfy_errors(written) == []


def test_nothing_found_still_gives_a_valid_seg(series: Series, tmp_path: Path) -> None:
    empty = make_result(series, np.zeros_like(series.label_map))
    path = tmp_path / "empty.dcm"
    build_segmentation(empty, series.headers, ALGORITHM).save_as(path)
    assert int(pydicom.dcmread(path, stop_before_pixels=True).NumberOfFrames) > 0
    assert dciodvfy_errors(path) == []


def test_sources_in_any_order_and_missing_ones_rejected(series: Series) -> None:
    seg = build_segmentation(make_result(series), series.headers[::-1], ALGORITHM)
    assert seg.NumberOfFrames > 0
    with pytest.raises(ValueError, match="missing"):
        build_segmentation(make_result(series), series.headers[1:], ALGORITHM)


def test_an_uncoded_label_is_a_config_error(series: Series) -> None:
    result = SeriesSegmentation(MODEL, ("background", "spleen"), np.zeros_like(series.label_map),
                                make_result(series).source_sop_instance_uids)
    with pytest.raises(ConfigError, match="spleen"):
        build_segmentation(result, series.headers, ALGORITHM)
