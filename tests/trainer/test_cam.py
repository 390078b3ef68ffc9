"""The classifier's class-activation map, computed in the exported graph: the ``cam`` output has
the input's size, lies in [0, 1] and, for a classifier trained on a clear case, peaks on the
blob it found."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from trainer.cam import OUTPUT_NAMES, ClassifierWithCam
from trainer.export_heads import check_parity_multi, export_multi
from trainer.models import ModelSpec, build_model

SIZE = 64


def _blobs(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Noise images, half with a bright disk (r = 4 px); their masks and disk centres."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    images = rng.normal(0, 0.1, (n, 1, SIZE, SIZE)).astype(np.float32)
    masks = np.zeros((n, SIZE, SIZE), np.float32)
    centres = rng.integers(10, SIZE - 10, (n, 2))
    for i in range(0, n, 2):
        disk = (yy - centres[i, 0]) ** 2 + (xx - centres[i, 1]) ** 2 <= 16
        images[i, 0][disk] += 1.0
        masks[i][disk] = 1.0
    return images, masks, centres


def _trained_classifier() -> torch.nn.Module:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = build_model(ModelSpec(task="classify", num_classes=2, widths=(8, 16)))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(40):
        x, m, _ = _blobs(8, rng)
        logits, dense = model(torch.from_numpy(x))
        target = torch.nn.functional.adaptive_max_pool2d(torch.from_numpy(m)[:, None],
                                                         dense.shape[-2:])
        loss = torch.nn.functional.binary_cross_entropy_with_logits(dense, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_cam_is_exported_normalised_and_peaks_on_the_blob(tmp_path: Path) -> None:
    wrapped = ClassifierWithCam(_trained_classifier()).eval()
    x, _, centres = _blobs(8, np.random.default_rng(1))
    path = export_multi(wrapped, x, tmp_path, OUTPUT_NAMES)
    check_parity_multi(path, wrapped, x, OUTPUT_NAMES)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == ["logits", "cam"]
    logits, cam = sess.run(list(OUTPUT_NAMES), {"image": x})
    assert logits.shape == (8, 2) and cam.shape == (8, 1, SIZE, SIZE)
    assert float(cam.min()) >= 0.0 and float(cam.max()) <= 1.0
    with torch.no_grad():
        plain = wrapped.classifier(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(logits, plain, atol=1e-5)  # the CAM leaves the logits alone
    for i in range(0, 8, 2):  # images with a blob
        assert cam[i].max() > 0.5 and cam[i].std() > 0.05  # bilinear: peak between cells
        peak = np.unravel_index(int(np.argmax(cam[i, 0])), cam[i, 0].shape)
        assert np.hypot(peak[0] - centres[i, 0], peak[1] - centres[i, 1]) <= 8, (peak,
                                                                                centres[i])
