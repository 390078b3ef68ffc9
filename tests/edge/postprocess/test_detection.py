"""Decoding CenterNet-style heads: exact boxes, per-class thresholds, NMS, geometry back."""

from __future__ import annotations

import numpy as np
import pytest

from edge.postprocess.detection import (
    DecodeSpec,
    SizeEncoding,
    decode_heads,
    detect_slices,
    encode_boxes,
    find_peaks,
    nms,
    to_model_frame,
    to_original_frame,
)
from edge.preprocess.imaging import PreprocessSpec, ResizeMode, fit_to_size

LABELS = ("nodule", "mass")


def _heads(boxes: list[tuple[float, float, float, float]], classes: list[int],
           logits: list[float], spec: DecodeSpec, grid: int = 32
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Heads with one sharp peak per box at its centre cell, written through encode_boxes."""
    heat = np.full((1, len(LABELS), grid, grid), -12.0, np.float32)
    size = np.zeros((1, 2, grid, grid), np.float32)
    offset = np.zeros((1, 2, grid, grid), np.float32)
    cells, offsets, sizes = encode_boxes(np.array(boxes), spec)
    for (r, c), o, s, k, v in zip(cells, offsets, sizes, classes, logits, strict=True):
        heat[0, k, max(r - 1, 0):r + 2, max(c - 1, 0):c + 2] = v - 3.0  # a blob around ...
        heat[0, k, r, c] = v  # ... its peak
        offset[0, :, r, c] = o
        size[0, :, r, c] = s
    return heat, size, offset


@pytest.mark.parametrize("encoding", [SizeEncoding.LOG, SizeEncoding.PIXELS])
def test_known_peaks_decode_to_the_exact_boxes(encoding: SizeEncoding) -> None:
    spec = DecodeSpec(stride=4, size_encoding=encoding)
    boxes = [(10.0, 20.0, 30.0, 44.0), (61.5, 60.0, 100.25, 90.0)]
    heads = _heads(boxes, [0, 1], [4.0, 2.0], spec)
    (decoded,) = decode_heads(*heads, LABELS, spec=spec)
    assert [b.label for b in decoded] == ["nodule", "mass"]  # by decreasing score
    for got, want in zip(decoded, boxes, strict=True):
        np.testing.assert_allclose([got.x0, got.y0, got.x1, got.y1], want, atol=1e-4)
    assert decoded[0].score == pytest.approx(1 / (1 + np.exp(-4.0)), rel=1e-6)


def test_per_class_thresholds_from_the_sidecar() -> None:
    spec = DecodeSpec(heatmap_logits=False)
    heat = np.zeros((1, 2, 16, 16), np.float32)
    heat[0, 0, 4, 4] = heat[0, 1, 10, 10] = 0.8
    heat[0, 0, 12, 2] = 0.4
    size = np.full((1, 2, 16, 16), np.log(8.0), np.float32)
    offset = np.full((1, 2, 16, 16), 0.5, np.float32)

    def labels_kept(thresholds: dict[str, float]) -> list[str]:
        (boxes,) = decode_heads(heat, size, offset, LABELS, thresholds, spec)
        return sorted(b.label for b in boxes)

    assert labels_kept({}) == ["mass", "nodule"]  # default 0.5 drops the 0.4 peak
    assert labels_kept({"nodule": 0.9, "mass": 0.3}) == ["mass"]
    assert labels_kept({"default": 0.3}) == ["mass", "nodule", "nodule"]
    assert labels_kept({"default": 0.95}) == []


def test_nms_suppresses_duplicates_keeps_disjoint_and_other_classes() -> None:
    spec = DecodeSpec(stride=4)
    # two peaks two cells apart (not 3x3 neighbours) describing nearly the same box
    boxes = [(40.0, 40.0, 72.0, 72.0), (48.0, 40.0, 80.0, 72.0), (100.0, 10.0, 120.0, 30.0),
             (48.0, 40.0, 80.0, 72.0)]  # IoU of the first two: 0.6
    heads = _heads(boxes, [0, 0, 0, 1], [3.0, 2.0, 1.0, 0.5], spec)
    (decoded,) = decode_heads(*heads, LABELS, {"default": 0.1}, spec)
    kept = [(b.label, round(b.x0)) for b in decoded]
    assert kept == [("nodule", 40), ("nodule", 100), ("mass", 48)]
    # the bare function: IoU above the threshold suppresses, at or below it keeps
    square = np.array([[0, 0, 10, 10], [0, 0, 10, 5], [20, 20, 30, 30]], float)  # IoU 0.5
    assert nms(square, np.array([0.9, 0.8, 0.7]), 0.5).tolist() == [0, 1, 2]
    assert nms(square, np.array([0.9, 0.8, 0.7]), 0.49).tolist() == [0, 2]
    assert nms(square, np.array([0.9, 0.8, 0.7]), 0.49, np.array([0, 1, 0])).tolist() == [0, 1, 2]
    assert nms(np.zeros((0, 4)), np.zeros(0), 0.5).tolist() == []


def test_peaks_top_k_and_plateaus() -> None:
    scores = np.zeros((1, 8, 8), np.float32)
    scores[0, 1, 1], scores[0, 5, 5], scores[0, 6, 2] = 0.9, 0.7, 0.8
    cls, row, col, score = find_peaks(scores, top_k=2)
    assert list(zip(row, col, strict=True)) == [(1, 1), (6, 2)]
    assert score.tolist() == pytest.approx([0.9, 0.8])
    flat = np.full((1, 4, 4), 0.5, np.float32)  # every cell equals its 3x3 max
    assert len(find_peaks(flat, top_k=100)[0]) == 16


@pytest.mark.parametrize("mode", [ResizeMode.RESIZE, ResizeMode.LETTERBOX])
@pytest.mark.parametrize("shape", [(512, 384), (300, 600), (256, 256)])
def test_geometry_round_trips_and_matches_fit_to_size(mode: ResizeMode,
                                                      shape: tuple[int, int]) -> None:
    spec = PreprocessSpec(height=256, width=256, resize=mode)
    original = np.array([[40.0, 60.0, 120.0, 100.0], [0.0, 0.0, 10.0, 12.0]])
    model = to_model_frame(original, shape, spec)
    np.testing.assert_allclose(to_original_frame(model, shape, spec), original, atol=1e-9)
    image = np.zeros(shape, np.float32)  # where fit_to_size puts the first box
    image[60:100, 40:120] = 1.0
    fitted = fit_to_size(image, spec)
    rows, cols = np.nonzero(fitted > 0.5)
    found = [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]
    np.testing.assert_allclose(found, model[0], atol=1.0)


def test_detect_slices_maps_boxes_to_each_source_frame() -> None:
    spec = DecodeSpec(stride=4)
    preprocess = PreprocessSpec(height=128, width=128, resize=ResizeMode.LETTERBOX)
    original_box = np.array([[100.0, 40.0, 140.0, 72.0]])
    shape = (256, 512)  # letterboxed: scale 0.25, 32 rows of padding on top
    model_box = to_model_frame(original_box, shape, preprocess)
    heat, size, offset = _heads([tuple(model_box[0])], [0], [3.0], spec)
    heads = {"heatmap": np.concatenate([heat, heat * 0 - 12]), "size": np.concatenate([size] * 2),
             "offset": np.concatenate([offset] * 2)}
    first, second = detect_slices(["1.2.3", "1.2.4"], heads, LABELS, [shape, shape], preprocess,
                                  spec=spec)
    assert first.sop_instance_uid == "1.2.3" and second.boxes == ()
    (box,) = first.boxes
    np.testing.assert_allclose([box.x0, box.y0, box.x1, box.y1], original_box[0], atol=1e-3)
    with pytest.raises(ValueError, match="instances"):
        detect_slices(["1.2.3"], heads, LABELS, [shape], preprocess, spec=spec)
    with pytest.raises(ValueError, match="labels"):
        decode_heads(heat, size, offset, ("only",), spec=spec)
