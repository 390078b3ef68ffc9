"""ModelInfer and ModelStreamInfer give what a direct ONNX Runtime run gives."""

from __future__ import annotations

import queue
import threading
import time

import grpc
import numpy as np
import onnxruntime as ort
import pytest


def _session(model) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _affine_inputs(grpcclient, x: np.ndarray, k: np.ndarray) -> list:
    inputs = [grpcclient.InferInput("x", list(x.shape), "FP32"),
              grpcclient.InferInput("k", list(k.shape), "INT32")]
    inputs[0].set_data_from_numpy(x)
    inputs[1].set_data_from_numpy(k)
    return inputs


def test_raw_inference_equals_onnxruntime(client, grpcclient, onnx_models) -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 4)).astype(np.float32)
    k = rng.integers(-5, 5, (3, 4)).astype(np.int32)
    result = client.infer("affine", _affine_inputs(grpcclient, x, k), request_id="r1")
    y, z = _session(onnx_models["affine"]).run(["y", "z"], {"x": x, "k": k})
    np.testing.assert_array_equal(result.as_numpy("y"), y)
    np.testing.assert_array_equal(result.as_numpy("z"), z)
    response = result.get_response()
    assert response.id == "r1"
    assert response.model_version == "1"
    assert len(response.raw_output_contents) == 2


def test_requested_outputs_only(client, grpcclient) -> None:
    x = np.ones((1, 4), np.float32)
    k = np.ones((1, 4), np.int32)
    result = client.infer("affine", _affine_inputs(grpcclient, x, k),
                          outputs=[grpcclient.InferRequestedOutput("z")])
    assert [o.name for o in result.get_response().outputs] == ["z"]
    np.testing.assert_array_equal(result.as_numpy("z"), -k)


def test_typed_contents_equal_onnxruntime(grpcclient, grpc_url, onnx_models) -> None:
    pb = grpcclient.service_pb2
    x = np.arange(8, dtype=np.float32).reshape(2, 4) / 3
    k = np.arange(8, dtype=np.int32).reshape(2, 4) - 4
    request = pb.ModelInferRequest(model_name="affine")
    tx = request.inputs.add(name="x", datatype="FP32", shape=[2, 4])
    tx.contents.fp32_contents.extend(x.ravel().tolist())
    tk = request.inputs.add(name="k", datatype="INT32", shape=[2, 4])
    tk.contents.int_contents.extend(k.ravel().tolist())
    with grpc.insecure_channel(grpc_url) as channel:
        stub = grpcclient.service_pb2_grpc.GRPCInferenceServiceStub(channel)
        response = stub.ModelInfer(request)
    y, z = _session(onnx_models["affine"]).run(["y", "z"], {"x": x, "k": k})
    pairs = zip(response.outputs, response.raw_output_contents, strict=True)
    got = {o.name: (o, raw) for o, raw in pairs}
    out_y, raw_y = got["y"]
    assert (out_y.datatype, list(out_y.shape)) == ("FP32", [2, 4])
    np.testing.assert_array_equal(np.frombuffer(raw_y, np.float32).reshape(2, 4), y)
    np.testing.assert_array_equal(np.frombuffer(got["z"][1], np.int32).reshape(2, 4), z)


def test_streaming_inference_in_order_with_errors_in_band(client, grpcclient) -> None:
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        images = [np.full((1, 1, 8, 8), i, np.float32) for i in range(4)]
        for i, image in enumerate(images):
            inp = grpcclient.InferInput("image", [1, 1, 8, 8], "FP32")
            inp.set_data_from_numpy(image)
            client.async_stream_infer("seg", [inp], request_id=f"s{i}")
        bad = grpcclient.InferInput("picture", [1, 1, 8, 8], "FP32")
        bad.set_data_from_numpy(images[0])
        client.async_stream_infer("seg", [bad], request_id="bad")
        got = [results.get(timeout=10) for _ in range(5)]
    finally:
        client.stop_stream()
    for i, (result, error) in enumerate(got[:4]):
        assert error is None
        assert result.get_response().id == f"s{i}"
        expected = 1 / (1 + np.exp(-images[i]))
        np.testing.assert_allclose(result.as_numpy("mask"), expected, rtol=1e-6)
    result, error = got[4]
    assert error is not None and "picture" in error.message()


def test_stream_keeps_order_once_a_request_waits(client, grpcclient, grpc_url,
                                                 onnx_models) -> None:
    """A stream request that has to queue (``slow`` is busy with another client's call) is
    followed by requests to an idle model: those run while it waits, yet every answer comes
    back in request order, each with its own result."""
    busy: list = []

    def occupy() -> None:
        with grpcclient.InferenceServerClient(grpc_url) as other:
            x = grpcclient.InferInput("x", [1, 1], "FP32")
            x.set_data_from_numpy(np.ones((1, 1), np.float32))
            busy.append(other.infer("slow", [x]))

    thread = threading.Thread(target=occupy)
    thread.start()
    time.sleep(0.05)
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        x = grpcclient.InferInput("x", [1, 1], "FP32")
        x.set_data_from_numpy(np.full((1, 1), 2, np.float32))
        client.async_stream_infer("slow", [x], request_id="waits")
        images = [np.full((1, 1, 8, 8), i, np.float32) for i in range(2)]
        for i, image in enumerate(images):
            inp = grpcclient.InferInput("image", [1, 1, 8, 8], "FP32")
            inp.set_data_from_numpy(image)
            client.async_stream_infer("seg", [inp], request_id=f"s{i}")
        got = [results.get(timeout=30) for _ in range(3)]
    finally:
        client.stop_stream()
        thread.join(30)
    assert [error for _, error in got] == [None] * 3
    assert [result.get_response().id for result, _ in got] == ["waits", "s0", "s1"]
    (expected,) = _session(onnx_models["slow"]).run(None, {"x": np.full((1, 1), 2, np.float32)})
    np.testing.assert_allclose(got[0][0].as_numpy("y"), expected, rtol=1e-5)
    for (result, _), image in zip(got[1:], images, strict=True):
        np.testing.assert_allclose(result.as_numpy("mask"), 1 / (1 + np.exp(-image)), rtol=1e-6)
    assert len(busy) == 1 and not isinstance(busy[0], Exception)


@pytest.mark.parametrize("batch", [1, 4])
def test_seg_batches(client, grpcclient, onnx_models, batch: int) -> None:
    image = np.random.default_rng(batch).standard_normal((batch, 1, 8, 8)).astype(np.float32)
    inp = grpcclient.InferInput("image", list(image.shape), "FP32")
    inp.set_data_from_numpy(image)
    mask = client.infer("seg", [inp]).as_numpy("mask")
    (expected,) = _session(onnx_models["seg"]).run(None, {"image": image})
    np.testing.assert_allclose(mask, expected, rtol=1e-6)
