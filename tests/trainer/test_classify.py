"""The nodule-in-slice classifier's pieces: the visible-nodule label rule, cross-section sizes,
crop sampling, the FPN-lite evidence head and its ONNX export signature."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from edge.preprocess.imaging import PreprocessSpec
from trainer.classify import ClassifyHooks, crop_origins, sigmoid_focal_loss
from trainer.datasets import IGNORED_LABEL, load_synthetic, visible_nodule_labels
from trainer.datasets.synthetic import largest_cross_section_mm
from trainer.export import export_onnx
from trainer.models import ModelSpec, build_model


@pytest.fixture()
def synth(small_synth: Path) -> Path:
    return small_synth  # tests/conftest.py: made once per session, only read here


def test_visible_rule_positive_negative_ignored() -> None:
    labels = np.array([0, 1, 1, 1, 1, 0])
    mm = np.array([0.0, 5.0, 3.0, 1.5, np.nan, 0.0], np.float32)
    got = visible_nodule_labels(labels, mm, 3.0)
    assert got.tolist() == [0, 1, 1, IGNORED_LABEL, 1, 0]  # NaN: the given label stands
    assert visible_nodule_labels(labels, mm, 0.0).tolist() == labels.tolist()
    assert visible_nodule_labels(labels, None, 3.0).tolist() == labels.tolist()


def test_largest_cross_section_is_the_equivalent_circle_of_the_biggest_region() -> None:
    mask = np.zeros((40, 40), bool)
    mask[2:12, 2:12] = True  # 100 px
    mask[30:32, 30:32] = True  # 4 px, a second (smaller) region
    assert largest_cross_section_mm(mask, (0.5, 0.5)) == pytest.approx(
        2 * np.sqrt(100 * 0.25 / np.pi))
    assert largest_cross_section_mm(np.zeros((5, 5), bool), (1.0, 1.0)) == 0.0


def test_synthetic_loader_measures_every_nodule_slice(synth: Path) -> None:
    spec = PreprocessSpec(height=32, width=32, window_center=-600, window_width=1500)
    data = load_synthetic(synth, spec, progress=False, use_cache=False)
    assert data.nodule_mm is not None and data.nodule_mm.shape == data.labels.shape
    assert ((data.nodule_mm > 0) == (data.labels == 1)).all()
    cached = load_synthetic(synth, spec, progress=False)  # written, then read back
    again = load_synthetic(synth, spec, progress=False)
    assert cached.nodule_mm is not None and again.nodule_mm is not None
    np.testing.assert_array_equal(again.nodule_mm, data.nodule_mm)
    assert json.loads((synth / "manifest.json").read_text())["studies"]


def test_crops_stay_inside_and_positive_crops_hold_the_nodule() -> None:
    rng = np.random.default_rng(0)
    masks = np.zeros((3, 64, 64), np.uint8)
    masks[:, 10:50, 10:50] = 1
    masks[0, 60:63, 1:4] = 2  # nodule in a corner
    corners = crop_origins(masks, np.array([1, 0, 0]), 32, rng)
    assert ((corners >= 0) & (corners <= 32)).all()
    y, x = corners[0]
    assert (masks[0, y:y + 32, x:x + 32] == 2).any()


def test_border_negatives_are_drawn_just_outside_the_lung() -> None:
    rng = np.random.default_rng(0)
    masks = np.zeros((300, 64, 64), np.uint8)
    masks[:, 16:48, 16:48] = 1  # lung; background everywhere else
    corners = crop_origins(masks, np.zeros(300, np.int64), 16, rng, negatives="lung-border")
    centres = corners + 8
    inside = (centres >= 16) & (centres < 48)
    ring = ((centres >= 16 - 8) & (centres < 48 + 8)).all(axis=1) & ~inside.all(axis=1)
    assert 0.2 < ring.mean() < 0.6  # about a third in the band, plus chance from "anywhere"
    with pytest.raises(ValueError, match="negatives"):
        crop_origins(masks, np.zeros(300, np.int64), 16, rng, negatives="mediastinum")


def test_context_model_takes_2k_plus_1_channels(tmp_path: Path) -> None:
    model = build_model(ModelSpec("classify", 2, widths=(8, 16, 32), head_stride=4,
                                  in_channels=5)).eval()
    x = torch.randn(2, 5, 64, 64)
    files = export_onnx(model, x.numpy(), tmp_path)
    sess = ort.InferenceSession(str(files["model.onnx"]), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].shape[1] == 5
    with torch.no_grad():
        np.testing.assert_allclose(sess.run(["logits"], {"image": x.numpy()})[0],
                                   model(x).numpy(), atol=1e-4)
    assert ModelSpec.from_dict(ModelSpec("classify", 2, in_channels=5).to_dict()).in_channels == 5


def test_hooks_never_sample_ignored_slices_and_crop_batches(synth: Path) -> None:
    spec = PreprocessSpec(height=64, width=64, window_center=-600, window_width=1500)
    data = load_synthetic(synth, spec, progress=False)
    hooks = ClassifyHooks(min_visible_mm=1e9, crop=32)  # every nodule slice is "a cap"
    w = hooks.sample_weights(data)
    assert (w[data.labels == 1] == 0).all() and (w[data.labels == 0] > 0).all()
    hooks = ClassifyHooks(min_visible_mm=0.0, crop=32)
    idx = np.arange(len(data))
    x, y, m = hooks.make_batch(data, idx, np.random.default_rng(1))
    assert x.shape[-2:] == (32, 32) and m is not None and m.shape[-2:] == (32, 32)
    assert y is not None and (y.numpy() == (m.numpy() == 2).any(axis=(1, 2))).all()


def test_focal_loss_is_small_for_confident_right_answers() -> None:
    target = torch.zeros(1, 1, 8, 8)
    target[0, 0, 3, 3] = 1
    good = torch.where(target > 0, 6.0, -6.0)
    assert float(sigmoid_focal_loss(good, target)) < 1e-3 < float(
        sigmoid_focal_loss(-good, target))


@pytest.mark.parametrize("head_stride,side", [(4, 16), (8, 8), (0, 4)])
def test_evidence_map_stride_and_onnx_signature(head_stride: int, side: int,
                                                 tmp_path: Path) -> None:
    model = build_model(ModelSpec("classify", 2, widths=(8, 16, 32), head_stride=head_stride))
    x = torch.randn(2, 1, 64, 64)
    logits, dense = model.train()(x)
    assert logits.shape == (2, 2) and dense.shape == (2, 1, side, side)
    model.eval()
    files = export_onnx(model, x.numpy(), tmp_path)
    sess = ort.InferenceSession(str(files["model.onnx"]),
                                providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["image"]
    assert [o.name for o in sess.get_outputs()] == ["logits"]
    with torch.no_grad():
        want = model(x).numpy()
    np.testing.assert_allclose(sess.run(["logits"], {"image": x.numpy()})[0], want, atol=1e-4)


def test_head_stride_must_be_a_stage_stride() -> None:
    with pytest.raises(ValueError, match="head_stride"):
        build_model(ModelSpec("classify", 2, widths=(8, 16), head_stride=16))


def test_lung_gate_lowers_the_evidence_outside_the_lung(tmp_path: Path) -> None:
    from trainer.cam import ClassifierWithCam

    torch.manual_seed(0)
    model = build_model(ModelSpec("classify", 2, widths=(8, 16, 32), head_stride=4,
                                  in_channels=3, lung_gate=True))
    x = torch.randn(2, 3, 64, 64)
    logits, evidence, lung = model.train()(x)
    assert logits.shape == (2, 2) and evidence.shape == lung.shape == (2, 1, 16, 16)
    mask = torch.zeros(2, 64, 64, dtype=torch.uint8)
    mask[:, 8:40, 8:40] = 1
    mask[0, 20:24, 20:24] = 2
    loss = ClassifyHooks().loss((logits, evidence, lung), torch.tensor([1, 0]), mask)
    assert torch.isfinite(loss)
    model.eval()
    with torch.no_grad():
        gated = model.dense(x)
        raw, lung = model.maps(x)
        assert bool((gated <= raw).all())  # the gate only ever lowers the evidence
        np.testing.assert_allclose(model(x)[:, 1].numpy(), gated.amax(dim=(2, 3))[:, 0].numpy())
        assert ClassifierWithCam(model)(x)[1].shape == (2, 1, 64, 64)
    files = export_onnx(model, x.numpy(), tmp_path)
    sess = ort.InferenceSession(str(files["model.onnx"]), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        np.testing.assert_allclose(sess.run(["logits"], {"image": x.numpy()})[0],
                                   model(x).numpy(), atol=1e-4)


def test_flip_views_are_averaged_inside_the_exported_graph(tmp_path: Path) -> None:
    torch.manual_seed(0)
    spec = ModelSpec("classify", 2, widths=(8, 16, 32), head_stride=4, in_channels=3)
    plain = build_model(spec).eval()
    model = build_model(ModelSpec.from_dict({**spec.to_dict(), "flip_views": ["h", "v", "hv"]}))
    model.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        train_out = model.train()(x)[0]
        np.testing.assert_allclose(train_out.numpy(), plain.train()(x)[0].numpy())  # one view
        model.eval()
        plain.eval()
        want = sum(plain.dense(x.flip(d)).flip(d) for d in ((), (3,), (2,), (2, 3))) / 4
        np.testing.assert_allclose(model.dense(x).numpy(), want.numpy(), atol=1e-5)
        # the four views are a group: flipping the input leaves the answer unchanged
        np.testing.assert_allclose(model(x.flip(3)).numpy(), model(x).numpy(), atol=1e-5)
    files = export_onnx(model, x.numpy(), tmp_path)
    sess = ort.InferenceSession(str(files["model.onnx"]), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        np.testing.assert_allclose(sess.run(["logits"], {"image": x.numpy()})[0],
                                   model(x).numpy(), atol=1e-4)


def test_unknown_flip_view_is_refused() -> None:
    with pytest.raises(ValueError, match="flip"):
        build_model(ModelSpec("classify", 2, widths=(8, 16), head_stride=4, flip_views=("d",)))


def test_small_cross_sections_are_drawn_more_often_and_classes_stay_balanced() -> None:
    from dataclasses import replace

    from trainer.datasets import SliceSet

    n = 6
    data = SliceSet(images=np.zeros((n, 1, 8, 8), np.float32),
                    labels=np.array([0, 0, 0, 1, 1, 1]), masks=None,
                    groups=np.array(["a"] * n, object), splits=np.array(["train"] * n, object),
                    sources=np.array([str(i) for i in range(n)], object), fingerprint="x",
                    nodule_mm=np.array([0, 0, 0, 4.0, 10.0, 20.0], np.float32))
    w = ClassifyHooks(small_mm=8.0, small_weight=3.0).sample_weights(data)
    assert w[:3].sum() == pytest.approx(w[3:].sum())  # the classes stay balanced
    assert w[3] == pytest.approx(3 * w[4]) and w[4] == pytest.approx(w[5])
    even = ClassifyHooks().sample_weights(replace(data, nodule_mm=None))
    assert even[3] == pytest.approx(even[4])


def test_through_plane_view_reverses_the_context_inside_the_graph() -> None:
    torch.manual_seed(0)
    spec = ModelSpec("classify", 2, widths=(8, 16, 32), head_stride=4, in_channels=5)
    plain = build_model(spec).eval()
    views = ("h", "v", "hv", "z", "hz", "vz", "hvz")
    model = build_model(ModelSpec.from_dict({**spec.to_dict(), "flip_views": list(views)}))
    model.load_state_dict(plain.state_dict())
    model.eval()
    x = torch.randn(2, 5, 64, 64)
    with torch.no_grad():
        dims = ((), (3,), (2,), (2, 3), (1,), (1, 3), (1, 2), (1, 2, 3))
        want = sum(plain.dense(x.flip(d)).flip(d) for d in dims) / 8
        np.testing.assert_allclose(model.dense(x).numpy(), want.numpy(), atol=1e-5)
        # the eight views are a group: reversing the context leaves the answer unchanged
        np.testing.assert_allclose(model(x.flip(1)).numpy(), model(x).numpy(), atol=1e-5)
