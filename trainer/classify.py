"""Nodule-in-slice classification: the label rule, crop sampling, the loss and the metrics.

The slice label follows the "visible nodule" rule (docs/training.md): positive when a nodule's
cross-section on the slice is at least ``min_visible_mm`` across, negative when no nodule
touches it, ignored (never sampled, left out of the headline metrics) when only a smaller cap
does. Training draws ``crop`` x ``crop`` windows of the full-frame input: around a nodule on
positive slices, around a random lung pixel (where the vessels are: the hard negatives) on
negative ones. The network is fully convolutional with a max readout, so evaluation and serving
run on the whole frame unchanged. The loss is cross-entropy on the slice decision plus a focal
loss on the dense evidence map, supervised by the nodule mask.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from trainer.datasets import IGNORE, IGNORED_LABEL, SliceSet, visible_nodule_labels
from trainer.metrics import classification_metrics, roc_auc

LUNG, NODULE = 1, 2  # class indices of the synthetic class maps


def sigmoid_focal_loss(logits: torch.Tensor, target: torch.Tensor, *, alpha: float = 0.25,
                       gamma: float = 2.0) -> torch.Tensor:
    """RetinaNet's focal loss summed over the map and divided by the positive count (>= 1)."""
    p = torch.sigmoid(logits)
    ce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    alpha_t = alpha * target + (1 - alpha) * (1 - target)
    return (alpha_t * ce * (1 - p_t) ** gamma).sum() / target.sum().clamp(min=1.0)


#: Width (px of the model input) of the band just outside the lung that ``lung-border``
#: negatives are drawn from: mediastinum, hila, chest wall (at 256 px, ~10 mm).
BORDER_PX = 8


def _outside_lung_band(mask: np.ndarray, width: int) -> np.ndarray:
    """Pixels within ``width`` px of the lung but not in it (and not nodule)."""
    import cv2

    lung = (mask == LUNG) | (mask == NODULE)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * width + 1, 2 * width + 1))
    return cv2.dilate(lung.astype(np.uint8), kernel).astype(bool) & ~lung


