"""DICOM Segmentation (PS3.3 A.51 Segmentation IOD) of a series, built by highdicom.

One BINARY segment per foreground label (segment number = label index), coded with SNOMED CT
(C.8.20.2 Segment Description), Segment Algorithm Type AUTOMATIC with the model named in the
Segmentation Algorithm Identification Sequence (CID 7162 family). Empty frames are omitted.
Frames reference their source CT instances (Derivation Image / Source Image Sequence), and the
Series and SOP Instance UIDs are derived from the source series and the model version
(:func:`edge.writers.uids.result_uid`), so a re-delivery replaces the earlier object.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from edge.postprocess.results import SeriesSegmentation
from edge.writers.codes import AlgorithmInfo, SegmentCoding, coding_for
from edge.writers.uids import result_uid

SEG_SERIES_NUMBER = 9901  # results sort after the scanner's series
DEFAULT_DEVICE_SERIAL = "0"


def order_sources(sop_instance_uids: Sequence[str], sources: Sequence[Dataset]) -> list[Dataset]:
    """``sources`` in the order of ``sop_instance_uids``.

    Raises:
        ValueError: an instance is missing, or the sources span more than one series.
    """
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    missing = [uid for uid in sop_instance_uids if uid not in by_uid]
    if missing:
        raise ValueError(f"{len(missing)} source instance(s) missing, e.g. {missing[0]}")
    series = {str(ds.SeriesInstanceUID) for ds in sources}
    if len(series) != 1:
        raise ValueError(f"sources must come from one series, got {len(series)}")
    return [by_uid[uid] for uid in sop_instance_uids]


def segment_descriptions(result: SeriesSegmentation, algorithm: AlgorithmInfo,
                         codings: Mapping[str, SegmentCoding] | None = None,
                         ) -> list[hd.seg.SegmentDescription]:
    """One Segment Description per foreground label (PS3.3 C.8.20.2).

    Raises:
        ConfigError: a label has no coding.
    """
    identification = algorithm.seg_identification()
    out = []
    for number, label in enumerate(result.foreground_labels, start=1):
        coding = coding_for(label, codings)
        out.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=label,
            segmented_property_category=coding.category,
            segmented_property_type=coding.property_type,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=identification,
            anatomic_regions=[coding.anatomic_region] if coding.anatomic_region else None,
            display_color=hd.color.CIELabColor.from_rgb(*coding.display_color),
        ))
    return out


def build_segmentation(result: SeriesSegmentation, sources: Sequence[Dataset],
                       algorithm: AlgorithmInfo, *,
                       device_serial_number: str = DEFAULT_DEVICE_SERIAL,
                       series_number: int = SEG_SERIES_NUMBER,
                       codings: Mapping[str, SegmentCoding] | None = None,
                       workers: int = 0) -> hd.seg.Segmentation:
    """Build the SEG of ``result`` over the source instances (headers suffice).

    Raises:
        ValueError: sources do not match the result's instances or geometry.
        ConfigError: a label has no SNOMED CT coding.
    """
    ordered = order_sources(result.source_sop_instance_uids, sources)
    rows, cols = int(ordered[0].Rows), int(ordered[0].Columns)
    if result.label_map.shape[1:] != (rows, cols):
        raise ValueError(f"label map frames are {result.label_map.shape[1:]}, sources are "
                         f"{(rows, cols)}")
    series_uid = str(ordered[0].SeriesInstanceUID)
    pixels = result.label_map
    return hd.seg.Segmentation(
        source_images=ordered, pixel_array=np.ascontiguousarray(pixels),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segment_descriptions(result, algorithm, codings),
        series_instance_uid=result_uid(series_uid, result.model, "seg-series"),
        series_number=series_number,
        sop_instance_uid=result_uid(series_uid, result.model, "seg"),
        instance_number=1,
        manufacturer=algorithm.manufacturer,
        manufacturer_model_name=algorithm.name,
        software_versions=algorithm.software_versions(),
        device_serial_number=device_serial_number,
        content_label=_content_label(algorithm.name),
        content_description=f"{algorithm.name} {algorithm.version} segmentation"[:64],
        content_creator_name=None,
        omit_empty_frames=bool(pixels.any()),  # all empty: keep frames
        series_description=f"AI SEG {algorithm.name} v{algorithm.version}"[:64],
        workers=workers,
    )


def _content_label(name: str) -> str:
    """A Content Label (CS: upper case, digits, space, underscore; at most 16 characters)."""
    cleaned = "".join(c if c.isalnum() else "_" for c in name.upper())
    return (cleaned or "MEDEDGE")[:16]
