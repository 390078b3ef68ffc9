"""trainer.metrics against hand-computed values, including the degenerate cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from trainer.metrics import (
    binary_counts,
    classification_metrics,
    dice_iou,
    overlap_counts,
    roc_auc,
    segmentation_metrics,
    youden_threshold,
)


def test_binary_counts_by_hand() -> None:
    c = binary_counts(np.array([1, 1, 0, 0, 1]), np.array([1, 0, 0, 1, 1]))
    assert (c.tp, c.fp, c.tn, c.fn) == (2, 1, 1, 1)


def test_classification_metrics_by_hand() -> None:
    y = np.array([1, 1, 1, 0, 0, 0, 0])
    score = np.array([0.9, 0.6, 0.4, 0.7, 0.3, 0.2, 0.1])
    m = classification_metrics(y, score, threshold=0.5)
    # tp=2 (0.9, 0.6) fn=1 (0.4) fp=1 (0.7) tn=3
    assert m.accuracy == pytest.approx(5 / 7)
    assert m.sensitivity == pytest.approx(2 / 3)
    assert m.specificity == pytest.approx(3 / 4)
    assert m.precision == pytest.approx(2 / 3)
    assert m.f1 == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    # pairs (pos, neg) ranked correctly: 0.9 beats 4, 0.6 beats 3, 0.4 beats 3 -> 10 of 12
    assert m.auc == pytest.approx(10 / 12)


def test_auc_matches_sklearn_with_ties() -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = np.round(rng.random(200) + 0.3 * y, 1)  # rounded: many ties
    assert roc_auc(y, s) == pytest.approx(roc_auc_score(y, s))


def test_all_one_class_gives_nan_not_an_exception() -> None:
    m = classification_metrics(np.ones(4), np.array([0.9, 0.8, 0.2, 0.6]))
    assert math.isnan(m.auc)
    assert math.isnan(m.specificity)  # no negatives
    assert m.sensitivity == pytest.approx(3 / 4)
    m0 = classification_metrics(np.zeros(3), np.array([0.1, 0.2, 0.3]))
    assert math.isnan(m0.sensitivity) and m0.specificity == 1.0 and m0.accuracy == 1.0
    assert math.isnan(m0.f1)  # no positives predicted or present


def test_youden_threshold_separates_a_separable_set() -> None:
    y = np.array([0, 0, 1, 1])
    t = youden_threshold(y, np.array([0.1, 0.3, 0.6, 0.8]))
    assert 0.3 < t <= 0.6
    assert youden_threshold(np.ones(3), np.array([0.2, 0.4, 0.9])) == 0.5


def test_dice_and_iou_by_hand() -> None:
    ref = np.array([[0, 1, 1, 0], [0, 2, 2, 0]])
    pred = np.array([[0, 1, 0, 0], [0, 2, 2, 2]])
    m = segmentation_metrics(pred, ref, ("background", "lung", "nodule"))
    assert m["dice_lung"] == pytest.approx(2 * 1 / (1 + 2))
    assert m["iou_lung"] == pytest.approx(1 / 2)
    assert m["dice_nodule"] == pytest.approx(2 * 2 / (3 + 2))
    assert m["iou_nodule"] == pytest.approx(2 / 3)
    assert m["dice_mean"] == pytest.approx((2 / 3 + 4 / 5) / 2)


def test_empty_masks() -> None:
    empty = np.zeros((4, 4), np.uint8)
    m = segmentation_metrics(empty, empty, ("background", "lung"))
    assert m["dice_lung"] == 1.0 and m["iou_lung"] == 1.0  # nothing there, nothing found
    ref = empty.copy()
    ref[1, 1] = 1
    m = segmentation_metrics(empty, ref, ("background", "lung"))
    assert m["dice_lung"] == 0.0 and m["iou_lung"] == 0.0  # missed it entirely
    m = segmentation_metrics(ref, empty, ("background", "lung"))
    assert m["dice_lung"] == 0.0  # false positive only


def test_counts_accumulate_to_global_dice() -> None:
    a = overlap_counts(np.array([1, 1, 0]), np.array([1, 0, 0]), 2)
    b = overlap_counts(np.array([0, 1]), np.array([1, 1]), 2)
    dice, _ = dice_iou(*(x + y for x, y in zip(a, b, strict=True)))
    assert dice[1] == pytest.approx(2 * 2 / (3 + 3))


def test_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="shape"):
        overlap_counts(np.zeros((2, 2)), np.zeros((2, 3)), 2)
    with pytest.raises(ValueError, match="labels"):
        binary_counts(np.zeros(3), np.zeros(4))
