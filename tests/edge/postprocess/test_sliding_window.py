"""Sliding-window inference through the real scheduler: no seams, conv parity, batching."""

from __future__ import annotations

import sys
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/edge: model_factory
from model_factory import served  # noqa: E402

from edge.postprocess.sliding_window import (  # noqa: E402
    WindowSpec,
    batch_sizes,
    importance_map,
    measure_overhead,
    sliding_window_inference,
    sliding_window_outputs,
    tile_origins,
    window_starts,
)
from edge.scheduler.model import ServedModel  # noqa: E402

CONFIG = """
name: "{name}"
backend: "onnxruntime"
max_batch_size: {max_batch}
input [ {{ name: "x" data_type: TYPE_FP32 dims: [ {in_dims} ] }} ]
output [ {{ name: "y" data_type: TYPE_FP32 dims: [ {out_dims} ] }} ]
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
parameters {{ key: "intra_op_thread_count" value: {{ string_value: "1" }} }}
dynamic_batching {{ max_queue_delay_microseconds: 2000 }}
"""


def _conv_model(path: Path, layers: list[tuple[np.ndarray, np.ndarray]]) -> Path:
    """Conv ('same' padding) layers with Relu between them; dynamic batch and spatial axes."""
    first, last = layers[0][0], layers[-1][0]
    spatial = ["d", "h", "w"][-(first.ndim - 2):]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", first.shape[1], *spatial])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", last.shape[0], *spatial])
    nodes, inits, prev = [], [], "x"
    for i, (weight, bias) in enumerate(layers):
        pad = [k // 2 for k in weight.shape[2:]]
        out = "y" if i == len(layers) - 1 else f"c{i}"
        nodes.append(helper.make_node("Conv", [prev, f"w{i}", f"b{i}"], [out], pads=pad + pad))
        inits += [numpy_helper.from_array(weight.astype(np.float32), f"w{i}"),
                  numpy_helper.from_array(bias.astype(np.float32), f"b{i}")]
        if out != "y":
            nodes.append(helper.make_node("Relu", [out], [f"r{i}"]))
            prev = f"r{i}"
    graph = helper.make_graph(nodes, "conv", [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def _serve(repo: Path, name: str, weight: np.ndarray, bias: np.ndarray,
           max_batch: int = 4, more: list[tuple[np.ndarray, np.ndarray]] | None = None
           ) -> ServedModel:
    layers = [(weight, bias)] + (more or [])
    dims = weight.ndim - 2
    _conv_model(repo / name / "1" / "model.onnx", layers)
    (repo / name / "config.pbtxt").write_text(CONFIG.format(
        name=name, max_batch=max_batch, in_dims=", ".join([str(weight.shape[1])] + ["-1"] * dims),
        out_dims=", ".join([str(layers[-1][0].shape[0])] + ["-1"] * dims)))
    return served(repo, name)


def _constant(channels_out: int, channels_in: int, dims: int, values: list[float]
              ) -> tuple[np.ndarray, np.ndarray]:
    return (np.zeros((channels_out, channels_in) + (1,) * dims, np.float32),
            np.asarray(values, np.float32))


def test_window_starts_cover_the_axis_evenly() -> None:
    assert window_starts(512, 256, 0.25) == [0, 128, 256]
    assert window_starts(512, 256, 0.5) == [0, 128, 256]
    assert window_starts(256, 256, 0.5) == [0]
    assert window_starts(300, 256, 0.0) == [0, 44]
    assert window_starts(512, 128, 0.5, stride=4) == [0, 64, 128, 192, 256, 320, 384]
    with pytest.raises(ValueError, match="shorter"):
        window_starts(100, 256, 0.5)
    g = importance_map((64, 64))
    assert g.max() == 1.0 and g.min() > 0 and g[0, 0] < g[32, 32]


@pytest.mark.parametrize("overlap", [0.25, 0.5])
def test_constant_model_2d_has_no_seams(tmp_path: Path, overlap: float) -> None:
    model = _serve(tmp_path, "const2d", *_constant(3, 1, 2, [0.25, -1.5, 7.0]))
    try:
        image = np.random.default_rng(0).normal(size=(1, 512, 512)).astype(np.float32)
        out = sliding_window_inference(image, model, WindowSpec((256, 256), overlap=overlap))
        assert out.shape == (3, 512, 512)
        for c, value in enumerate([0.25, -1.5, 7.0]):
            np.testing.assert_allclose(out[c], value, rtol=1e-6, atol=1e-6)
    finally:
        model.close()


def test_constant_model_3d_and_padding_of_small_inputs(tmp_path: Path) -> None:
    model = _serve(tmp_path, "const3d", *_constant(2, 1, 3, [1.0, 3.0]))
    try:
        volume = np.ones((1, 40, 70, 50), np.float32)  # 50 < 64: padded, then cropped
        out = sliding_window_inference(volume, model, WindowSpec((32, 64, 64), overlap=0.5))
        assert out.shape == (2, 40, 70, 50)
        np.testing.assert_allclose(out[0], 1.0, rtol=1e-6)
        np.testing.assert_allclose(out[1], 3.0, rtol=1e-6)
    finally:
        model.close()


def test_tiled_conv_matches_whole_image_and_batches_through_the_scheduler(
        tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    weight = rng.normal(size=(2, 1, 3, 3)).astype(np.float32)
    bias = rng.normal(size=(2,)).astype(np.float32)
    model = _serve(tmp_path, "conv", weight, bias, max_batch=4)
    try:
        image = rng.normal(size=(1, 512, 512)).astype(np.float32)
        window = WindowSpec((256, 256), overlap=0.5)
        tiled = sliding_window_inference(image, model, window)
        session = ort.InferenceSession(str(tmp_path / "conv" / "1" / "model.onnx"),
                                       providers=["CPUExecutionProvider"])
        whole = session.run(None, {"x": image[None]})[0][0]
        # a pixel within the receptive field (1 pixel) of a window edge sees zero padding in
        # that window; away from every window's edge tiled and whole inference agree
        border = np.zeros((512, 512), bool)
        for y0, x0 in tile_origins((512, 512), window):  # the image's own edges pad alike
            rows = [r for r in (y0, y0 + 255) if r not in (0, 511)]
            cols = [c for c in (x0, x0 + 255) if c not in (0, 511)]
            border[rows, x0:x0 + 256] = True
            border[y0:y0 + 256, cols] = True
        np.testing.assert_allclose(tiled[:, ~border], whole[:, ~border], rtol=1e-5, atol=1e-5)
        assert np.abs(tiled[:, border] - whole[:, border]).max() > 1e-4  # the test can fail
        tiles = len(tile_origins((512, 512), window))
        stats = model.statistics()
        assert stats.inference_count == tiles == 9
        assert stats.execution_count < tiles, "tiles were not batched"
    finally:
        model.close()


def test_one_window_goes_first_then_even_batches_smaller_first() -> None:
    assert batch_sizes(9, 8) == [1, 8]
    assert batch_sizes(9, 4) == [1, 4, 4]
    assert batch_sizes(16, 8) == [1, 7, 8]
    assert batch_sizes(100, 8) == [1] + [7] * 5 + [8] * 8
    assert batch_sizes(3, 1) == [1, 1, 1]
    assert batch_sizes(2, 8) == [1, 1]
    assert batch_sizes(1, 8) == [1] and batch_sizes(0, 8) == []


def _naive_blend(image: np.ndarray, model: Callable[[np.ndarray], np.ndarray],
                 window: WindowSpec) -> np.ndarray:
    """The definition: every window's output times the importance map, summed, divided by the
    summed map, one window at a time (no padding: ``image`` fits whole windows)."""
    s = window.output_stride
    weights = importance_map([w // s for w in window.size], window.blend, window.sigma_scale)
    total = np.zeros([n // s for n in image.shape[1:]], np.float64)
    acc: np.ndarray | None = None
    for origin in tile_origins(image.shape[1:], window):
        cut = tuple(slice(o, o + w) for o, w in zip(origin, window.size, strict=True))
        out = model(image[(slice(None),) + cut][None])[0].astype(np.float64)
        if acc is None:
            acc = np.zeros((out.shape[0],) + total.shape)
        cells = tuple(slice(o // s, o // s + w // s) for o, w in
                      zip(origin, window.size, strict=True))
        acc[(slice(None),) + cells] += out * weights
        total[cells] += weights
    assert acc is not None
    return acc / total


@pytest.mark.parametrize("size, stride, max_batch", [((64, 64), 4, 3), ((32, 48), 1, 8),
                                                     ((16, 16, 16), 2, 5)])
def test_blending_matches_the_definition(size: tuple[int, ...], stride: int,
                                         max_batch: int) -> None:
    rng = np.random.default_rng(3)
    kernel = rng.normal(size=(2, 3) + (stride,) * len(size)).astype(np.float32)
    calls: list[int] = []

    def pooled(batch: np.ndarray) -> np.ndarray:  # a position-dependent, strided model
        calls.append(batch.shape[0])
        b, c = batch.shape[:2]
        shape = [b, c]
        for n in batch.shape[2:]:
            shape += [n // stride, stride]
        blocks = batch.reshape(shape)
        letters = "defg"[:len(size)]
        spec = "bc" + "".join(f"{x}{x.upper()}" for x in letters)
        return np.einsum(f"{spec},oc{''.join(x.upper() for x in letters)}->bo{letters}",
                         blocks, kernel).astype(np.float32)

    def submit(batch: np.ndarray) -> Future[np.ndarray]:
        future: Future[np.ndarray] = Future()
        future.set_result(pooled(batch))
        return future

    spatial = tuple(2 * n + 8 * stride for n in size)
    image = rng.normal(size=(3,) + spatial).astype(np.float32)
    window = WindowSpec(size, overlap=0.3, output_stride=stride, max_batch=max_batch)
    got = sliding_window_inference(image, submit, window)
    assert sum(calls) == len(tile_origins(spatial, window)) and max(calls) <= max_batch
    np.testing.assert_allclose(got, _naive_blend(image, pooled, window), rtol=1e-5, atol=1e-5)


def test_batch_arrays_are_reused_by_the_next_call_once_their_results_are_in() -> None:
    lent: list[np.ndarray] = []

    def submit(batch: np.ndarray) -> Future[np.ndarray]:
        lent.append(batch)
        future: Future[np.ndarray] = Future()
        future.set_result(batch[:, :1, ::4, ::4] * 2.0)  # computed now: the batch is free after
        return future

    window = WindowSpec((64, 64), overlap=0.25, output_stride=4, max_batch=3)
    rng = np.random.default_rng(4)
    first_image, second_image = (rng.normal(size=(2, 160, 160)).astype(np.float32)
                                 for _ in range(2))
    first = sliding_window_inference(first_image, submit, window).copy()
    batches = len(lent)
    second = sliding_window_inference(second_image, submit, window)
    assert {id(a) for a in lent[batches:]} <= {id(a) for a in lent[:batches]}
    np.testing.assert_allclose(first, _naive_blend(first_image, lambda t: t[:, :1, ::4, ::4] * 2.0,
                                                   window), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(second, _naive_blend(second_image,
                                                    lambda t: t[:, :1, ::4, ::4] * 2.0, window),
                               rtol=1e-5, atol=1e-5)


def test_plain_submit_callable_with_output_stride_and_named_outputs() -> None:
    def submit(batch: np.ndarray) -> Future[dict[str, np.ndarray]]:
        future: Future[dict[str, np.ndarray]] = Future()
        pooled = batch.reshape(batch.shape[0], 1, 16, 4, 16, 4).mean(axis=(3, 5))
        future.set_result({"heat": pooled * 0 + 0.5, "size": np.concatenate([pooled] * 2, 1)})
        return future

    image = np.full((1, 130, 100), 2.0, np.float32)
    maps = sliding_window_outputs(image, submit, WindowSpec((64, 64), output_stride=4,
                                                            max_batch=3, pad_mode="edge"))
    assert maps["heat"].shape == (1, 33, 25) and maps["size"].shape == (2, 33, 25)
    np.testing.assert_allclose(maps["heat"], 0.5, rtol=1e-6)
    np.testing.assert_allclose(maps["size"], 2.0, rtol=1e-6)
    with pytest.raises(ValueError, match="name one"):
        sliding_window_inference(image, submit, WindowSpec((64, 64), output_stride=4))


def test_overhead_helper_runs_and_reports(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    hidden = [(rng.normal(size=(16, 16, 3, 3)) / 12, np.zeros(16)) for _ in range(2)]
    model = _serve(tmp_path, "bench", rng.normal(size=(16, 1, 3, 3)), np.zeros(16), max_batch=4,
                   more=[*hidden, (rng.normal(size=(2, 16, 3, 3)) / 12, np.zeros(2))])
    try:
        image = rng.normal(size=(1, 512, 512)).astype(np.float32)
        report = measure_overhead(image, model, WindowSpec((256, 256), overlap=0.5), blocks=2,
                                  per_block=2, pairs=2)
        assert report.tiles == 9 and report.batches == (1, 4, 4)
        assert (report.blocks, report.per_block, report.pairs) == (2, 2, 2)
        assert report.raw_s > 0 and report.sliding_s > 0 and report.raw_median_s >= report.raw_s
        assert report.sliding_median_s >= report.sliding_s
        print(f"sliding-window overhead over raw tile compute: {report.fraction:+.1%} "
              f"(fixed cost {report.fixed_s * 1e3:.1f} ms per call; best "
              f"{report.sliding_s * 1e3:.1f} ms vs {report.raw_s * 1e3:.1f} ms, "
              f"{report.tiles} tiles in {report.batches})")
    finally:
        model.close()
