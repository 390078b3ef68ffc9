"""The accuracy gate for detectors: COCO mAP@0.5 of the decoded heads on held-out boxes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from converters.calibration import load_samples
from converters.evaluate import agreement, task_metric
from edge.cli import main as cli
from edge.core.errors import DataError
from edge.core.types import Task
from edge.postprocess.detection import DecodeSpec
from edge.preprocess.imaging import PreprocessSpec
from edge.repository.sidecar import read_sidecar

POSTPROCESS = {"stride": 4, "heatmap_logits": False, "outputs": ["heatmap", "size", "offset"]}


@pytest.fixture(scope="module")
def boxes_set(small_synth: Path):
    return load_samples(small_synth, PreprocessSpec(64, 64), labels=("nodule",),
                        task=Task.DETECT)


def _heads_from_truth(samples) -> dict[str, np.ndarray]:
    from trainer.detect import draw_targets

    targets = draw_targets(samples.detection.data.boxes, 64, 64,
                           DecodeSpec(stride=4, heatmap_logits=False))
    return {k: targets[k] for k in ("heatmap", "size", "offset")}


def test_heads_drawn_from_the_truth_score_one_and_empty_heads_zero(boxes_set) -> None:
    assert sum(len(b) for b in boxes_set.detection.data.boxes) > 0
    perfect = _heads_from_truth(boxes_set)
    name, value = task_metric(Task.DETECT, perfect, boxes_set, ("nodule",), POSTPROCESS)
    assert name == "map_50" and value == pytest.approx(1.0, abs=0.02)
    empty = {k: np.zeros_like(v) for k, v in perfect.items()}
    assert task_metric(Task.DETECT, empty, boxes_set, ("nodule",), POSTPROCESS)[1] == 0.0
    moved = dict(perfect, offset=perfect["offset"] + 6.0)  # every box 24 px off its nodule
    assert task_metric(Task.DETECT, moved, boxes_set, ("nodule",), POSTPROCESS)[1] < 0.2
    diff = agreement(perfect, moved)
    assert np.isnan(diff.top1) and diff.max_abs_diff == pytest.approx(6.0)


def test_limit_keeps_images_and_boxes_together(small_synth: Path, boxes_set) -> None:
    few = load_samples(small_synth, PreprocessSpec(64, 64), labels=("nodule",),
                       task=Task.DETECT, limit=7, seed=3)
    data = few.detection.data
    assert len(few) == len(data) == len(data.boxes) == len(data.image_ids) == 7
    full = boxes_set.detection.data
    for image, image_id in zip(few.images, data.image_ids, strict=True):
        row = full.image_ids.index(image_id)
        np.testing.assert_array_equal(image, boxes_set.images[row])


def test_detection_without_boxes_is_a_clear_error(tmp_path: Path) -> None:
    images = tmp_path / "images.npy"
    np.save(images, np.zeros((2, 1, 64, 64), np.float32))
    samples = load_samples(images, PreprocessSpec(64, 64), task=Task.DETECT)
    with pytest.raises(DataError, match="held-out boxes"):
        task_metric(Task.DETECT, {"heatmap": np.zeros((2, 1, 16, 16))}, samples, ("nodule",))


def test_int8_detector_is_gated_on_map(small_synth: Path, tmp_path: Path) -> None:
    repo = tmp_path / "models"
    assert cli(["train", "detect", "--data", str(small_synth), "--repo", str(repo), "--model",
                "det", "--epochs", "2", "--size", "64", "--samples-per-epoch", "32",
                "--batch-size", "16", "--widths", "8,16,32", "--no-progress"]) == 0
    report = json.loads((tmp_path / "runs" / "det" / "report" / "metrics.json").read_text())
    # held-out boxes without a single box: a clear error, nothing published
    coco = json.loads((small_synth / "labels" / "boxes_coco.json").read_text())
    empty = tmp_path / "no_boxes.json"
    empty.write_text(json.dumps(dict(coco, annotations=[])))
    assert cli(["convert", "--repo", str(repo), "--model", "det", "--to", "int8",
                "--data", str(small_synth), "--eval-split", "val", "--coco", str(empty)]) != 0
    assert sorted(read_sidecar(repo / "det").versions) == [1]
    assert cli(["convert", "--repo", str(repo), "--model", "det", "--to", "int8",
                "--data", str(small_synth), "--eval-split", "val", "--tolerance", "1.0"]) == 0
    sidecar = read_sidecar(repo / "det")
    gate = sidecar.versions[2].report["gate"]
    assert gate["metric"] == "map_50" and gate["passed"]
    # the FP32 reference through ONNX Runtime scores what the trainer measured with torch
    assert gate["reference"] == pytest.approx(report["val"]["map_50"], abs=0.02)
    assert sidecar.versions[2].metrics["map_50"] == gate["candidate"]
