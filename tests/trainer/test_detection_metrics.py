"""Detection metrics against hand-computed values: COCO mAP and FROC / CPM."""

from __future__ import annotations

import math

import pytest

from edge.postprocess.results import Box, NoduleCandidate, SliceDetection, VoxelSpacing
from trainer.detection_metrics import (
    ScanTruth,
    TruthNodule,
    coco_map,
    detections_by_image,
    froc,
)


def _gt(boxes: dict[int, list[list[float]]]) -> dict:
    images = [{"id": i, "file_name": f"{i}.dcm", "sop_instance_uid": f"1.2.{i}"}
              for i in range(1, 4)]
    anns = [{"id": k + 1, "image_id": image, "category_id": 1, "bbox": bbox,
             "area": bbox[2] * bbox[3], "iscrowd": 0}
            for k, (image, bbox) in enumerate((i, b) for i, bs in boxes.items() for b in bs)]
    return {"images": images, "annotations": anns,
            "categories": [{"id": 1, "name": "nodule"}]}


def _box(x: float, y: float, w: float, h: float, score: float = 0.9) -> Box:
    return Box(x, y, x + w, y + h, score, "nodule")


def test_perfect_predictions_score_one() -> None:
    gt = _gt({1: [[10, 10, 20, 20]], 2: [[50, 60, 12, 8], [100, 100, 30, 30]]})
    dets = {1: [_box(10, 10, 20, 20)], 2: [_box(50, 60, 12, 8), _box(100, 100, 30, 30, 0.8)]}
    scores = coco_map(gt, dets)
    assert scores.map_50 == pytest.approx(1.0) and scores.map_50_95 == pytest.approx(1.0)


def test_a_false_positive_ranked_above_a_true_positive() -> None:
    gt = _gt({1: [[10, 10, 20, 20]]})
    dets = {1: [_box(10, 10, 20, 20, 0.8)], 2: [_box(10, 10, 20, 20, 0.9)]}
    assert coco_map(gt, dets).map_50 == pytest.approx(0.5)  # precision 1/2 at every recall
    gt2 = _gt({1: [[10, 10, 20, 20]], 2: [[40, 40, 10, 10]]})
    dets2 = {1: [_box(10, 10, 20, 20, 0.9)], 3: [_box(5, 5, 5, 5, 0.8)],
             2: [_box(40, 40, 10, 10, 0.7)]}
    # TP, FP, TP: precision 1 up to recall 0.5 (51 of COCO's 101 points), then 2/3
    assert coco_map(gt2, dets2).map_50 == pytest.approx((51 + 50 * 2 / 3) / 101)


def test_iou_of_exactly_one_half_matches_at_0_5_only() -> None:
    gt = _gt({1: [[0, 0, 10, 10]]})
    half = coco_map(gt, {1: [_box(0, 0, 10, 5)]})  # IoU 50 / 100 = 0.5
    assert half.map_50 == pytest.approx(1.0)
    assert half.map_50_95 == pytest.approx(0.1)  # one of ten thresholds
    below = coco_map(gt, {1: [_box(0, 0, 10, 4.9)]})
    assert below.map_50 == 0.0


def test_empty_predictions_and_empty_ground_truth() -> None:
    gt = _gt({1: [[0, 0, 10, 10]]})
    assert coco_map(gt, {}).map_50 == 0.0
    assert coco_map(gt, {1: []}).map_50_95 == 0.0
    assert math.isnan(coco_map(_gt({}), {1: [_box(0, 0, 5, 5)]}).map_50)
    with pytest.raises(ValueError, match="image 9"):
        coco_map(gt, {9: [_box(0, 0, 5, 5)]})
    with pytest.raises(ValueError, match="category"):
        coco_map(gt, {1: [Box(0, 0, 1, 1, 0.5, "mass")]})


