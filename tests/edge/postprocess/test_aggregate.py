"""Series aggregation: probability and verdict, segmentation back in the source geometry."""

import numpy as np
import pytest

from edge.core.types import ModelId
from edge.postprocess.aggregate import (
    Aggregation,
    classify_series,
    probabilities_from_outputs,
    segment_series,
    series_probability,
    threshold_for,
)
from edge.postprocess.results import SeriesSegmentation, VoxelSpacing
from edge.preprocess.imaging import PreprocessSpec, ResizeMode

MODEL = ModelId("nodcls", 2)
UIDS = ("1.2.3.1", "1.2.3.2", "1.2.3.3")


def test_max_and_noisy_or() -> None:
    p = [0.1, 0.5, 0.2]
    assert series_probability(p) == pytest.approx(0.5)
    assert series_probability(p, Aggregation.NOISY_OR) == pytest.approx(1 - 0.9 * 0.5 * 0.8)
    assert series_probability([1.0, 0.0], "noisy_or") == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no slices"):
        series_probability([])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        series_probability([1.2])


def test_classify_series_from_logits_gives_slices_probability_and_verdict() -> None:
    logits = np.log(np.array([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4]]))  # softmax -> these
    result = classify_series(MODEL, ("no_nodule", "nodule"), UIDS, logits, threshold=0.6)
    assert result.probability == pytest.approx(0.7)
    assert result.positive and result.positive_label == "nodule" and result.threshold == 0.6
    assert [s.sop_instance_uid for s in result.slices] == list(UIDS)
    assert result.slices[1].probabilities == pytest.approx((0.3, 0.7))
    negative = classify_series(MODEL, ("no_nodule", "nodule"), UIDS, logits, threshold=0.71)
    assert not negative.positive


def test_single_sigmoid_output_becomes_two_columns() -> None:
    probs = probabilities_from_outputs(np.array([[0.0], [100.0]]))
    np.testing.assert_allclose(probs, [[0.5, 0.5], [0.0, 1.0]], atol=1e-7)


def test_classify_series_checks_counts() -> None:
    with pytest.raises(ValueError, match="instances"):
        classify_series(MODEL, ("a", "b"), UIDS[:2], np.zeros((3, 2)))


def test_threshold_from_sidecar_mapping() -> None:
    assert threshold_for({"nodule": 0.3}, "nodule") == 0.3
    assert threshold_for({"default": 0.4}, "nodule") == 0.4
    assert threshold_for({}, "nodule") == 0.5


def test_segment_series_restores_geometry_and_measures() -> None:
    spec = PreprocessSpec(height=4, width=4, resize=ResizeMode.RESIZE)
    scores = np.zeros((2, 3, 4, 4), dtype=np.float32)  # 2 slices, 3 classes, 4x4 model size
    scores[:, 0] = 1.0
    scores[0, 1, 0:2, 0:2] = 5.0  # lung: top-left quarter of slice 0
    scores[1, 2, 3, 3] = 5.0  # nodule: bottom-right pixel of slice 1
    spacing = VoxelSpacing(0.5, 0.5, 2.0)
    result = segment_series(MODEL, ("background", "lung", "nodule"), UIDS[:2], scores,
                            (8, 12), spec, spacing)
    assert result.label_map.shape == (2, 8, 12) and result.label_map.dtype == np.uint8
    expected = np.zeros((2, 8, 12), dtype=np.uint8)
    expected[0, 0:4, 0:6] = 1
    expected[1, 6:8, 9:12] = 2
    np.testing.assert_array_equal(result.label_map, expected)
    assert result.volumes_ml["lung"] == pytest.approx(24 * 0.5 / 1000)
    assert result.volumes_ml["nodule"] == pytest.approx(6 * 0.5 / 1000)
    assert result.component_counts == {"lung": 1, "nodule": 1}


def test_segment_series_letterbox_and_small_component_removal() -> None:
    spec = PreprocessSpec(height=4, width=4, resize=ResizeMode.LETTERBOX)
    # a 2x4 (rows x cols) source letterboxed to 4x4 occupies rows 1..2
    scores = np.zeros((1, 2, 4, 4), dtype=np.float32)
    scores[0, 1, 1, :] = 1.0  # foreground on the first image row
    scores[0, 1, 0, :] = 1.0  # padding row: must be dropped
    result = segment_series(MODEL, ("background", "nodule"), UIDS[:1], scores, (2, 4), spec,
                            VoxelSpacing(1, 1, 1))
    np.testing.assert_array_equal(result.label_map[0], [[1, 1, 1, 1], [0, 0, 0, 0]])
    cleaned = segment_series(MODEL, ("background", "nodule"), UIDS[:1], scores, (2, 4), spec,
                             VoxelSpacing(1, 1, 1), min_component_voxels=5)
    assert cleaned.component_counts == {"nodule": 0} and not cleaned.label_map.any()


def test_series_segmentation_validates_its_fields() -> None:
    with pytest.raises(ValueError, match="uint8"):
        SeriesSegmentation(MODEL, ("bg", "x"), np.zeros((1, 2, 2), np.int32), ("1",))
    with pytest.raises(ValueError, match="source_sop_instance_uids"):
        SeriesSegmentation(MODEL, ("bg", "x"), np.zeros((2, 2, 2), np.uint8), ("1",))
    with pytest.raises(ValueError, match="labels"):
        SeriesSegmentation(MODEL, ("bg", "x"), np.full((1, 2, 2), 2, np.uint8), ("1",))


def test_segment_series_from_labels_measures_volumes_now_and_components_later() -> None:
    from edge.postprocess.aggregate import segment_series_from_labels, with_component_counts

    spacing = VoxelSpacing(1.0, 1.0, 2.0)
    label_map = np.zeros((3, 4, 4), np.uint8)
    label_map[0:2, 1:3, 1:3] = 1
    label_map[2, 0, 0] = 2
    partial = segment_series_from_labels(ModelId("m", 1), ("bg", "lung", "nodule"),
                                         ["a", "b", "c"], label_map, spacing,
                                         measure_components=False)
    assert partial.component_counts == {}
    full = with_component_counts(partial)
    assert full.component_counts == {"lung": 1, "nodule": 1}
    assert full.volumes_ml == {"lung": 8 * 0.002, "nodule": 0.002}
