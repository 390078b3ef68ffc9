"""Stack completeness (the short release grace) and the accumulator's cache."""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset

from edge.core.types import ModelId
from edge.pipeline.accumulator import (
    SeriesAccumulator,
    SourceHeader,
    contiguous_stack,
    strip_pixels,
)
from edge.preprocess.volume import FrameGeometry

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def _stack(zs: list[float], numbers: list[int] | None = None) -> list[FrameGeometry]:
    numbers = numbers or list(range(1, len(zs) + 1))
    return [FrameGeometry(f"1.2.{i}", 1, (0.0, 0.0, z), AXIAL, (0.7, 0.7), n)
            for i, (z, n) in enumerate(zip(zs, numbers, strict=True))]


def test_regular_stack_in_any_arrival_order_is_complete() -> None:
    assert contiguous_stack(_stack([2.5, 0.0, 5.0, 7.5], [2, 1, 3, 4]))


def test_missing_slice_is_not_complete() -> None:
    assert not contiguous_stack(_stack([0.0, 2.5, 7.5, 10.0]))


def test_gap_in_instance_numbers_is_not_complete() -> None:
    assert not contiguous_stack(_stack([0.0, 2.5, 5.0], [1, 2, 4]))


def test_one_frame_or_no_position_or_duplicates_is_not_complete() -> None:
    assert not contiguous_stack(_stack([0.0]))
    assert not contiguous_stack(_stack([0.0, 0.0, 2.5]))
    frames = _stack([0.0, 2.5])
    assert not contiguous_stack([frames[0], FrameGeometry("1.2.9", 1, None, AXIAL)])


def test_two_orientations_are_not_one_stack() -> None:
    frames = _stack([0.0, 2.5, 5.0])
    other = FrameGeometry("1.2.9", 1, (0.0, 0.0, 7.5), (0.0, 1.0, 0.0, 0.0, 0.0, -1.0), None, 4)
    assert not contiguous_stack([*frames, other])


def test_frames_need_every_header_and_drop_forgets() -> None:
    acc = SeriesAccumulator()
    geometry = _stack([0.0, 2.5])
    acc.add_header("s", "1.2.0", SourceHeader(Dataset(), (geometry[0],)))
    assert acc.frames("s", ["1.2.0", "1.2.1"]) is None
    acc.add_header("s", "1.2.1", SourceHeader(Dataset(), (geometry[1],)))
    assert acc.frames("s", ["1.2.0", "1.2.1"]) == geometry
    acc.add_output("s", ModelId("m", 1), "1.2.0", 1, np.zeros((2, 2), np.uint8))
    assert acc.output("s", ModelId("m", 1), "1.2.0", 1) is not None
    acc.drop("s")
    assert acc.output("s", ModelId("m", 1), "1.2.0", 1) is None


def test_strip_pixels_leaves_what_stop_before_pixels_leaves() -> None:
    ds = Dataset()
    ds.Rows = 2
    ds.PixelData = b"\0" * 8
    ds.add_new(0xFFFCFFFC, "OB", b"\0\0")  # trailing padding
    stripped = strip_pixels(ds)
    assert "PixelData" not in stripped and 0xFFFCFFFC not in stripped and stripped.Rows == 2
