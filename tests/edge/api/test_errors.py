"""Every error reaches the client as the status code the contract names."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest


def _status(exc) -> str:
    return exc.status()


def _x(grpcclient, name: str = "x", shape=(1, 4), datatype: str = "FP32",
       dtype=np.float32) -> object:
    inp = grpcclient.InferInput(name, list(shape), datatype)
    inp.set_data_from_numpy(np.ones(shape, dtype))
    return inp


def _k(grpcclient) -> object:
    return _x(grpcclient, "k", (1, 4), "INT32", np.int32)


def _expect(grpcclient, code: str, call, *words: str) -> None:
    with pytest.raises(grpcclient.InferenceServerException) as err:
        call()
    assert err.value.status() == f"StatusCode.{code}", err.value.message()
    for word in words:
        assert word in err.value.message()


def test_unknown_model_is_not_found(client, grpcclient) -> None:
    _expect(grpcclient, "NOT_FOUND", lambda: client.infer("nope", [_x(grpcclient)]), "nope")


def test_unknown_version_is_not_found(client, grpcclient) -> None:
    _expect(grpcclient, "NOT_FOUND",
            lambda: client.infer("affine", [_x(grpcclient), _k(grpcclient)], model_version="9"))


def test_wrong_input_name_names_the_input(client, grpcclient) -> None:
    _expect(grpcclient, "INVALID_ARGUMENT",
            lambda: client.infer("affine", [_x(grpcclient, "q"), _k(grpcclient)]), "q")


def test_wrong_shape_names_the_input(client, grpcclient) -> None:
    _expect(grpcclient, "INVALID_ARGUMENT",
            lambda: client.infer("affine", [_x(grpcclient, shape=(1, 5)), _k(grpcclient)]), "x")


def test_wrong_dtype_names_the_input(client, grpcclient) -> None:
    _expect(grpcclient, "INVALID_ARGUMENT",
            lambda: client.infer("affine", [_x(grpcclient, datatype="FP64", dtype=np.float64),
                                            _k(grpcclient)]), "x")


def test_raw_byte_size_mismatch_names_the_input(grpcclient, grpc_url) -> None:
    pb = grpcclient.service_pb2
    request = pb.ModelInferRequest(model_name="affine")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    request.inputs.add(name="k", datatype="INT32", shape=[1, 4])
    request.raw_input_contents.extend([b"\0" * 12, b"\0" * 16])
    with grpc.insecure_channel(grpc_url) as channel:
        stub = grpcclient.service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(request)
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "'x'" in err.value.details() and "12 bytes" in err.value.details()


def test_unknown_output_is_invalid_argument(client, grpcclient) -> None:
    _expect(grpcclient, "INVALID_ARGUMENT",
            lambda: client.infer("affine", [_x(grpcclient), _k(grpcclient)],
                                 outputs=[grpcclient.InferRequestedOutput("w")]), "w")


@pytest.fixture()
def slow_idle(server) -> None:
    """Wait until the ``slow`` model neither executes nor queues anything: a request of an
    earlier test whose client gave up may still run (it was taken before its deadline), and
    its queue holds one request."""
    model = server.manager.get("slow")
    end = time.monotonic() + 10
    while (model.executing_count or model.pending_count) and time.monotonic() < end:
        time.sleep(0.01)


def _slow_in_background(grpcclient, grpc_url: str, results: list) -> threading.Thread:
    def run() -> None:
        with grpcclient.InferenceServerClient(grpc_url) as c:
            try:
                results.append(c.infer("slow", [_x(grpcclient, shape=(1, 1))]))
            except grpcclient.InferenceServerException as exc:
                results.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_full_queue_is_resource_exhausted(slow_idle, grpcclient, grpc_url) -> None:
    results: list = []
    threads = [_slow_in_background(grpcclient, grpc_url, results) for _ in range(6)]
    for thread in threads:
        thread.join(30)
    codes = [r.status() if isinstance(r, Exception) else "OK" for r in results]
    assert "StatusCode.RESOURCE_EXHAUSTED" in codes, codes
    assert "OK" in codes, codes


def test_client_deadline_is_deadline_exceeded(slow_idle, client, grpcclient, grpc_url) -> None:
    busy: list = []
    thread = _slow_in_background(grpcclient, grpc_url, busy)
    time.sleep(0.05)
    _expect(grpcclient, "DEADLINE_EXCEEDED",
            lambda: client.infer("slow", [_x(grpcclient, shape=(1, 1))], client_timeout=0.05))
    thread.join(30)


def test_triton_timeout_parameter_is_deadline_exceeded(slow_idle, client, grpcclient,
                                                       grpc_url) -> None:
    busy: list = []
    thread = _slow_in_background(grpcclient, grpc_url, busy)
    time.sleep(0.05)
    # Triton's per-request ``timeout`` (microseconds): the server enforces it, no gRPC deadline.
    _expect(grpcclient, "DEADLINE_EXCEEDED",
            lambda: client.infer("slow", [_x(grpcclient, shape=(1, 1))], timeout=20_000))
    thread.join(30)


def test_cancelled_call_is_not_executed(slow_idle, client, grpcclient, grpc_url) -> None:
    def executions() -> int:
        stats = client.get_inference_statistics("slow", as_json=True)["model_stats"][0]
        return int(stats.get("execution_count", 0))

    before = executions()
    busy: list = []
    thread = _slow_in_background(grpcclient, grpc_url, busy)
    time.sleep(0.05)
    done = threading.Event()
    call = client.async_infer("slow", [_x(grpcclient, shape=(1, 1))],
                              callback=lambda result, error: done.set())
    time.sleep(0.02)
    call.cancel()
    thread.join(30)
    done.wait(5)
    time.sleep(0.5)  # would the cancelled request still run after the busy one?
    assert not isinstance(busy[0], Exception), busy[0]
    assert executions() - before == 1
