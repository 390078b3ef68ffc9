"""TID 1500 measurement groups for detected nodules (one TID 1410 group per 3D candidate).

Each :class:`~edge.postprocess.results.NoduleCandidate` becomes a "Planar ROI Measurements and
Qualitative Evaluations" group (PS3.16 TID 1410):

- image region: a closed SCOORD POLYLINE (the box's four corners, first = last) on the slice
  where the candidate's box is largest (the slice its long axis is measured on), in the
  continuous pixel coordinates of PS3.3 C.18.6.1.1 (column, row; (0, 0) the top-left corner of
  the top-left pixel), which are the boxes' own (docs/detection.md);
- finding type Nodule (SCT 27925004), finding site Lung;
- measurements: Long axis (SCT 103339001) in mm (UCUM "mm") and Probability (DCM 122157, "1");
- tracking identifier: a deterministic UID per (series, model, candidate index) and the text
  ``nodule N``.

Each candidate also gets a TID 1411 "Volumetric ROI Measurements" group with the same tracking
identifier (the same finding, PS3.16 TID 4108) whose region is a SCOORD3D ELLIPSOID "Volume
Surface" in the series' Frame of Reference (patient LPS mm, :mod:`edge.writers.patient_coords`):
centred on the candidate's centre, axes along the row direction (half the largest box's width),
the column direction (half its height) and the slice normal (half the slice range, each slice
counted whole). TID 1410 takes exactly one image region, so the 3D region cannot sit beside the
SCOORD in the planar group. Sources without slice geometry (ImagePositionPatient,
ImageOrientationPatient, PixelSpacing, FrameOfReferenceUID) get no 3D groups; a warning says so.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from edge.postprocess.results import Box, NoduleCandidate, SeriesDetection
from edge.writers.codes import NO_UNITS, NODULE, PROBABILITY, AlgorithmInfo
from edge.writers.patient_coords import SliceStack
from edge.writers.uids import result_uid

log = logging.getLogger(__name__)

MM = Code("mm", "UCUM", "millimeter")
LONG_AXIS = codes.SCT.LongAxis  # (103339001, SCT)


def largest_box(candidate: NoduleCandidate) -> tuple[int, Box]:
    """(slice index, box) of the candidate's largest box.

    Raises:
        ValueError: a candidate without boxes.
    """
    if not candidate.boxes:
        raise ValueError("nodule candidate has no boxes")
    return max(candidate.boxes, key=lambda item: (item[1].area, item[1].score))


def polyline(box: Box) -> np.ndarray:
    """The closed outline of ``box``: five (column, row) points, first = last."""
    return np.array([[box.x0, box.y0], [box.x1, box.y0], [box.x1, box.y1], [box.x0, box.y1],
                     [box.x0, box.y0]], np.float32)


def ellipsoid(candidate: NoduleCandidate, stack: SliceStack) -> np.ndarray:
    """The candidate's ellipsoid as six (x, y, z) points in mm: the endpoints of its axes along
    the row direction, the column direction and the slice normal (PS3.3 C.18.9.1.2).

    Raises:
        ValueError: a candidate without boxes.
    """
    _, box = largest_box(candidate)
    centre = stack.to_patient(*candidate.center_voxel)
    first, last = candidate.slice_range
    half_axes = (box.width / 2 * stack.pixel_spacing[1] * stack.row_cosine,
                 box.height / 2 * stack.pixel_spacing[0] * stack.column_cosine,
                 (last - first + 1) / 2 * stack.slice_distance * stack.normal)
    return np.array([centre + sign * axis for axis in half_axes for sign in (-1, 1)],
                    np.float64)


def _stack(result: SeriesDetection, by_uid: dict[str, Dataset]) -> SliceStack | None:
    try:
        return SliceStack.from_headers([by_uid[s.sop_instance_uid] for s in result.slices])
    except (KeyError, ValueError) as exc:
        log.warning("nodule SR without 3D regions: %s", exc)
        return None


def nodule_groups(result: SeriesDetection, sources: Sequence[Dataset], algorithm: AlgorithmInfo
                  ) -> list[hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
                            | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations]:
    """Per candidate, in the order of ``result.candidates``: its TID 1410 group (SCOORD), then
    its TID 1411 group (SCOORD3D ellipsoid) when the sources place the slices in space.

    Raises:
        ValueError: a candidate's slice is not among ``result.slices`` or its instance not
            among ``sources``.
    """
    by_uid = {str(s.SOPInstanceUID): s for s in sources}
    series_uid = str(sources[0].SeriesInstanceUID)
    stack = _stack(result, by_uid) if result.candidates else None
    sites = [hd.sr.FindingSite(NODULE.anatomic_region)] if NODULE.anatomic_region else None
    algorithm_id = algorithm.sr_identification()
    groups: list[hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
                 | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations] = []
    for number, candidate in enumerate(result.candidates, start=1):
        index, box = largest_box(candidate)
        if not 0 <= index < len(result.slices):
            raise ValueError(f"nodule {number}: slice {index} is outside the series")
        uid = result.slices[index].sop_instance_uid
        if uid not in by_uid:
            raise ValueError(f"nodule {number}: instance {uid} is not a source")
        region = hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=polyline(box),
            source_image=hd.sr.SourceImageForRegion.from_source_image(by_uid[uid]))
        tracking = hd.sr.TrackingIdentifier(
            uid=result_uid(series_uid, result.model, "sr-nodule", number),
            identifier=f"nodule {number}")
        groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking, referenced_region=region,
            finding_type=NODULE.property_type, finding_category=NODULE.category,
            finding_sites=sites, algorithm_id=algorithm_id,
            measurements=[
                hd.sr.Measurement(name=LONG_AXIS, value=round(float(candidate.diameter_mm), 2),
                                  unit=MM),
                hd.sr.Measurement(name=PROBABILITY, value=round(float(candidate.score), 4),
                                  unit=NO_UNITS)]))
        if stack is not None:
            surface = hd.sr.VolumeSurface(
                graphic_type=hd.sr.GraphicTypeValues3D.ELLIPSOID,
                graphic_data=ellipsoid(candidate, stack),
                frame_of_reference_uid=stack.frame_of_reference_uid,
                source_series=hd.sr.SourceSeriesForSegmentation(series_uid))
            groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking, referenced_volume_surface=surface,
                finding_type=NODULE.property_type, finding_category=NODULE.category,
                finding_sites=sites, algorithm_id=algorithm_id))
    return groups