def test_size_bucket_ignores_small_nodules() -> None:
    gt = _gt({1: [[10, 10, 10, 10]], 2: [[30, 30, 5, 5]]})  # 7 mm and 3.5 mm at 0.7 mm
    dets = {1: [_box(10, 10, 10, 10, 0.9)], 2: [_box(200, 200, 4, 4, 0.95)]}  # FP is small
    scores = coco_map(gt, dets, pixel_spacing_mm={1: 0.7, 2: 0.7, 3: 0.7}, min_size_mm=6.0)
    # FP first, then TP: precision 1/2 up to recall 1/2 (51 of 101 points); the small GT missed
    assert scores.map_50 == pytest.approx(51 * 0.5 / 101)
    assert scores.map_50_min_size == pytest.approx(1.0)


def test_detections_by_image_uses_sop_instance_uids() -> None:
    gt = _gt({})
    keyed = detections_by_image(gt, [SliceDetection("1.2.2", (_box(0, 0, 1, 1),))])
    assert list(keyed) == [2]
    with pytest.raises(ValueError, match="not in the ground truth"):
        detections_by_image(gt, [SliceDetection("9.9", ())])


SPACING = VoxelSpacing(1.0, 1.0, 2.0)


def _cand(z: float, y: float, x: float, score: float) -> NoduleCandidate:
    return NoduleCandidate("nodule", score, (z, y, x), None, 8.0, (int(z), int(z)))


def _truths() -> list[ScanTruth]:
    return [ScanTruth("a", (TruthNodule((10, 100, 100), 10.0), TruthNodule((30, 50, 50), 8.0)),
                      SPACING),
            ScanTruth("b", (TruthNodule((20, 200, 200), 6.0),), SPACING)]


def test_froc_by_hand() -> None:
    candidates = {
        "a": [_cand(10, 100, 100, 0.9), _cand(10, 300, 300, 0.8), _cand(31, 52, 50, 0.6),
              _cand(5, 5, 5, 0.5), _cand(11, 101, 100, 0.85)],  # the last: a duplicate hit
        "b": [_cand(0, 0, 0, 0.7), _cand(20, 202, 200, 0.4)],
    }
    # by score: .9 TP (1/3, 0 FP/scan) .8 FP (1/3, .5) .7 FP (1/3, 1) .6 TP (2/3, 1)
    # .5 FP (2/3, 1.5) .4 TP (3/3, 1.5); the duplicate at .85 is neither
    result = froc(_truths(), candidates)
    assert result.sensitivities == pytest.approx((1 / 3, 1 / 3, 1 / 3, 2 / 3, 1, 1, 1))
    assert result.cpm == pytest.approx((3 / 3 + 2 / 3 + 3) / 7)
    assert result.nodules == 3 and result.scans == 2


def test_froc_distance_is_in_mm_and_small_nodules_are_ignored() -> None:
    # 3 slices off at 2 mm = 6 mm > radius 5: a miss and a false positive
    miss = froc(_truths(), {"a": [_cand(13, 100, 100, 0.9)]})
    assert miss.sensitivities[-1] == 0.0 and miss.curve_fp_per_scan == (0.5,)
    small = froc(_truths(), {"a": [_cand(30, 50, 50, 0.9)], "b": [_cand(20, 200, 200, 0.8)]},
                 min_diameter_mm=9.0)  # only the 10 mm nodule counts; the hits are ignored
    assert small.nodules == 1 and small.sensitivities[-1] == 0.0
    assert small.curve_fp_per_scan == ()  # no true and no false positives


def test_froc_edge_cases() -> None:
    none = froc(_truths(), {})
    assert none.sensitivities == (0.0,) * 7 and none.cpm == 0.0
    all_fp = froc(_truths(), {"a": [_cand(0, 0, 0, 0.9)], "b": [_cand(1, 1, 1, 0.3)]})
    assert all_fp.cpm == 0.0
    empty = froc([ScanTruth("c", (), SPACING)], {"c": [_cand(0, 0, 0, 0.5)]})
    assert math.isnan(empty.cpm)
    with pytest.raises(ValueError, match="unknown scan"):
        froc(_truths(), {"z": []})
