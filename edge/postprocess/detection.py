"""Decoding anchor-free (CenterNet-style) detection heads into boxes, in numpy/opencv.

Head format (the trainer produces exactly this; see ``docs/detection.md``). For a model input of
``H x W`` pixels and an output stride ``s`` (a cell is ``s x s`` input pixels):

- ``heatmap`` ``[N, C, H/s, W/s]``: one channel per label (``labels[c]``), logits by default
  (``DecodeSpec.heatmap_logits``; the sigmoid is applied here) or probabilities.
- ``size`` ``[N, 2, H/s, W/s]``: box (width, height) in model-input pixels, in log space by
  default: ``w = exp(size[0])``, ``h = exp(size[1])`` (``SizeEncoding.LOG``); ``PIXELS`` reads
  the values as they are.
- ``offset`` ``[N, 2, H/s, W/s]``: where the centre lies inside its cell, (dx, dy) in cells,
  in [0, 1): the centre is ``((col + dx) * s, (row + dy) * s)`` in continuous input pixels
  (pixel ``i`` covers ``[i, i + 1)``, as in COCO).

Decoding: sigmoid, peaks (a cell equal to the 3x3 maximum around it: the max-pool trick, with
``cv2.dilate``), the ``top_k`` strongest peaks over all classes, per-class score thresholds (the
sidecar's ``thresholds``: a label's own key, else ``"default"``), boxes, class-wise NMS, and the
inverse of :func:`edge.preprocess.imaging.fit_to_size` back to the source frame.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from edge.postprocess.activations import sigmoid
from edge.postprocess.aggregate import threshold_for
from edge.postprocess.results import Box, SliceDetection
from edge.preprocess.imaging import PreprocessSpec, ResizeMode


class SizeEncoding(str, enum.Enum):
    """How the size head encodes (width, height) in model-input pixels."""

    LOG = "log"  # value = log(pixels); exp() decodes it
    PIXELS = "pixels"


@dataclass(frozen=True)
class DecodeSpec:
    """Decoding parameters (a sidecar's ``postprocess`` block may carry them)."""

    stride: int = 4
    size_encoding: SizeEncoding = SizeEncoding.LOG
    heatmap_logits: bool = True
    top_k: int = 100
    nms_iou: float = 0.5
    peak_kernel: int = 3

    def __post_init__(self) -> None:
        object.__setattr__(self, "size_encoding", SizeEncoding(self.size_encoding))
        if self.stride < 1 or self.top_k < 1 or self.peak_kernel < 1 or self.peak_kernel % 2 == 0:
            raise ValueError("DecodeSpec: stride and top_k must be >= 1, peak_kernel odd")
        if not 0.0 < self.nms_iou <= 1.0:
            raise ValueError(f"DecodeSpec.nms_iou must lie in (0, 1], got {self.nms_iou}")


def encode_boxes(boxes: np.ndarray, spec: DecodeSpec) -> tuple[np.ndarray, np.ndarray,
                                                                  np.ndarray]:
    """The training targets of ``boxes`` ``(K, 4)`` (x0, y0, x1, y1 in model-input pixels):
    each centre's cell ``(K, 2)`` int (row, col), its ``offset`` ``(K, 2)`` (dx, dy) and its
    ``size`` ``(K, 2)`` as the size head encodes them. :func:`decode_heads` inverts this."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    centre = np.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2], axis=1) / spec.stride
    cell = np.floor(centre)
    wh = np.stack([b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], axis=1)
    size = np.log(np.maximum(wh, 1e-3)) if spec.size_encoding is SizeEncoding.LOG else wh
    return (cell[:, ::-1].astype(np.int64), (centre - cell).astype(np.float32),
            size.astype(np.float32))


def find_peaks(scores: np.ndarray, top_k: int, kernel: int = 3
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Local maxima of ``scores`` ``(C, H, W)``: the ``top_k`` best as (class, row, col, score),
    by decreasing score. Equal neighbours (a plateau) are all peaks; NMS settles them."""
    c, h, w = scores.shape
    element = np.ones((kernel, kernel), np.uint8)
    is_peak = np.empty(scores.shape, bool)
    for k in range(c):
        channel = np.ascontiguousarray(scores[k], dtype=np.float32)
        is_peak[k] = channel == cv2.dilate(channel, element)
    flat = np.where(is_peak, scores, -np.inf).ravel()
    k = min(top_k, flat.size)
    best = np.argpartition(-flat, k - 1)[:k]
    best = best[np.argsort(-flat[best], kind="stable")]
    best = best[np.isfinite(flat[best])]
    cls, rem = np.divmod(best, h * w)
    row, col = np.divmod(rem, w)
    return cls, row, col, flat[best]


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float,
        classes: np.ndarray | None = None) -> np.ndarray:
    """Greedy non-maximum suppression, vectorised: indices kept, by decreasing score. A box is
    dropped when its IoU with a kept, higher-scoring box of the same class exceeds
    ``iou_threshold``."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    if classes is not None and len(b):  # shift classes apart so they never overlap
        b = b + (np.asarray(classes, np.float64) * (b.max() + 1.0))[:, None]
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    keep: list[int] = []
    while order.size:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        w = np.clip(np.minimum(b[i, 2], b[rest, 2]) - np.maximum(b[i, 0], b[rest, 0]), 0, None)
        h = np.clip(np.minimum(b[i, 3], b[rest, 3]) - np.maximum(b[i, 1], b[rest, 1]), 0, None)
        inter = w * h
        iou = inter / np.maximum(area[i] + area[rest] - inter, 1e-12)
        order = rest[iou <= iou_threshold]
    return np.asarray(keep, np.int64)


def _letterbox(original_shape: tuple[int, int], spec: PreprocessSpec
               ) -> tuple[float, float, float, float]:
    """(scale_x, scale_y, left, top) of the map original -> model input (fit_to_size's)."""
    h, w = original_shape
    if (h, w) == (spec.height, spec.width):
        return 1.0, 1.0, 0.0, 0.0
    if spec.resize is ResizeMode.RESIZE:
        return spec.width / w, spec.height / h, 0.0, 0.0
    scale = min(spec.height / h, spec.width / w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    return nw / w, nh / h, float((spec.width - nw) // 2), float((spec.height - nh) // 2)


def to_model_frame(boxes: np.ndarray, original_shape: tuple[int, int],
                   spec: PreprocessSpec) -> np.ndarray:
    """Boxes ``(K, 4)`` x0, y0, x1, y1 in a source frame -> the model input (training targets)."""
    sx, sy, left, top = _letterbox(original_shape, spec)
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    return b * np.array([sx, sy, sx, sy]) + np.array([left, top, left, top])


def to_original_frame(boxes: np.ndarray, original_shape: tuple[int, int],
                      spec: PreprocessSpec) -> np.ndarray:
    """Boxes ``(K, 4)`` in the model input -> the source frame, clipped to it (inverse of
    :func:`to_model_frame`)."""
    sx, sy, left, top = _letterbox(original_shape, spec)
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    out = (b - np.array([left, top, left, top])) / np.array([sx, sy, sx, sy])
    h, w = original_shape
    return np.clip(out, 0.0, np.array([w, h, w, h], np.float64))


def decode_heads(heatmap: np.ndarray, size: np.ndarray, offset: np.ndarray,
                 labels: Sequence[str], thresholds: Mapping[str, float] | None = None,
                 spec: DecodeSpec | None = None) -> list[tuple[Box, ...]]:
    """Boxes of each image of a batch, in model-input pixels, by decreasing score.

    Raises:
        ValueError: heads that are not 4D, whose batch or spatial sizes differ, with other than 2
            size/offset channels, or a heatmap whose channel count is not ``len(labels)``.
    """
    spec = spec or DecodeSpec()
    thresholds = thresholds or {}
    if heatmap.ndim != 4 or size.shape != offset.shape or size.ndim != 4 or size.shape[1] != 2 \
            or size.shape[0] != heatmap.shape[0] or size.shape[2:] != heatmap.shape[2:]:
        raise ValueError(f"detection heads: heatmap {heatmap.shape}, size {size.shape}, offset "
                         f"{offset.shape}; expected [N,C,H,W], [N,2,H,W], [N,2,H,W]")
    if heatmap.shape[1] != len(labels):
        raise ValueError(f"detection heads: {heatmap.shape[1]} heatmap channels for "
                         f"{len(labels)} labels")
    minimum = np.array([threshold_for(thresholds, label) for label in labels])
    out: list[tuple[Box, ...]] = []
    for n in range(heatmap.shape[0]):
        scores = sigmoid(heatmap[n]) if spec.heatmap_logits else heatmap[n]
        cls, row, col, score = find_peaks(np.asarray(scores, np.float32), spec.top_k,
                                          spec.peak_kernel)
        passed = score >= minimum[cls]
        cls, row, col, score = cls[passed], row[passed], col[passed], score[passed]
        wh = size[n][:, row, col].T.astype(np.float64)
        if spec.size_encoding is SizeEncoding.LOG:
            wh = np.exp(np.minimum(wh, 20.0))
        cx = (col + offset[n][0, row, col]) * spec.stride
        cy = (row + offset[n][1, row, col]) * spec.stride
        boxes = np.stack([cx - wh[:, 0] / 2, cy - wh[:, 1] / 2,
                          cx + wh[:, 0] / 2, cy + wh[:, 1] / 2], axis=1)
        kept = nms(boxes, score, spec.nms_iou, cls)
        out.append(tuple(_box(boxes[i], float(score[i]), labels[int(cls[i])]) for i in kept))
    return out


def _box(corners: np.ndarray, score: float, label: str) -> Box:
    x0, y0, x1, y1 = (float(v) for v in corners)
    return Box(x0, y0, x1, y1, score, label)


def boxes_to_original(boxes: Sequence[Box], original_shape: tuple[int, int],
                      spec: PreprocessSpec) -> tuple[Box, ...]:
    """``boxes`` in the model input, mapped back to the source frame."""
    if not boxes:
        return ()
    coords = to_original_frame(np.array([[b.x0, b.y0, b.x1, b.y1] for b in boxes]),
                               original_shape, spec)
    return tuple(_box(c, b.score, b.label) for c, b in zip(coords, boxes, strict=True))


def detect_slices(sop_instance_uids: Sequence[str], heads: Mapping[str, np.ndarray],
                  labels: Sequence[str], original_shapes: Sequence[tuple[int, int]],
                  preprocess: PreprocessSpec, thresholds: Mapping[str, float] | None = None,
                  spec: DecodeSpec | None = None,
                  head_names: tuple[str, str, str] = ("heatmap", "size", "offset"),
                  ) -> tuple[SliceDetection, ...]:
    """One :class:`SliceDetection` per instance from a batch of heads (one row per instance).

    Raises:
        KeyError: a head named in ``head_names`` is missing.
        ValueError: as :func:`decode_heads`, or counts of uids, shapes and rows that differ.
    """
    heat, size, offset = (heads[name] for name in head_names)
    if not len(sop_instance_uids) == len(original_shapes) == heat.shape[0]:
        raise ValueError(f"detect_slices: {len(sop_instance_uids)} instances, "
                         f"{len(original_shapes)} shapes, {heat.shape[0]} head rows")
    decoded = decode_heads(heat, size, offset, labels, thresholds, spec)
    return tuple(SliceDetection(uid, boxes_to_original(boxes, shape, preprocess))
                 for uid, shape, boxes in zip(sop_instance_uids, original_shapes, decoded,
                                              strict=True))
