"""Postprocess: model outputs -> typed series results (see ``docs/results.md``)."""

from edge.postprocess.aggregate import (
    Aggregation,
    classify_series,
    segment_series,
    series_probability,
    threshold_for,
)
from edge.postprocess.results import (
    SeriesClassification,
    SeriesSegmentation,
    SliceClassification,
    VoxelSpacing,
)

__all__ = [
    "Aggregation", "SeriesClassification", "SeriesSegmentation", "SliceClassification",
    "VoxelSpacing", "classify_series", "segment_series", "series_probability", "threshold_for",
]
