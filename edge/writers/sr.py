"""Comprehensive SR with a TID 1500 Measurement Report, built by highdicom.

Content (PS3.16 TID 1500 "Measurement Report"):

- TID 1001 observation context: the device observer (TID 1004) is the algorithm.
- Procedure reported (CID 100): "CT Chest" for CT of the chest, else "CT unspecified body region".
- Imaging measurements:
  * per SEG segment a TID 1411 "Volumetric ROI Measurements" group that references the segment
    (Referenced Segment + source series), with finding type/category from the segment coding,
    the Volume (SCT 118565006) in UCUM "ml" and the number of connected components
    (DCM 111406 "Number of similar findings", UCUM "1");
  * for a classification a TID 1501 "Measurements and Qualitative Evaluations" group: finding
    type (e.g. "Nodule"), its Probability (DCM 122157, UCUM "1") referencing the most suspicious
    slice, and a qualitative evaluation Present (SCT 52101004) / Absent (SCT 272519000);
  * per detected nodule a TID 1410 "Planar ROI Measurements" group: SCOORD polyline on the
    slice of its largest box, long axis (mm), probability; and a TID 1411 group with the same
    tracking identifier whose region is a SCOORD3D ellipsoid in patient coordinates
    (:mod:`edge.writers.sr_nodules`).

A report with SCOORD3D content (nodules placed in space) is a Comprehensive 3D SR; otherwise a
Comprehensive SR.

Series and SOP Instance UIDs come from :func:`edge.writers.uids.result_uid` (kinds "sr-series" and
"sr") of the segmentation's model, else the classifier's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from edge.postprocess.results import SeriesClassification, SeriesDetection, SeriesSegmentation
from edge.writers.codes import (
    ABSENT,
    COUNT,
    CT_CHEST,
    ML,
    NO_UNITS,
    PRESENT,
    PROBABILITY,
    VOLUME,
    AlgorithmInfo,
    SegmentCoding,
    coding_for,
)
from edge.writers.seg import DEFAULT_DEVICE_SERIAL, order_sources
from edge.writers.sr_nodules import nodule_groups
from edge.writers.uids import device_uid, result_uid

SR_SERIES_NUMBER = 9902


def procedure_reported(source: Dataset) -> Code:
    """CID 100 procedure: CT Chest where the header says so, else CT unspecified body region."""
    body = str(source.get("BodyPartExamined", "")).upper()
    if str(source.get("Modality", "")) == "CT" and body in {"CHEST", "THORAX", "LUNG"}:
        return CT_CHEST
    return codes.LN.CTUnspecifiedBodyRegion


def observation_context(algorithm: AlgorithmInfo,
                        device_serial_number: str) -> hd.sr.ObservationContext:
    """TID 1001 with the algorithm as the device observer (TID 1004)."""
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=device_uid(algorithm.manufacturer, algorithm.name, algorithm.version),
        name=algorithm.name, manufacturer_name=algorithm.manufacturer,
        model_name=f"{algorithm.name} {algorithm.version}", serial_number=device_serial_number)
    return hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=codes.DCM.Device, observer_identifying_attributes=device))


def segment_groups(result: SeriesSegmentation, seg: Dataset, algorithm: AlgorithmInfo,
                   codings: Mapping[str, SegmentCoding] | None = None,
                   ) -> list[hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations]:
    """One TID 1411 group per foreground label = SEG segment (same numbering as the SEG)."""
    series_uid = str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID)
    groups = []
    for number, label in enumerate(result.foreground_labels, start=1):
        coding = coding_for(label, codings)
        measurements = [hd.sr.Measurement(name=VOLUME, value=float(result.volumes_ml[label]),
                                          unit=ML)]
        if label in result.component_counts:
            measurements.append(hd.sr.Measurement(
                name=COUNT, value=float(result.component_counts[label]), unit=NO_UNITS))
        groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=result_uid(series_uid, result.model, "sr-segment", number),
                identifier=f"segment {number} {label}"),
            referenced_segment=hd.sr.ReferencedSegment(
                sop_class_uid=str(seg.SOPClassUID), sop_instance_uid=str(seg.SOPInstanceUID),
                segment_number=number,
                source_series=hd.sr.SourceSeriesForSegmentation(series_uid)),
            finding_type=coding.property_type, finding_category=coding.category,
            finding_sites=[hd.sr.FindingSite(coding.anatomic_region)]
            if coding.anatomic_region else None,
            algorithm_id=algorithm.sr_identification(), measurements=measurements))
    return groups


def classification_group(result: SeriesClassification, sources: Sequence[Dataset],
                         algorithm: AlgorithmInfo,
                         codings: Mapping[str, SegmentCoding] | None = None,
                         ) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 group: the finding, its series probability and Present/Absent."""
    ordered = order_sources([s.sop_instance_uid for s in result.slices], sources)
    index = result.labels.index(result.positive_label)
    worst = max(range(len(result.slices)),
                key=lambda i: result.slices[i].probabilities[index]) if result.slices else None
    coding = coding_for(result.positive_label, codings)
    series_uid = str(ordered[0].SeriesInstanceUID) if ordered else str(
        sources[0].SeriesInstanceUID)
    probability = hd.sr.Measurement(
        name=PROBABILITY, value=float(result.probability), unit=NO_UNITS,
        referenced_images=[hd.sr.SourceImageForMeasurement.from_source_image(ordered[worst])]
        if worst is not None else None)
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=result_uid(series_uid, result.model, "sr-finding"),
            identifier=f"{result.positive_label} classification"),
        finding_type=coding.property_type,
        finding_sites=[hd.sr.FindingSite(coding.anatomic_region)]
        if coding.anatomic_region else None,
        algorithm_id=algorithm.sr_identification(), measurements=[probability],
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(
            coding.property_type, PRESENT if result.positive else ABSENT)])


