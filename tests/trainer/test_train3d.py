"""``mededge train segment3d`` end to end on a tiny synthetic set: it publishes a version whose
ONNX graph has the declared input/output, whose sidecar records the held-out Dice per class,
and which serves: the sliding window through the runtime's scheduler on ONNX Runtime gives back
the Dice the sidecar recorded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from model_factory import served

from edge.cli import main as cli
from edge.core.types import Task
from edge.postprocess.sliding_window import WindowSpec, sliding_window_inference
from edge.repository.sidecar import read_sidecar
from trainer.metrics import dice_iou, overlap_counts
from trainer.train3d import LABELS, load_volumes

PATCH = (8, 32, 32)


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(data, repo) after a one-epoch run on three 64 px studies of 10-12 slices."""
    root = tmp_path_factory.mktemp("train3d")
    data, repo = root / "data", root / "repo"
    assert cli(["synth", "--out", str(data), "--studies", "3", "--seed", "1", "--size", "64",
                "--slices-min", "10", "--slices-max", "12", "--quiet"]) == 0
    assert cli(["train", "segment3d", "--data", str(data), "--repo", str(repo),
                "--model", "lung3d", "--epochs", "1", "--samples-per-epoch", "4",
                "--batch-size", "2", "--size", "32", "--patch", ",".join(map(str, PATCH)),
                "--widths", "4,8", "--work-dir", str(root / "work")]) == 0
    return data, repo


def test_publishes_a_3d_segmenter_with_its_metrics(published: tuple[Path, Path]) -> None:
    _, repo = published
    model_dir = repo / "lung3d"
    assert (model_dir / "config.pbtxt").is_file() and (model_dir / "1" / "model.onnx").is_file()
    sidecar = read_sidecar(model_dir)
    assert sidecar is not None
    assert sidecar.task is Task.SEGMENT and sidecar.labels == LABELS
    assert sidecar.postprocess["dims"] == 3 and sidecar.postprocess["patch"] == list(PATCH)
    metrics = sidecar.versions[1].metrics
    for name in ("dice_lung", "dice_nodule", "dice_mean", "iou_lung", "iou_nodule"):
        assert 0.0 <= metrics[name] <= 1.0, (name, metrics)
    assert metrics["dice_mean"] == pytest.approx((metrics["dice_lung"]
                                                  + metrics["dice_nodule"]) / 2)
    report = sidecar.versions[1].report
    assert report["budget"]["patch"] == list(PATCH) and len(report["history"]) == 1

    session = ort.InferenceSession(str(model_dir / "1" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    (image,), (logits,) = session.get_inputs(), session.get_outputs()
    assert image.name == "image" and image.shape[1:] == [1, *PATCH]
    assert logits.name == "logits" and logits.shape[1:] == [len(LABELS), *PATCH]
    assert not isinstance(image.shape[0], int)  # dynamic batch axis
    x = np.random.default_rng(0).normal(size=(3, 1, *PATCH)).astype(np.float32)
    (out,) = session.run(["logits"], {"image": x})
    assert out.shape == (3, len(LABELS), *PATCH) and np.isfinite(out).all()


def test_served_model_reproduces_the_recorded_dice(published: tuple[Path, Path]) -> None:
    data, repo = published
    sidecar = read_sidecar(repo / "lung3d")
    assert sidecar is not None
    held = [v for v in load_volumes(data, sidecar.preprocess)
            if v["id"] in sidecar.provenance["held_out"]]
    assert held
    model = served(repo, "lung3d")
    try:
        sums = [np.zeros(len(LABELS), np.int64) for _ in range(3)]
        for volume in held:
            scores = sliding_window_inference(volume["image"], model,
                                              WindowSpec(size=PATCH, overlap=0.25))
            for total, count in zip(sums, overlap_counts(scores.argmax(0), volume["mask"],
                                                         len(LABELS)), strict=True):
                total += count
    finally:
        model.close()
    dice, _ = dice_iou(*sums)
    recorded = sidecar.versions[1].metrics
    # torch and ONNX Runtime may round a few near-tied voxels differently
    assert dice[1] == pytest.approx(recorded["dice_lung"], abs=0.01)
    assert dice[2] == pytest.approx(recorded["dice_nodule"], abs=0.01)
