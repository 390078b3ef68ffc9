"""Volume assembly: order along the slice normal (shuffled, oblique), multi-frame split, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from edge.core.errors import DataError
from edge.preprocess.volume import FrameGeometry, assemble_volume, frame_geometries, slice_order


def oblique_stack(n: int, step: float, tilt_deg: float = 25.0) -> list[FrameGeometry]:
    """Slices of an oblique stack: rows along x, columns tilted in y-z; positions on the normal."""
    a = math.radians(tilt_deg)
    row, col = (1.0, 0.0, 0.0), (0.0, math.cos(a), -math.sin(a))
    normal = np.cross(row, col)
    origin = np.array([-100.0, -80.0, 40.0])
    return [FrameGeometry(sop_instance_uid=f"1.2.{i}", position=tuple(origin + i * step * normal),
                          orientation=row + col, pixel_spacing=(0.7, 0.8),
                          instance_number=n - i)  # numbers deliberately reversed
            for i in range(n)]


def test_shuffled_oblique_slices_come_out_in_patient_order() -> None:
    frames = oblique_stack(9, step=2.5)
    rng = np.random.default_rng(3)
    shuffled = [frames[i] for i in rng.permutation(len(frames))]
    pixels = [np.full((4, 5), int(f.sop_instance_uid.rsplit(".", 1)[1]), np.int16)
              for f in shuffled]
    volume = assemble_volume(pixels, shuffled)
    assert volume.source_sop_instance_uids == tuple(f.sop_instance_uid for f in frames)
    assert volume.voxels[:, 0, 0].tolist() == list(range(9))
    assert volume.spacing == pytest.approx((2.5, 0.7, 0.8))
    assert volume.voxels.shape == (9, 4, 5) and volume.voxels.dtype == np.int16


def test_without_positions_instance_number_decides() -> None:
    frames = [FrameGeometry(f"1.{i}", instance_number=n, slice_thickness=3.0)
              for i, n in enumerate((3, 1, 2))]
    order, normal, distance = slice_order(frames)
    assert order == [1, 2, 0] and normal is None and distance == []
    volume = assemble_volume([np.zeros((2, 2))] * 3, frames)
    assert volume.spacing[0] == 3.0


def enhanced_ct(frames: int) -> Dataset:
    ds = Dataset()
    ds.SOPInstanceUID = "1.2.3.9"
    ds.NumberOfFrames = frames
    shared = Dataset()
    orient, measures = Dataset(), Dataset()
    orient.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    measures.PixelSpacing = [0.5, 0.5]
    measures.SliceThickness = 1.0
    shared.PlaneOrientationSequence = Sequence([orient])
    shared.PixelMeasuresSequence = Sequence([measures])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for z in [4.0, 0.0, 2.0][:frames]:  # frames stored out of order
        group, plane = Dataset(), Dataset()
        plane.ImagePositionPatient = [0.0, 0.0, z]
        group.PlanePositionSequence = Sequence([plane])
        per_frame.append(group)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    return ds


def test_enhanced_multiframe_is_split_and_ordered() -> None:
    geometries = frame_geometries(enhanced_ct(3))
    assert [g.frame_number for g in geometries] == [1, 2, 3]
    assert [g.position[2] for g in geometries if g.position] == [4.0, 0.0, 2.0]
    assert geometries[0].pixel_spacing == (0.5, 0.5)
    volume = assemble_volume([np.full((2, 2), g.frame_number) for g in geometries], geometries)
    assert volume.voxels[:, 0, 0].tolist() == [2, 3, 1]
    assert volume.spacing == pytest.approx((2.0, 0.5, 0.5))


def test_single_frame_header() -> None:
    ds = Dataset()
    ds.SOPInstanceUID = "1.2"
    ds.ImagePositionPatient = [0, 0, -12.5]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [0.7, 0.7]
    ds.InstanceNumber = 7
    (g,) = frame_geometries(ds)
    assert g.position == (0.0, 0.0, -12.5) and g.instance_number == 7


def test_inconsistent_frames_raise() -> None:
    frames = oblique_stack(2, step=1.0)
    with pytest.raises(DataError, match="one size"):
        assemble_volume([np.zeros((2, 2)), np.zeros((3, 3))], frames)
    tilted = [frames[0], FrameGeometry("x", position=(0.0, 0.0, 0.0),
                                       orientation=(0.0, 1.0, 0.0, 0.0, 0.0, -1.0))]
    with pytest.raises(DataError, match="ImageOrientationPatient"):
        assemble_volume([np.zeros((2, 2))] * 2, tilted)
    with pytest.raises(DataError):
        assemble_volume([], [])
