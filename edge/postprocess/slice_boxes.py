"""A detector's output on one frame, as the pipeline keeps it while a series streams in.

A frame's heads are decoded as soon as they come back (:func:`decode_frame`): the boxes, in the
frame's own geometry, are kept as a small ``(K, 6)`` float32 array (x0, y0, x1, y1, score,
label index), the per-slice unit of :class:`~edge.pipeline.slices.SliceStore`. The series'
finalize turns the arrays back into boxes (:func:`rows_to_boxes`) and merges them in 3D.

The sidecar's ``postprocess`` block carries the :class:`DecodeSpec` fields (``stride``,
``size_encoding``, ``heatmap_logits``, ``top_k``, ``nms_iou``, ``peak_kernel``), the head
names (``outputs``, default ``heatmap``, ``size``, ``offset``) and the 3D merge (``merge``:
:class:`~edge.postprocess.nodules3d.MergeSpec` fields); ``thresholds`` the per-label scores.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from edge.postprocess.detection import DecodeSpec, boxes_to_original, decode_heads
from edge.postprocess.nodules3d import MergeSpec
from edge.postprocess.results import Box
from edge.preprocess.imaging import PreprocessSpec

HEADS = ("heatmap", "size", "offset")
_DECODE_KEYS = ("stride", "size_encoding", "heatmap_logits", "top_k", "nms_iou", "peak_kernel")
_MERGE_KEYS = ("min_iou", "max_gap", "max_center_mm", "min_slices", "score")


def decode_spec(postprocess: Mapping[str, Any]) -> DecodeSpec:
    """The :class:`DecodeSpec` a sidecar's ``postprocess`` block describes (defaults else).

    Raises:
        ValueError: a field out of range or an unknown size encoding.
    """
    return DecodeSpec(**{k: postprocess[k] for k in _DECODE_KEYS if k in postprocess})


def merge_spec(postprocess: Mapping[str, Any]) -> MergeSpec:
    """The :class:`MergeSpec` of the sidecar's ``postprocess.merge`` (defaults else).

    Raises:
        ValueError: a field out of range.
    """
    merge = postprocess.get("merge") or {}
    return MergeSpec(**{k: merge[k] for k in _MERGE_KEYS if k in merge})


def head_names(postprocess: Mapping[str, Any]) -> tuple[str, str, str]:
    names = tuple(postprocess.get("outputs") or HEADS)
    return (str(names[0]), str(names[1]), str(names[2]))


def boxes_to_rows(boxes: Sequence[Box], labels: Sequence[str]) -> np.ndarray:
    """``(K, 6)`` float32: x0, y0, x1, y1, score, label index.

    Raises:
        ValueError: a box label not in ``labels``.
    """
    rows = [(b.x0, b.y0, b.x1, b.y1, b.score, labels.index(b.label)) for b in boxes]
    return np.asarray(rows, np.float32).reshape(-1, 6)


def rows_to_boxes(rows: np.ndarray, labels: Sequence[str]) -> tuple[Box, ...]:
    """Inverse of :func:`boxes_to_rows`.

    Raises:
        ValueError: not ``(K, 6)``, or a label index out of range.
    """
    rows = np.asarray(rows, np.float64)
    if rows.ndim != 2 or rows.shape[1] != 6:
        raise ValueError(f"box rows must be (K, 6), got {rows.shape}")
    if len(rows) and not (rows[:, 5].min() >= 0 and rows[:, 5].max() < len(labels)):
        raise ValueError(f"box rows: label index out of range for {len(labels)} labels")
    return tuple(Box(float(r[0]), float(r[1]), float(r[2]), float(r[3]), float(r[4]),
                     labels[int(r[5])]) for r in rows)


def decode_frame(outputs: Mapping[str, np.ndarray], labels: Sequence[str],
                 original_shape: tuple[int, int], preprocess: PreprocessSpec,
                 thresholds: Mapping[str, float], postprocess: Mapping[str, Any]) -> np.ndarray:
    """One frame's heads (batch of one) -> its boxes as rows, in the frame's geometry.

    Raises:
        KeyError: a head is missing from ``outputs``.
        ValueError: heads of the wrong shapes (see :func:`decode_heads`).
    """
    heat, size, offset = (np.asarray(outputs[n])[:1] for n in head_names(postprocess))
    (boxes,) = decode_heads(heat, size, offset, labels, thresholds, decode_spec(postprocess))
    return boxes_to_rows(boxes_to_original(boxes, original_shape, preprocess), labels)
