"""TID 1500 Comprehensive SR: volumes, nodule count, probability, SEG references, UIDs, dciodvfy."""

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
from edge.core.types import ModelId
from edge.postprocess.aggregate import classify_series
from edge.postprocess.masks import component_counts, volumes_ml
from edge.postprocess.results import SeriesClassification, SeriesSegmentation, VoxelSpacing
from edge.writers.codes import AlgorithmInfo
from edge.writers.seg import build_segmentation
from edge.writers.sr import build_report
from edge.writers.uids import result_uid

LABELS = ("background", "lung", "nodule")
SEG_MODEL, CLS_MODEL = ModelId("lungseg", 3), ModelId("nodcls", 1)
SEG_ALGO, CLS_ALGO = AlgorithmInfo("lungseg", "3"), AlgorithmInfo("nodcls", "1")
DCIODVFY = shutil.which("dciodvfy") or "/usr/bin/dciodvfy"


@dataclass(frozen=True)
class Results:
    headers: list[Dataset]
    segmentation: SeriesSegmentation
    seg: Dataset
    classification: SeriesClassification


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Results:
    """A synthetic series with nodules, its ground-truth SEG, and a made-up classifier output."""
    out = tmp_path_factory.mktemp("synth") / "data"
    assert cli(["synth", "--out", str(out), "--studies", "2", "--seed", "1", "--size", "128",
                "--slices-min", "12", "--slices-max", "16", "--quiet"]) == 0
    study = next(s for s in json.loads((out / "manifest.json").read_text())["studies"]
                 if s["nodules"])
    ct = study["ct"]
    lung, nodule = (np.asarray(nib.load(out / ct[k]).dataobj).transpose(2, 1, 0)
                    for k in ("lung_mask", "nodule_mask"))
    lm = np.where(nodule > 0, 2, np.where(lung > 0, 1, 0)).astype(np.uint8)
    headers = [pydicom.dcmread(out / ct["dir"] / f, stop_before_pixels=True) for f in ct["files"]]
    uids = tuple(str(h.SOPInstanceUID) for h in headers)
    spacing = VoxelSpacing(*ct["pixel_spacing"], ct["slice_spacing"])
    segmentation = SeriesSegmentation(SEG_MODEL, LABELS, lm, uids, volumes_ml(lm, LABELS, spacing),
                                      component_counts(lm, LABELS), spacing)
    seg = build_segmentation(segmentation, headers, SEG_ALGO)
    logits = np.stack([np.zeros(len(uids)), np.linspace(-3.0, 2.0, len(uids))], axis=1)
    classification = classify_series(CLS_MODEL, ("no_nodule", "nodule"), uids, logits, 0.5)
    return Results(headers, segmentation, seg, classification)


def dciodvfy_errors(path: Path) -> list[str]:
    if not Path(DCIODVFY).exists():
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    proc = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    return [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("Error")]


@pytest.fixture(scope="module")
def full_report(results: Results, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sr") / "sr.dcm"
    build_report(results.headers, SEG_ALGO, segmentation=(results.segmentation, results.seg),
                 classification=results.classification).save_as(path)
    return path


def _numbers(group: hd.sr.MeasurementsAndQualitativeEvaluations) -> dict[str, tuple[float, str]]:
    return {m.name.meaning: (m.value, m.unit.value) for m in group.get_measurements()}


def test_volume_groups_carry_volume_count_and_reference_the_seg_segments(
        results: Results, full_report: Path) -> None:
    report = hd.sr.srread(full_report).content
    groups = report.get_volumetric_roi_measurement_groups()
    assert [g.finding_type.value for g in groups] == ["39607008", "27925004"]
    for number, (group, label) in enumerate(zip(groups, ("lung", "nodule"), strict=True), 1):
        ref = group.referenced_segment
        assert ref.referenced_sop_instance_uid == results.seg.SOPInstanceUID
        assert ref[0].ReferencedSOPSequence[0].ReferencedSegmentNumber == number
        values = _numbers(group)
        assert values["Volume"] == (pytest.approx(results.segmentation.volumes_ml[label]), "ml")
        assert values["Number of similar findings"][0] == (
            results.segmentation.component_counts[label])
    assert results.segmentation.component_counts["nodule"] >= 1
    assert results.segmentation.volumes_ml["nodule"] > 0


def test_classification_group_has_probability_and_presence(results: Results,
                                                           full_report: Path) -> None:
    report = hd.sr.srread(full_report).content
    (group,) = report.get_image_measurement_groups()
    assert group.finding_type.value == "27925004"
    (probability,) = group.get_measurements()
    assert probability.value == pytest.approx(results.classification.probability)
    assert probability.unit.value == "1"
    (evaluation,) = group.get_qualitative_evaluations()
    assert evaluation.value.value == "52101004"  # Present
    assert results.classification.positive


def test_header_uids_evidence_and_device_observer(results: Results, full_report: Path) -> None:
    ds = pydicom.dcmread(full_report)
    series = str(results.headers[0].SeriesInstanceUID)
    assert ds.SOPInstanceUID == result_uid(series, SEG_MODEL, "sr")
    assert ds.SeriesInstanceUID == result_uid(series, SEG_MODEL, "sr-series")
    assert ds.CompletionFlag == "COMPLETE" and ds.Manufacturer == "mededge"
    evidence = {i.ReferencedSOPInstanceUID for s in ds.CurrentRequestedProcedureEvidenceSequence
                for r in s.ReferencedSeriesSequence for i in r.ReferencedSOPSequence}
    assert results.seg.SOPInstanceUID in evidence
    assert {str(h.SOPInstanceUID) for h in results.headers} <= evidence
    (observer,) = hd.sr.srread(full_report).content.get_observer_contexts()
    assert observer.observer_type.value == "121007"  # Device
    assert ds.ContentTemplateSequence[0].TemplateIdentifier == "1500"


def test_classification_only_report_still_has_the_finding(results: Results,
                                                          tmp_path: Path) -> None:
    negative = SeriesClassification(
        CLS_MODEL, ("no_nodule", "nodule"), results.classification.slices, 0.2, False, 0.5)
    path = tmp_path / "cls.dcm"
    build_report(results.headers, CLS_ALGO, classification=negative).save_as(path)
    report = hd.sr.srread(path).content
    assert report.get_volumetric_roi_measurement_groups() == []
    (group,) = report.get_image_measurement_groups()
    assert group.get_qualitative_evaluations()[0].value.value == "272519000"  # Absent
    ds = pydicom.dcmread(path)
    assert ds.SOPInstanceUID == result_uid(str(results.headers[0].SeriesInstanceUID),
                                           CLS_MODEL, "sr")
    assert dciodvfy_errors(path) == []


def test_report_needs_a_result(results: Results) -> None:
    with pytest.raises(ValueError, match="segmentation, a classification"):
        build_report(results.headers, SEG_ALGO)


def test_dciodvfy_reports_no_errors(results: Results, full_report: Path, tmp_path: Path) -> None:
    assert dciodvfy_errors(full_report) == []
    seg_path = tmp_path / "seg.dcm"
    results.seg.save_as(seg_path)
    assert dciodvfy_errors(seg_path) == []
