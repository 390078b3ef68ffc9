"""Writers: typed results -> DICOM SEG (PS3.3 A.51) and TID 1500 Comprehensive SR via highdicom.

See ``docs/results.md`` for what the objects contain.
"""

from edge.writers.codes import AlgorithmInfo, SegmentCoding, coding_for
from edge.writers.seg import build_segmentation
from edge.writers.sr import build_report
from edge.writers.uids import device_uid, result_uid

__all__ = [
    "AlgorithmInfo", "SegmentCoding", "build_report", "build_segmentation", "coding_for",
    "device_uid", "result_uid",
]
