"""System shared memory (KServe v2 extension) with tritonclient's own shared-memory utilities:
real POSIX objects under /dev/shm, a real server on loopback."""

from __future__ import annotations

import queue
import uuid
from collections.abc import Iterator

import numpy as np
import onnxruntime as ort
import pytest

from edge.api.inference_service import is_local_peer

BATCH = 3


@pytest.fixture(scope="module")
def shm():
    from tritonclient.utils import shared_memory

    return shared_memory


@pytest.fixture()
def regions(shm, client) -> Iterator[dict[str, object]]:
    """Input region (x then k) and output region (y then z) for a batch of the affine model,
    created with tritonclient and registered with the server; removed afterwards."""
    tag = uuid.uuid4().hex[:8]
    nbytes = BATCH * 4 * 4
    made = {}
    for role in ("in", "out"):
        name = f"{role}-{tag}"
        handle = shm.create_shared_memory_region(name, f"/mededge-test-{role}-{tag}", 2 * nbytes)
        client.register_system_shared_memory(name, f"/mededge-test-{role}-{tag}", 2 * nbytes)
        made[role] = (name, handle)
    yield {"in": made["in"], "out": made["out"], "nbytes": nbytes}
    client.unregister_system_shared_memory()
    for _, handle in made.values():
        shm.destroy_shared_memory_region(handle)