def crop_origins(masks: np.ndarray | None, labels: np.ndarray, crop: int,
                 rng: np.random.Generator, negatives: str = "lung") -> np.ndarray:
    """Top-left corners (N, 2) of ``crop``-sized windows, always inside the frame.

    Positive slices: centred near a random nodule pixel (jitter up to a quarter window).
    Negative slices, ``negatives="lung"``: half the time on a random lung pixel (vessels: the
    hard negatives), otherwise anywhere (mediastinum, chest wall, air: what the max readout
    also sees at inference). ``"lung-border"``: a third each on a lung pixel, on a pixel in
    the band just outside the lung (:data:`BORDER_PX`: the mediastinum and hila, where the
    single-slice model's strongest false positives were), and anywhere.

    Raises:
        ValueError: no class maps, or an unknown ``negatives`` mode.
    """
    n = len(labels)
    if masks is None:
        raise ValueError("crop sampling needs class maps")
    if negatives not in ("lung", "lung-border"):
        raise ValueError(f"unknown negatives mode {negatives!r}")
    h, w = masks.shape[1:]
    out = np.zeros((n, 2), np.int64)
    for i in range(n):
        region: np.ndarray | None = None
        jitter = False
        if labels[i] == 1:
            region, jitter = masks[i] == NODULE, True
        else:
            u = rng.random()
            if negatives == "lung":
                region = masks[i] == LUNG if u < 0.5 else None
            elif u < 1 / 3:
                region = masks[i] == LUNG
            elif u < 2 / 3:
                region = _outside_lung_band(masks[i], BORDER_PX)
        ys, xs = np.nonzero(region) if region is not None else ((), ())
        if len(ys):
            k = int(rng.integers(len(ys)))
            cy, cx = int(ys[k]), int(xs[k])
            if jitter:
                cy += int(rng.integers(-crop // 4, crop // 4 + 1))
                cx += int(rng.integers(-crop // 4, crop // 4 + 1))
        else:
            cy, cx = int(rng.integers(h)), int(rng.integers(w))
        out[i] = (min(max(cy - crop // 2, 0), h - crop), min(max(cx - crop // 2, 0), w - crop))
    return out


class ClassifyHooks:
    """Slice classification with the visible-nodule rule, crops, CE + dense focal loss, AUC."""

    primary_metric = "auc"

    def __init__(self, threshold: float = 0.5, min_visible_mm: float = 3.0, crop: int = 0,
                 dense_weight: float = 1.0, negatives: str = "lung", small_mm: float = 0.0,
                 small_weight: float = 1.0) -> None:
        self.threshold, self.min_visible_mm = threshold, min_visible_mm
        self.crop, self.dense_weight, self.negatives = crop, dense_weight, negatives
        self.small_mm, self.small_weight = small_mm, small_weight
        self._ce = torch.nn.CrossEntropyLoss()

    def slice_labels(self, data: SliceSet) -> np.ndarray:
        """Labels under the rule: 1, 0, or :data:`IGNORED_LABEL`."""
        return visible_nodule_labels(data.labels, data.nodule_mm, self.min_visible_mm)

    def sample_weights(self, data: SliceSet) -> np.ndarray:
        """Positives and negatives drawn equally often (ignored slices never); among the
        positives, a slice whose largest nodule cross-section is under ``small_mm`` is drawn
        ``small_weight`` times as often as one with a larger cross-section."""
        y = self.slice_labels(data)
        per = np.where(y >= 0, 1.0, 0.0)
        if self.small_mm > 0 and data.nodule_mm is not None:
            mm = np.nan_to_num(np.asarray(data.nodule_mm, np.float64), nan=np.inf)
            per[(y == 1) & (mm < self.small_mm)] *= self.small_weight
        totals = np.array([per[y == 0].sum(), per[y == 1].sum()])
        return np.where(y >= 0, per / np.maximum(totals, 1e-12)[np.maximum(y, 0)], 0.0)

    def make_batch(self, data: SliceSet, idx: np.ndarray, rng: np.random.Generator
                   ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        labels = self.slice_labels(data)[idx]
        images = data.images[idx]
        masks = None if data.masks is None else data.masks[idx]
        usable = masks is not None and not (masks == IGNORE).any()
        if self.crop and self.crop < min(images.shape[-2:]) and usable:
            assert masks is not None
            c = self.crop
            corners = crop_origins(masks, labels, c, rng, self.negatives)
            pairs = zip(images, masks, corners, strict=True)
            images, masks = (np.stack(a) for a in zip(*[
                (im[:, y:y + c, x:x + c], m[y:y + c, x:x + c]) for im, m, (y, x) in pairs],
                strict=True))
            labels = (masks == NODULE).any(axis=(1, 2)).astype(np.int64) * (labels == 1)
        # the slices may be stored as float16 (SliceSet.with_context); the model takes float32
        return (torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)),
                torch.from_numpy(labels),
                None if masks is None else torch.from_numpy(np.ascontiguousarray(masks)))

    def loss(self, output: Any, label: torch.Tensor | None,
             mask: torch.Tensor | None) -> torch.Tensor:
        assert label is not None
        parts = output if isinstance(output, tuple) else (output,)
        logits, dense = parts[0], parts[1] if len(parts) > 1 else None
        lung = parts[2] if len(parts) > 2 else None
        loss = self._ce(logits.float(), label)
        if dense is None or mask is None or self.dense_weight == 0:
            return loss
        known = ~(mask == IGNORE).flatten(1).any(dim=1)  # slices with a real reference
        if not bool(known.any()):
            return loss
        pool = torch.nn.functional.adaptive_max_pool2d
        target = pool((mask[known] == NODULE).float()[:, None], dense.shape[-2:])
        loss = loss + self.dense_weight * sigmoid_focal_loss(dense[known].float(), target)
        if lung is not None:  # a cell touching lung or nodule is lung (pleural nodules too)
            inside = ((mask[known] == LUNG) | (mask[known] == NODULE)).float()[:, None]
            loss = loss + torch.nn.functional.binary_cross_entropy_with_logits(
                lung[known].float(), pool(inside, lung.shape[-2:]))
        return loss

    def evaluate(self, probs: np.ndarray, data: SliceSet) -> dict[str, float]:
        """Metrics under the rule (ignored slices left out) plus ``auc_any_touch``: the AUC
        with every slice a nodule touches counted positive, nothing ignored."""
        y = self.slice_labels(data)
        keep = y != IGNORED_LABEL
        m = classification_metrics(y[keep], probs[keep, 1], self.threshold).as_dict()
        if math.isnan(m["auc"]):  # one class only: fall back so "best" still means something
            m["auc"] = m["accuracy"]
        m["auc_any_touch"] = roc_auc(data.labels, probs[:, 1])
        m["ignored"] = float((~keep).sum())
        return m
