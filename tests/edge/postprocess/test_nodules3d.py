"""Merging slice boxes into 3D nodule candidates."""

from __future__ import annotations

import pytest

from edge.core.types import ModelId
from edge.postprocess.nodules3d import MergeSpec, detect_series, merge_slices
from edge.postprocess.results import Box, SliceDetection, VoxelSpacing
from edge.preprocess.volume import FrameGeometry

SPACING = VoxelSpacing(row_mm=0.7, column_mm=0.7, slice_mm=2.5)
SLICES = 30


def _frames() -> list[FrameGeometry]:
    return [FrameGeometry(f"1.2.{z}", position=(-100.0, -120.0, 50.0 + 2.5 * z),
                          orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0), pixel_spacing=(0.7, 0.7))
            for z in range(SLICES)]


def _series(boxes: dict[int, list[Box]]) -> list[SliceDetection]:
    return [SliceDetection(f"1.2.{z}", tuple(boxes.get(z, ()))) for z in range(SLICES)]


def _square(cx: float, cy: float, side: float, score: float = 0.9, label: str = "nodule") -> Box:
    return Box(cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2, score, label)


def test_one_nodule_over_five_slices_becomes_one_candidate() -> None:
    sides = {10: 8, 11: 14, 12: 20, 13: 14, 14: 8}  # a sphere's cross-sections
    slices = _series({z: [_square(200.5, 150.5, s, score=0.5 + z / 100)]
                      for z, s in sides.items()})
    (c,) = merge_slices(slices, SPACING, _frames())
    assert c.slice_range == (10, 14) and len(c.boxes) == 5
    assert c.diameter_mm == pytest.approx(20 * 0.7)
    assert c.center_voxel == pytest.approx((12.0, 150.0, 200.0))
    assert c.center_mm == pytest.approx((-100 + 200 * 0.7, -120 + 150 * 0.7, 50 + 12 * 2.5))
    assert c.score == pytest.approx(0.64)
    (mean,) = merge_slices(slices, SPACING, spec=MergeSpec(score="mean"))
    assert mean.score == pytest.approx(0.62) and mean.center_mm is None


def test_two_nodules_at_different_places_stay_two() -> None:
    slices = _series({z: [_square(100, 100, 10, 0.9), _square(300, 320, 12, 0.7)]
                      for z in range(5, 9)} | {9: [_square(300, 320, 12, 0.8)]})
    first, second = merge_slices(slices, SPACING)
    assert first.slice_range == (5, 8) and first.center_voxel[2] == pytest.approx(99.5)
    assert second.slice_range == (5, 9) and second.score == pytest.approx(0.8)


def test_gaps_labels_and_min_slices() -> None:
    slices = _series({10: [_square(50, 50, 10)], 11: [_square(51, 50, 10)],
                      13: [_square(50, 51, 10)], 20: [_square(50, 50, 10, label="mass")]})
    assert [c.slice_range for c in merge_slices(slices, SPACING)] == [(10, 13), (20, 20)]
    no_gap = merge_slices(slices, SPACING, spec=MergeSpec(max_gap=0))
    assert sorted(c.slice_range for c in no_gap) == [(10, 11), (13, 13), (20, 20)]
    assert [c.label for c in merge_slices(slices, SPACING, spec=MergeSpec(min_slices=2))] == \
        ["nodule"]


def test_series_result_and_errors() -> None:
    slices = _series({3: [_square(50, 50, 10)]})
    result = detect_series(ModelId("det", 1), ("nodule",), slices, SPACING, _frames())
    assert len(result.candidates) == 1 and len(result.slices) == SLICES
    with pytest.raises(ValueError, match="frames"):
        merge_slices(slices[:-1], SPACING, _frames())
    with pytest.raises(ValueError, match="label"):
        detect_series(ModelId("det", 1), ("mass",), slices, SPACING)
