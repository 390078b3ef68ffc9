"""The detector: targets invert the serving decoder, a tiny real training run publishes raw heads
(``heatmap``, ``size``, ``offset``) with parity, a DecodeSpec sidecar and metrics by name."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from edge.cli import main as cli
from edge.core.types import Task
from edge.postprocess.detection import DecodeSpec, decode_heads, detect_slices
from edge.repository.model_config import read_model_config
from edge.repository.sidecar import read_sidecar
from trainer.datasets import load_synthetic
from trainer.detect import crop_batch, draw_targets, focal_loss
from trainer.heldout import main as heldout
from trainer.models_detect import DetectorSpec, build_detector


def test_targets_decode_back_to_the_boxes() -> None:
    spec = DecodeSpec(stride=4)
    boxes = np.array([[10.0, 12.0, 22.0, 20.0], [40.5, 30.0, 47.0, 41.0]], np.float32)
    t = draw_targets([boxes], 64, 64, spec)
    assert t["heatmap"].shape == (1, 1, 16, 16) and t["mask"].sum() == 2
    logits = np.where(t["heatmap"] == 1, 5.0, -5.0).astype(np.float32)
    (found,) = decode_heads(logits, t["size"], t["offset"], ("nodule",), {"nodule": 0.5}, spec)
    got = sorted([b.x0, b.y0, b.x1, b.y1] for b in found)
    np.testing.assert_allclose(got, sorted(boxes.tolist()), atol=1e-4)


def test_focal_loss_prefers_the_target() -> None:
    target = torch.zeros(1, 1, 8, 8)
    target[0, 0, 4, 4] = 1.0
    good = torch.where(target == 1, 4.0, -4.0)
    assert focal_loss(good, target) < focal_loss(torch.zeros_like(target), target)


def test_detector_heads_have_stride_4() -> None:
    model = build_detector(DetectorSpec(widths=(8, 16, 32), head_width=8)).eval()
    with torch.no_grad():
        heat, size, offset = model(torch.zeros(2, 1, 64, 64))
    assert heat.shape == (2, 1, 16, 16) and size.shape == offset.shape == (2, 2, 16, 16)
    assert float(offset.min()) >= 0 and float(offset.max()) <= 1


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "data"
    assert cli(["synth", "--out", str(out), "--studies", "4", "--seed", "1", "--size", "64",
                "--slices-min", "8", "--slices-max", "10", "--quiet"]) == 0
    return out


def test_train_detect_publishes_raw_heads(synth: Path, tmp_path: Path) -> None:
    repo = tmp_path / "models"
    assert cli(["train", "detect", "--data", str(synth), "--repo", str(repo), "--model", "det",
                "--epochs", "1", "--size", "64", "--samples-per-epoch", "32", "--batch-size",
                "16", "--widths", "8,16,32", "--no-progress"]) == 0
    config = read_model_config(repo / "det")
    assert [o.name for o in config.output] == ["heatmap", "size", "offset"]
    assert [list(o.dims) for o in config.output] == [[1, 16, 16], [2, 16, 16], [2, 16, 16]]
    sidecar = read_sidecar(repo / "det")
    assert sidecar is not None and sidecar.task is Task.DETECT
    assert sidecar.labels == ("nodule",) and "nodule" in sidecar.thresholds
    post = sidecar.postprocess
    assert post["stride"] == 4 and post["size_encoding"] == "log" and post["heatmap_logits"]
    assert {"map_50", "map_50_95", "map_50_6mm", "froc_cpm"} <= set(sidecar.versions[1].metrics)
    # ONNX Runtime on real slices = torch; the heads decode with the sidecar's settings.
    spec = sidecar.preprocess  # a 2.5D model's slices stacked as the trainer and serving do
    slices = load_synthetic(synth, spec.single_slice(), progress=False).with_context(
        spec.context_slices, spec.context_spacing_mm).images[:4]
    sess = ort.InferenceSession(str(repo / "det" / "1" / "model.onnx"),
                                providers=["CPUExecutionProvider"])
    heads = dict(zip(("heatmap", "size", "offset"),
                     sess.run(["heatmap", "size", "offset"], {"image": slices}), strict=True))
    state = torch.load(repo.parent / "runs" / "det" / "best.pt", weights_only=False)
    model = build_detector(DetectorSpec(widths=(8, 16, 32), layers=(1, 1, 1),
                                        in_channels=spec.channels))
    model.load_state_dict(state["state_dict"])
    with torch.no_grad():
        want = model.eval()(torch.from_numpy(slices))
    for got, ref in zip(heads.values(), want, strict=True):
        np.testing.assert_allclose(got, ref.numpy(), atol=1e-4, rtol=1e-4)
    spec = DecodeSpec(**{k: post[k] for k in ("stride", "size_encoding", "heatmap_logits",
                                              "top_k", "nms_iou", "peak_kernel")})
    found = detect_slices([f"s{i}" for i in range(4)], heads, sidecar.labels, [(64, 64)] * 4,
                          sidecar.preprocess, {"default": 0.0}, spec)
    assert len(found) == 4 and all(len(s.boxes) <= spec.top_k for s in found)
    report = json.loads((repo.parent / "runs" / "det" / "report" / "metrics.json").read_text())
    assert report["evaluated_on"] in ("test", "val") and "history" in report


def test_windows_off_the_boxes_can_be_centred_on_the_lung() -> None:
    rng = np.random.default_rng(0)
    images = np.zeros((64, 1, 64, 64), np.float32)
    lung = np.zeros((64, 64, 64), bool)
    lung[:, 40:48, 40:48] = True
    out, boxes = crop_batch(images, [np.zeros((0, 4), np.float32)] * 64, 16, rng, 4,
                            lung=lung, lung_share=1.0)
    assert out.shape == (64, 1, 16, 16) and all(len(b) == 0 for b in boxes)
    marked = images.copy()
    marked[:, :, 40:48, 40:48] = 1.0
    out, _ = crop_batch(marked, [np.zeros((0, 4), np.float32)] * 64, 16,
                        np.random.default_rng(0), 4, lung=lung, lung_share=1.0)
    assert (out.reshape(64, -1).max(axis=1) == 1.0).all()  # every window holds lung


def test_train_detect_keeps_the_weights_average(synth: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """--ema-decay: the averaged weights are validated and kept (best.pt, the export); last.pt
    holds the raw and the averaged weights of the last step; both score alone with
    ``python -m trainer.heldout``."""
    work = tmp_path / "run"
    assert cli(["train", "detect", "--data", str(synth), "--repo", str(tmp_path / "models"),
                "--model", "det", "--work-dir", str(work), "--epochs", "1", "--size", "64",
                "--samples-per-epoch", "32", "--batch-size", "16", "--widths", "8,16,32",
                "--ema-decay", "0.9", "--no-progress"]) == 0
    best = torch.load(work / "best.pt", weights_only=False)
    last = torch.load(work / "last.pt", weights_only=False)
    for key, value in best["state_dict"].items():
        assert torch.equal(value, last["ema_state_dict"][key]), key
    assert any(not torch.equal(v, last["state_dict"][k])
               for k, v in best["state_dict"].items() if v.is_floating_point())
    capsys.readouterr()
    assert heldout(["detect", "--data", str(synth), str(work / "best.pt"),
                    f"{work / 'last.pt'}:ema_state_dict"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 2 and rows[0]["scans"] == 4 and rows[0]["nodules"] >= 1
    for key in rows[0].keys() - {"checkpoint"}:  # the same weights (str: NaN != NaN)
        assert str(rows[0][key]) == str(rows[1][key]), key
