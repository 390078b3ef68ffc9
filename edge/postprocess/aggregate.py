"""Series-level aggregation of per-slice model outputs.

Classification: each slice gets class probabilities; the series probability of the positive label
is the maximum over slices by default (see ``docs/results.md`` for why not noisy-OR), and the
verdict is ``probability >= threshold`` with the threshold from the model's sidecar.

Segmentation: per-slice label maps at model size are mapped back to each source frame with
:func:`edge.preprocess.imaging.restore_geometry`, stacked in volume order, cleaned of small
components, and measured (volumes in mL, component counts).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping, Sequence

import numpy as np

from edge.core.types import ModelId
from edge.postprocess.activations import sigmoid, softmax
from edge.postprocess.masks import (
    clean_label_map,
    component_counts,
    label_map_from_scores,
    volumes_ml,
)
from edge.postprocess.results import (
    SeriesClassification,
    SeriesSegmentation,
    SliceClassification,
    VoxelSpacing,
)
from edge.preprocess.imaging import PreprocessSpec, restore_geometry

DEFAULT_THRESHOLD = 0.5


class Aggregation(str, enum.Enum):
    """How slice probabilities of the positive label become one series probability."""

    MAX = "max"  # the most suspicious slice decides; independent of the number of slices
    NOISY_OR = "noisy_or"  # 1 - prod(1 - p): assumes independent slices, grows with length


def series_probability(slice_probs: Sequence[float] | np.ndarray,
                       method: Aggregation | str = Aggregation.MAX) -> float:
    """Combine per-slice probabilities of one label.

    Raises:
        ValueError: no slices, or a probability outside [0, 1].
    """
    p = np.asarray(slice_probs, dtype=np.float64)
    if p.size == 0:
        raise ValueError("series_probability: no slices")
    if np.any((p < 0) | (p > 1)) or not np.all(np.isfinite(p)):
        raise ValueError("series_probability: probabilities must lie in [0, 1]")
    if Aggregation(method) is Aggregation.MAX:
        return float(p.max())
    # log1p keeps precision when many small probabilities are combined
    return float(-np.expm1(np.sum(np.log1p(-np.minimum(p, 1.0 - 1e-12)))))


def threshold_for(thresholds: Mapping[str, float], label: str,
                  default: float = DEFAULT_THRESHOLD) -> float:
    """The sidecar threshold of ``label`` (key ``label`` or ``"default"``), else ``default``."""
    return float(thresholds.get(label, thresholds.get("default", default)))


def probabilities_from_outputs(outputs: np.ndarray, from_logits: bool = True) -> np.ndarray:
    """(N, C) classifier outputs -> (N, C) probabilities.

    C == 1 is a single sigmoid output: it becomes two columns (1 - p, p).

    Raises:
        ValueError: ``outputs`` is not 2D.
    """
    if outputs.ndim != 2:
        raise ValueError(f"classifier outputs must be (slices, classes), got {outputs.shape}")
    if outputs.shape[1] == 1:
        p = sigmoid(outputs[:, 0]) if from_logits else outputs[:, 0].astype(np.float32)
        return np.stack([1.0 - p, p], axis=1)
    return softmax(outputs, axis=1) if from_logits else outputs.astype(np.float32)


def classify_series(model: ModelId, labels: Sequence[str], sop_instance_uids: Sequence[str],
                    outputs: np.ndarray, threshold: float = DEFAULT_THRESHOLD, *,
                    positive_label: str | None = None, from_logits: bool = True,
                    method: Aggregation | str = Aggregation.MAX) -> SeriesClassification:
    """Per-slice probabilities and the series verdict from (N, C) classifier outputs.

    Raises:
        ValueError: the numbers of slices, instances and labels disagree.
    """
    probs = probabilities_from_outputs(np.asarray(outputs), from_logits)
    if probs.shape != (len(sop_instance_uids), len(labels)):
        raise ValueError(f"classify_series: outputs give {probs.shape} probabilities for "
                         f"{len(sop_instance_uids)} instances and {len(labels)} labels")
    positive = positive_label or labels[-1]
    index = list(labels).index(positive)
    probability = series_probability(probs[:, index], method)
    return SeriesClassification(
        model=model, labels=tuple(labels),
        slices=tuple(SliceClassification(uid, tuple(float(x) for x in row))
                     for uid, row in zip(sop_instance_uids, probs, strict=True)),
        probability=probability, positive=probability >= threshold, threshold=float(threshold),
        positive_label=positive, aggregation=Aggregation(method).value)


def segment_series(model: ModelId, labels: Sequence[str], sop_instance_uids: Sequence[str],
                   outputs: Sequence[np.ndarray] | np.ndarray, original_shape: tuple[int, int],
                   spec: PreprocessSpec, spacing: VoxelSpacing, *,
                   min_component_voxels: Mapping[int, int] | int = 0,
                   connectivity: int = 3, threshold: float = 0.5) -> SeriesSegmentation:
    """Per-slice (C, H, W) model outputs -> a label map in the source geometry, measured.

    Each slice is labelled at model size (argmax, or ``threshold`` for one channel) and resized
    back with nearest neighbour, so labels never blend. Components below
    ``min_component_voxels`` (per label index, or one number for all) become background before
    volumes and counts are taken.

    Raises:
        ValueError: the numbers of slices and instances disagree, or an output has too many
            classes for ``labels``.
    """
    if len(outputs) != len(sop_instance_uids):
        raise ValueError(f"segment_series: {len(outputs)} outputs for "
                         f"{len(sop_instance_uids)} instances")
    rows, cols = original_shape
    label_map = np.zeros((len(outputs), rows, cols), dtype=np.uint8)
    for i, scores in enumerate(outputs):
        small = label_map_from_scores(np.asarray(scores), threshold)
        label_map[i] = restore_geometry(small, original_shape, spec)
    return segment_series_from_labels(model, labels, sop_instance_uids, label_map, spacing,
                                      min_component_voxels=min_component_voxels,
                                      connectivity=connectivity)


def segment_series_from_labels(model: ModelId, labels: Sequence[str],
                               sop_instance_uids: Sequence[str], label_map: np.ndarray,
                               spacing: VoxelSpacing, *,
                               min_component_voxels: Mapping[int, int] | int = 0,
                               connectivity: int = 3, measure_components: bool = True,
                               ) -> SeriesSegmentation:
    """A (slices, rows, columns) uint8 label map already in the source geometry -> cleaned and
    measured. The pipeline restores each slice as it arrives, so a series' finalize only
    stacks; :func:`segment_series` is this after labelling and restoring (C, H, W) outputs.

    ``measure_components`` False leaves ``component_counts`` empty (the SEG does not need them;
    :func:`with_component_counts` adds them later, e.g. while the SEG is being sent).

    Raises:
        ValueError: the numbers of slices and instances disagree, the map is not 3D uint8, or
            it has a label beyond ``labels``.
    """
    if label_map.ndim != 3 or label_map.dtype != np.uint8:
        raise ValueError(f"segment_series: label map must be 3D uint8, got {label_map.ndim}D "
                         f"{label_map.dtype}")
    if len(label_map) != len(sop_instance_uids):
        raise ValueError(f"segment_series: {len(label_map)} outputs for "
                         f"{len(sop_instance_uids)} instances")
    if label_map.size and int(label_map.max()) >= len(labels):
        raise ValueError(f"segment_series: outputs have label {int(label_map.max())} but "
                         f"only {len(labels)} labels")
    label_map = clean_label_map(label_map, len(labels), min_component_voxels, connectivity)
    return SeriesSegmentation(
        model=model, labels=tuple(labels), label_map=label_map,
        source_sop_instance_uids=tuple(sop_instance_uids),
        volumes_ml=volumes_ml(label_map, labels, spacing),
        component_counts=component_counts(label_map, labels, connectivity)
        if measure_components else {}, spacing=spacing)


def with_component_counts(result: SeriesSegmentation, connectivity: int = 3
                          ) -> SeriesSegmentation:
    """``result`` with its connected-component counts (a copy; the label map is shared)."""
    return dataclasses.replace(result, component_counts=component_counts(
        result.label_map, result.labels, connectivity))
