"""Label maps, components and volumes on hand-computed arrays."""

import numpy as np
import pytest

from edge.postprocess.masks import (
    clean_label_map,
    component_counts,
    count_components,
    label_map_from_scores,
    remove_small_components,
    volumes_ml,
)
from edge.postprocess.results import VoxelSpacing


def test_argmax_and_single_channel_threshold() -> None:
    scores = np.array([[[0.1, 0.8]], [[0.9, 0.1]], [[0.0, 0.1]]])  # (C=3, 1, 2)
    np.testing.assert_array_equal(label_map_from_scores(scores), [[1, 0]])
    single = np.array([[[0.2, 0.5, 0.7]]])
    np.testing.assert_array_equal(label_map_from_scores(single, threshold=0.5), [[0, 1, 1]])
    assert label_map_from_scores(scores).dtype == np.uint8


def test_volume_in_ml_from_spacing() -> None:
    spacing = VoxelSpacing(row_mm=0.5, column_mm=0.5, slice_mm=2.0)  # 0.5 mm^3 per voxel
    lm = np.zeros((4, 10, 10), dtype=np.uint8)
    lm[0:2, 0:10, 0:10] = 1  # 200 voxels -> 100 mm^3 = 0.1 mL
    lm[3, 0:4, 0:5] = 2  # 20 voxels -> 10 mm^3 = 0.01 mL
    vols = volumes_ml(lm, ("background", "lung", "nodule"), spacing)
    assert vols == pytest.approx({"lung": 0.1, "nodule": 0.01})
    assert spacing.voxel_ml == pytest.approx(0.0005)


def test_absent_label_has_zero_volume_and_no_components() -> None:
    lm = np.zeros((2, 3, 3), dtype=np.uint8)
    labels = ("background", "lung", "nodule")
    assert volumes_ml(lm, labels, VoxelSpacing(1, 1, 1)) == {"lung": 0.0, "nodule": 0.0}
    assert component_counts(lm, labels) == {"lung": 0, "nodule": 0}


def test_component_counts_depend_on_connectivity() -> None:
    mask = np.zeros((3, 5, 5), dtype=np.uint8)
    mask[0, 0, 0] = 1
    mask[1, 1, 1] = 1  # touches the first only at a corner
    mask[2, 4, 4] = 1
    assert count_components(mask, connectivity=3) == 2
    assert count_components(mask, connectivity=1) == 3
    with pytest.raises(ValueError, match="connectivity"):
        count_components(mask, connectivity=4)


def test_nodule_count_per_label() -> None:
    lm = np.zeros((5, 20, 20), dtype=np.uint8)
    lm[:, 0:10, :] = 1
    lm[1:3, 2:4, 2:4] = 2
    lm[2:4, 12:15, 12:15] = 2
    lm[4, 18, 18] = 2
    counts = component_counts(lm, ("background", "lung", "nodule"))
    assert counts == {"lung": 1, "nodule": 3}


def test_small_components_are_removed_per_label() -> None:
    lm = np.zeros((3, 10, 10), dtype=np.uint8)
    lm[0:3, 0:3, 0:3] = 2  # 27 voxels
    lm[1, 8, 8] = 2  # 1 voxel
    lm[0, 8, 0] = 1  # 1 voxel of another label, limit 0 for it
    out = clean_label_map(lm, 3, {2: 5})
    assert int((out == 2).sum()) == 27 and out[1, 8, 8] == 0 and out[0, 8, 0] == 1
    np.testing.assert_array_equal(remove_small_components(lm == 2, 1), lm == 2)