def _reference(onnx_models, x: np.ndarray, k: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(onnx_models["affine"].SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    return session.run(["y", "z"], {"x": x, "k": k})


def _data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    return (rng.standard_normal((BATCH, 4)).astype(np.float32),
            rng.integers(-9, 9, (BATCH, 4)).astype(np.int32))


def _inputs_in_shared_memory(grpcclient, shm, regions, x: np.ndarray, k: np.ndarray) -> list:
    """x then k written into the input region; InferInputs that name them there."""
    (in_name, in_handle), nbytes = regions["in"], regions["nbytes"]
    shm.set_shared_memory_region(in_handle, [x, k])
    inputs = [grpcclient.InferInput("x", [BATCH, 4], "FP32"),
              grpcclient.InferInput("k", [BATCH, 4], "INT32")]
    inputs[0].set_shared_memory(in_name, nbytes)
    inputs[1].set_shared_memory(in_name, nbytes, offset=nbytes)
    return inputs


def test_inputs_and_outputs_in_shared_memory_equal_onnxruntime(
        client, grpcclient, shm, regions, onnx_models) -> None:
    x, k = _data()
    (out_name, out_handle), nbytes = regions["out"], regions["nbytes"]
    inputs = _inputs_in_shared_memory(grpcclient, shm, regions, x, k)
    outputs = [grpcclient.InferRequestedOutput("y"), grpcclient.InferRequestedOutput("z")]
    outputs[0].set_shared_memory(out_name, nbytes)
    outputs[1].set_shared_memory(out_name, nbytes, offset=nbytes)

    result = client.infer("affine", inputs, outputs=outputs)

    y, z = _reference(onnx_models, x, k)
    np.testing.assert_array_equal(shm.get_contents_as_numpy(out_handle, np.float32, [BATCH, 4]), y)
    np.testing.assert_array_equal(
        shm.get_contents_as_numpy(out_handle, np.int32, [BATCH, 4], offset=nbytes), z)
    response = result.get_response()
    assert len(response.raw_output_contents) == 0  # nothing travelled in the message
    described = {o.name: o for o in response.outputs}
    assert described["y"].parameters["shared_memory_region"].string_param == out_name
    assert described["z"].parameters["shared_memory_offset"].int64_param == nbytes
    assert list(described["z"].shape) == [BATCH, 4]


def test_mixed_placement_keeps_tritonclient_indexing(
        client, grpcclient, shm, regions, onnx_models) -> None:
    """x from shared memory, k in the message; y to shared memory, z in the answer."""
    x, k = _data()
    (in_name, in_handle), (out_name, out_handle), nbytes = (
        regions["in"], regions["out"], regions["nbytes"])
    shm.set_shared_memory_region(in_handle, [x], offset=8)  # unaligned for FP32: copied once
    inputs = [grpcclient.InferInput("x", [BATCH, 4], "FP32"),
              grpcclient.InferInput("k", [BATCH, 4], "INT32")]
    inputs[0].set_shared_memory(in_name, nbytes, offset=8)
    inputs[1].set_data_from_numpy(k)
    outputs = [grpcclient.InferRequestedOutput("y"), grpcclient.InferRequestedOutput("z")]
    outputs[0].set_shared_memory(out_name, nbytes)

    result = client.infer("affine", inputs, outputs=outputs)

    y, z = _reference(onnx_models, x, k)
    np.testing.assert_array_equal(shm.get_contents_as_numpy(out_handle, np.float32, [BATCH, 4]), y)
    np.testing.assert_array_equal(result.as_numpy("z"), z)


def test_streaming_with_shared_memory(client, grpcclient, shm, regions, onnx_models) -> None:
    x, k = _data()
    (out_name, out_handle), nbytes = regions["out"], regions["nbytes"]
    inputs = _inputs_in_shared_memory(grpcclient, shm, regions, x, k)
    outputs = [grpcclient.InferRequestedOutput("y")]
    outputs[0].set_shared_memory(out_name, nbytes)
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        client.async_stream_infer("affine", inputs, outputs=outputs, request_id="s0")
        result, error = results.get(timeout=30)
    finally:
        client.stop_stream()
    assert error is None
    assert result.get_response().id == "s0"
    np.testing.assert_array_equal(shm.get_contents_as_numpy(out_handle, np.float32, [BATCH, 4]),
                                  _reference(onnx_models, x, k)[0])


def test_status_and_unregister(client, regions) -> None:
    assert "system_shared_memory" in client.get_server_metadata().extensions
    in_name = regions["in"][0]
    status = client.get_system_shared_memory_status(in_name)
    region = status.regions[in_name]
    assert (region.name, region.byte_size) == (in_name, 2 * regions["nbytes"])
    assert region.key == f"/mededge-test-{in_name}"
    everything = client.get_system_shared_memory_status()
    assert {in_name, regions["out"][0]} <= set(everything.regions)
    client.unregister_system_shared_memory(in_name)
    assert in_name not in client.get_system_shared_memory_status().regions


def _code(exc) -> str:
    return exc.value.status()


def test_errors_name_the_region_or_tensor_and_serving_goes_on(
        client, grpcclient, shm, regions, onnx_models) -> None:
    from tritonclient.utils import InferenceServerException

    in_name, nbytes = regions["in"][0], regions["nbytes"]
    with pytest.raises(InferenceServerException) as exc:
        client.register_system_shared_memory("nothing", "/mededge-no-such-key", 64)
    assert _code(exc) == "StatusCode.INVALID_ARGUMENT"
    assert "mededge-no-such-key" in exc.value.message()
    with pytest.raises(InferenceServerException) as exc:
        client.register_system_shared_memory(in_name, "/mededge-no-such-key", 64)
    assert _code(exc) == "StatusCode.ALREADY_EXISTS"
    with pytest.raises(InferenceServerException) as exc:
        client.register_system_shared_memory("escape", "/../etc/passwd", 64)
    assert _code(exc) == "StatusCode.INVALID_ARGUMENT"
    with pytest.raises(InferenceServerException) as exc:
        client.register_system_shared_memory("too-big", regions["in"][1]._shm_key, 10 ** 6)
    assert _code(exc) == "StatusCode.INVALID_ARGUMENT"
    with pytest.raises(InferenceServerException) as exc:
        client.get_system_shared_memory_status("unknown-region")
    assert _code(exc) == "StatusCode.NOT_FOUND"

    def attempt(x_region: str, x_size: int, y_size: int):
        inputs = [grpcclient.InferInput("x", [BATCH, 4], "FP32"),
                  grpcclient.InferInput("k", [BATCH, 4], "INT32")]
        inputs[0].set_shared_memory(x_region, x_size)
        inputs[1].set_data_from_numpy(np.zeros((BATCH, 4), np.int32))
        output = grpcclient.InferRequestedOutput("y")
        output.set_shared_memory(regions["out"][0], y_size)
        with pytest.raises(InferenceServerException) as raised:
            client.infer("affine", inputs, outputs=[output])
        assert _code(raised) == "StatusCode.INVALID_ARGUMENT"
        return raised.value.message()

    assert "'x'" in attempt("unknown-region", nbytes, nbytes)
    assert "'x'" in attempt(in_name, nbytes - 4, nbytes)  # byte size does not match the shape
    assert "'x'" in attempt(in_name, 4 * nbytes, nbytes)  # window past the region's end
    assert "'y'" in attempt(in_name, nbytes, nbytes - 4)  # the output does not fit

    x, k = _data()  # still serving
    inputs = [grpcclient.InferInput("x", [BATCH, 4], "FP32"),
              grpcclient.InferInput("k", [BATCH, 4], "INT32")]
    inputs[0].set_data_from_numpy(x)
    inputs[1].set_data_from_numpy(k)
    np.testing.assert_array_equal(client.infer("affine", inputs).as_numpy("y"),
                                  _reference(onnx_models, x, k)[0])


@pytest.mark.parametrize(("peer", "local"), [
    ("ipv4:127.0.0.1:50312", True), ("ipv6:[::1]:50312", True), ("unix:/run/mededge.sock", True),
    ("ipv4:10.1.2.3:50312", False), ("ipv6:[2001:db8::1]:443", False),
    ("ipv6:[::ffff:127.0.0.1]:9", True)])
def test_only_local_peers_may_register(peer: str, local: bool) -> None:
    assert is_local_peer(peer) is local


def test_switched_off_it_is_refused_and_not_advertised(tmp_path, grpcclient, shm) -> None:
    from tritonclient.utils import InferenceServerException

    from edge.api.server import EdgeServer
    from edge.core.config import load_settings
    from tests.edge.api.conftest import SEG_CONFIG, _save, seg_model

    _save(seg_model(), tmp_path / "repo" / "seg" / "1" / "model.onnx")
    (tmp_path / "repo" / "seg" / "config.pbtxt").write_text(SEG_CONFIG)
    settings = load_settings(None, {
        "server": {"bind": "127.0.0.1", "grpc_port": 0, "http_port": 0,
                   "model_repository": str(tmp_path / "repo"),
                   "data_dir": str(tmp_path / "data")},
        "grpc": {"shared_memory": False},
        "backend": {"providers": ["CPUExecutionProvider"], "intra_op_threads": 1}}, environ={})
    server = EdgeServer(settings)
    server.start()
    key = f"/mededge-test-off-{uuid.uuid4().hex[:8]}"
    handle = shm.create_shared_memory_region("off", key, 256)
    try:
        with grpcclient.InferenceServerClient(f"127.0.0.1:{server.ports.grpc}") as client:
            assert "system_shared_memory" not in client.get_server_metadata().extensions
            with pytest.raises(InferenceServerException) as exc:
                client.register_system_shared_memory("off", key, 256)
            assert _code(exc) == "StatusCode.INVALID_ARGUMENT"
            assert "grpc.shared_memory" in exc.value.message()
            image = grpcclient.InferInput("image", [1, 1, 8, 8], "FP32")
            image.set_shared_memory("off", 256)
            with pytest.raises(InferenceServerException) as exc:
                client.infer("seg", [image])
            assert _code(exc) == "StatusCode.INVALID_ARGUMENT"
    finally:
        shm.destroy_shared_memory_region(handle)
        server.stop(5.0)
