"""Tiny trained models (torch, a few seconds) published into a repository, and held-out data.

- classifier: [N, 1, 32, 32] -> 2 logits; label 1 when a bright blob is in the noise.
- segmenter: [N, 1, 32, 32] -> 3 classes per pixel: background, dark region ("lung"), blob.
Both are trained on generated arrays, so their AUC / Dice are meaningful and high, and exported
with the TorchScript exporter as the trainer does. Held-out data are ``.npz`` files
(``images``, ``labels``, ``masks``), which ``mededge convert --data`` reads.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge.core.types import Task
from edge.preprocess.imaging import PreprocessSpec
from edge.protos import model_config_pb2 as mc
from edge.repository.model_config import ModelConfig
from edge.repository.publish import publish_version
from edge.repository.sidecar import Sidecar

SIZE = 32


def make_data(n: int, seed: int) -> dict[str, np.ndarray]:
    """Images with noise, a dark disc ("lung") and, for half of them, a bright blob."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    images = rng.normal(0.5, 0.08, (n, 1, SIZE, SIZE)).astype(np.float32)
    masks = np.zeros((n, SIZE, SIZE), np.uint8)
    labels = (np.arange(n) % 2).astype(np.int64)
    for i in range(n):
        cy, cx, r = rng.uniform(10, 22), rng.uniform(10, 22), rng.uniform(6, 10)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
        images[i, 0][disc] -= 0.35
        masks[i][disc] = 1
        if labels[i]:
            by, bx = cy + rng.uniform(-3, 3), cx + rng.uniform(-3, 3)
            amp = rng.uniform(0.03, 0.4)
            blob = (yy - by) ** 2 + (xx - bx) ** 2 < rng.uniform(2, 3.5) ** 2
            images[i, 0][blob] += amp
            masks[i][blob] = 2
    return {"images": images, "labels": labels, "masks": masks}


def _train_and_export(task: Task, path: Path, seed: int = 0) -> None:
    import torch
    from torch import nn

    torch.manual_seed(seed)
    torch.set_num_threads(1)
    data = make_data(256, seed + 100)
    x = torch.from_numpy(data["images"])
    if task is Task.CLASSIFY:
        model = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
            nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(16, 2))
        y = torch.from_numpy(data["labels"])
    else:
        model = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 1))
        y = torch.from_numpy(data["masks"].astype(np.int64))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    loss_fn = nn.CrossEntropyLoss()
    for step in range(100):
        idx = torch.randint(0, len(x), (32,), generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        loss_fn(model(x[idx]), y[idx]).backward()
        opt.step()
    model.eval()
    torch.onnx.export(model, (x[:1],), str(path), dynamo=False, opset_version=17,
                      input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})


def publish_model(repo: Path, name: str, task: Task, onnx_path: Path) -> int:
    """Publish ``onnx_path`` as version 1 of ``name`` with a sidecar for ``task``."""
    labels = ("no_blob", "blob") if task is Task.CLASSIFY else ("background", "lung", "blob")
    out_dims = [2] if task is Task.CLASSIFY else [3, SIZE, SIZE]
    config = ModelConfig(name=name, platform="onnxruntime_onnx", max_batch_size=8)
    config.input.add(name="image", data_type=mc.TYPE_FP32, dims=[1, SIZE, SIZE])
    config.output.add(name="logits", data_type=mc.TYPE_FP32, dims=out_dims)
    sidecar = Sidecar(task=task, labels=labels, preprocess=PreprocessSpec(SIZE, SIZE))
    return publish_version(repo, name, {"model.onnx": onnx_path}, config, sidecar)


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """ONNX files of the trained classifier and segmenter, and held-out / calibration .npz."""
    root = tmp_path_factory.mktemp("converters-models")
    out = {"classifier": root / "classifier.onnx", "segmenter": root / "segmenter.onnx"}
    _train_and_export(Task.CLASSIFY, out["classifier"])
    _train_and_export(Task.SEGMENT, out["segmenter"])
    for name, seed in (("heldout", 7), ("calibration", 8)):
        out[name] = root / f"{name}.npz"
        np.savez(out[name], **make_data(96, seed))
    out["constant"] = root / "constant.npy"
    np.save(out["constant"], np.zeros((32, 1, SIZE, SIZE), np.float32))
    return out


@pytest.fixture()
def repo(tmp_path: Path, trained: dict[str, Path]) -> Path:
    """A repository with version 1 of ``classifier`` and ``segmenter``."""
    repo = tmp_path / "repo"
    publish_model(repo, "classifier", Task.CLASSIFY, trained["classifier"])
    publish_model(repo, "segmenter", Task.SEGMENT, trained["segmenter"])
    return repo