def build_report(sources: Sequence[Dataset], algorithm: AlgorithmInfo, *,
                 segmentation: tuple[SeriesSegmentation, Dataset] | None = None,
                 classification: SeriesClassification | None = None,
                 detection: SeriesDetection | None = None,
                 device_serial_number: str = DEFAULT_DEVICE_SERIAL,
                 series_number: int = SR_SERIES_NUMBER,
                 codings: Mapping[str, SegmentCoding] | None = None
                 ) -> hd.sr.ComprehensiveSR | hd.sr.Comprehensive3DSR:
    """Build the TID 1500 report of a series; ``sources`` are the CT headers.

    Raises:
        ValueError: neither result given, or sources missing / from several series.
        ConfigError: a label has no SNOMED CT coding.
    """
    if segmentation is None and classification is None and detection is None:
        raise ValueError("build_report: give a segmentation, a classification or both "
                         "(or a detection)")
    if not sources:
        raise ValueError("build_report: no source instances")
    order_sources([], sources)  # checks one series
    groups: list[hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
                 | hd.sr.MeasurementsAndQualitativeEvaluations
                 | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations] = []
    evidence = list(sources)
    nodules = nodule_groups(detection, sources, algorithm) if detection is not None else []
    if segmentation is not None:
        result, seg = segmentation
        groups.extend(segment_groups(result, seg, algorithm, codings))
        evidence.append(seg)
    if classification is not None:
        groups.append(classification_group(classification, sources, algorithm, codings))
    groups.extend(nodules)
    # UIDs follow the segmentation's model when there is one, else the classifier's, else the
    # detector's
    model = next(r.model for r in (segmentation and segmentation[0], classification, detection)
                 if r)
    series_uid = str(sources[0].SeriesInstanceUID)
    report = hd.sr.MeasurementReport(
        observation_context=observation_context(algorithm, device_serial_number),
        procedure_reported=procedure_reported(sources[0]), imaging_measurements=groups)
    # SCOORD3D content needs the Comprehensive 3D SR IOD (PS3.3 A.35.13)
    has_3d = any(isinstance(g, hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations)
                 for g in nodules)
    iod = hd.sr.Comprehensive3DSR if has_3d else hd.sr.ComprehensiveSR
    return iod(
        evidence=evidence, content=report,
        series_instance_uid=result_uid(series_uid, model, "sr-series"),
        series_number=series_number,
        sop_instance_uid=result_uid(series_uid, model, "sr"), instance_number=1,
        manufacturer=algorithm.manufacturer, is_complete=True,
        manufacturer_model_name=algorithm.name,
        software_versions=algorithm.software_versions(),
        device_serial_number=device_serial_number,
        series_description=f"AI SR {algorithm.name} v{algorithm.version}"[:64])
