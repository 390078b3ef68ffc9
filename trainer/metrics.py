"""Evaluation metrics in numpy: binary classification and per-class overlap of label maps.

Conventions for degenerate inputs, chosen so that a metric is defined whenever it can be and
NaN (not an exception) when it cannot:

- sensitivity with no positives, specificity with no negatives: NaN;
- ROC AUC with a single class present: NaN (sklearn would raise);
- Dice / IoU of a class absent from both prediction and reference: 1.0 (perfect agreement on
  "nothing there"), absent from one of them only: 0.0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class BinaryCounts:
    """Confusion-matrix counts of a binary decision (positive = label 1)."""

    tp: int
    fp: int
    tn: int
    fn: int


def binary_counts(y_true: np.ndarray, y_pred: np.ndarray) -> BinaryCounts:
    """Count TP/FP/TN/FN of 0/1 predictions against 0/1 labels.

    Raises:
        ValueError: the arrays differ in length.
    """
    t = np.asarray(y_true).astype(bool).ravel()
    p = np.asarray(y_pred).astype(bool).ravel()
    if t.shape != p.shape:
        raise ValueError(f"metrics: {t.size} labels but {p.size} predictions")
    return BinaryCounts(tp=int(np.sum(t & p)), fp=int(np.sum(~t & p)),
                        tn=int(np.sum(~t & ~p)), fn=int(np.sum(t & ~p)))


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den > 0 else float("nan")


def roc_auc(y_true: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve (ties count half); NaN when only one class is present."""
    t = np.asarray(y_true).astype(bool).ravel()
    s = np.asarray(score, dtype=np.float64).ravel()
    n_pos, n_neg = int(t.sum()), int((~t).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    # Mann-Whitney U with average ranks for ties.
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty_like(s)
    sorted_s = s[order]
    i = 0
    while i < s.size:
        j = i
        while j + 1 < s.size and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    u = ranks[t].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def roc_curve(y_true: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False-positive rates, true-positive rates and thresholds (descending), as sklearn's."""
    from sklearn.metrics import roc_curve as _roc_curve

    fpr, tpr, thr = _roc_curve(np.asarray(y_true).astype(int), np.asarray(score, np.float64))
    return fpr, tpr, thr


def youden_threshold(y_true: np.ndarray, score: np.ndarray, default: float = 0.5) -> float:
    """The score threshold maximising sensitivity + specificity - 1; ``default`` if undefined."""
    t = np.asarray(y_true).astype(bool)
    if t.all() or not t.any():
        return default
    fpr, tpr, thr = roc_curve(t, score)
    best = int(np.argmax(tpr - fpr))
    return float(min(max(thr[best], 0.0), 1.0))


@dataclass(frozen=True)
class ClassificationMetrics:
    """Binary classification metrics at one threshold."""

    auc: float
    accuracy: float
    sensitivity: float
    specificity: float
    precision: float
    f1: float
    threshold: float
    counts: BinaryCounts

    def as_dict(self) -> dict[str, float]:
        out = asdict(self)
        out.update(out.pop("counts"))
        return out


def classification_metrics(y_true: np.ndarray, score: np.ndarray,
                           threshold: float = 0.5) -> ClassificationMetrics:
    """Accuracy, sensitivity, specificity, precision, F1 at ``threshold`` and ROC AUC.

    ``score`` is the positive-class probability; a sample is positive when ``score >= threshold``.

    Raises:
        ValueError: the arrays differ in length.
    """
    pred = np.asarray(score) >= threshold
    c = binary_counts(y_true, pred)
    total = c.tp + c.fp + c.tn + c.fn
    precision = _ratio(c.tp, c.tp + c.fp)
    sensitivity = _ratio(c.tp, c.tp + c.fn)
    f1_den = 2 * c.tp + c.fp + c.fn
    f1 = _ratio(2 * c.tp, f1_den) if f1_den else float("nan")
    return ClassificationMetrics(
        auc=roc_auc(y_true, score), accuracy=_ratio(c.tp + c.tn, total),
        sensitivity=sensitivity, specificity=_ratio(c.tn, c.tn + c.fp),
        precision=precision, f1=f1, threshold=float(threshold), counts=c)


def overlap_counts(pred: np.ndarray, ref: np.ndarray,
                   num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class intersection, predicted and reference voxel counts of two label maps.

    Accumulate these over a dataset and pass the sums to :func:`dice_iou` for dataset-level
    ("global") Dice, which is what the reports use.

    Raises:
        ValueError: the label maps differ in shape.
    """
    p = np.asarray(pred)
    r = np.asarray(ref)
    if p.shape != r.shape:
        raise ValueError(f"metrics: prediction shape {p.shape} != reference shape {r.shape}")
    p, r = p.ravel().astype(np.int64), r.ravel().astype(np.int64)
    inter = np.bincount(p[p == r], minlength=num_classes)[:num_classes]
    n_pred = np.bincount(p, minlength=num_classes)[:num_classes]
    n_ref = np.bincount(r, minlength=num_classes)[:num_classes]
    return inter, n_pred, n_ref


def dice_iou(inter: np.ndarray, n_pred: np.ndarray,
             n_ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-class Dice and IoU from counts; a class empty in both is 1.0 (see module doc)."""
    inter = np.asarray(inter, np.float64)
    union = np.asarray(n_pred, np.float64) + np.asarray(n_ref, np.float64)
    empty = union == 0
    dice = np.where(empty, 1.0, 2 * inter / np.where(empty, 1, union))
    iou_den = union - inter
    iou = np.where(empty, 1.0, inter / np.where(iou_den == 0, 1, iou_den))
    return dice, iou


def segmentation_metrics(pred: np.ndarray, ref: np.ndarray,
                         labels: Sequence[str]) -> dict[str, float]:
    """``dice_<label>`` and ``iou_<label>`` per foreground class and ``dice_mean`` over them.

    Class 0 (``labels[0]``) is background and is left out of the mean.

    Raises:
        ValueError: the label maps differ in shape.
    """
    dice, iou = dice_iou(*overlap_counts(pred, ref, len(labels)))
    return segmentation_summary(dice, iou, labels)


def segmentation_summary(dice: np.ndarray, iou: np.ndarray,
                         labels: Sequence[str]) -> dict[str, float]:
    """Name per-class Dice/IoU arrays by label; adds ``dice_mean`` and ``iou_mean`` (fg only)."""
    out: dict[str, float] = {}
    for k, name in enumerate(labels[1:], start=1):
        out[f"dice_{name}"] = float(dice[k])
        out[f"iou_{name}"] = float(iou[k])
    out["dice_mean"] = float(np.mean(dice[1:]))
    out["iou_mean"] = float(np.mean(iou[1:]))
    return out
