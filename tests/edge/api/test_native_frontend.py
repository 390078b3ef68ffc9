"""What only the native front end does: proxying the other methods (unary, server streaming and
bidirectional) with the caller's metadata, replacing a caller's own peer entry, matching many
concurrent answers to their requests, and stepping aside for grpcio where it cannot be built.

The rest of its behaviour (results, errors, streaming, shared memory, deadlines) is covered by
every other test in this folder, which runs against both front ends (``conftest.server``);
draining on SIGTERM by ``test_serve_command`` (``mededge serve``, native by default).
"""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import grpc
import numpy as np
import pytest

from tests.edge.api.conftest import _save, server_settings, slow_model

#: These tests take only the session's native server (``conftest.server``'s first param).
native_only = pytest.mark.parametrize("server", ["native"], indirect=True)


@pytest.fixture()
def native_url(server, grpc_url) -> str:
    assert server.grpc_frontend == "native"
    return grpc_url


@native_only
def test_reflection_and_health_pass_through_the_proxy(server, native_url: str) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(native_url) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)  # a bidirectional stream
        answers = list(stub.ServerReflectionInfo(iter([
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="no.such.Symbol"),
        ])))
        names = {s.name for s in answers[0].list_services_response.service}
        assert "inference.GRPCInferenceService" in names and "grpc.health.v1.Health" in names
        assert answers[1].error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]

        health = health_pb2_grpc.HealthStub(channel)
        serving = health_pb2.HealthCheckResponse.SERVING
        assert health.Check(health_pb2.HealthCheckRequest(service="")).status == serving
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""))  # server streaming
        assert next(watch).status == serving
        watch.cancel()
        with pytest.raises(grpc.RpcError) as err:
            health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


@native_only
def test_a_callers_own_peer_entry_is_replaced(server, native_url: str, client) -> None:
    """Shared-memory registration is only for local peers; the proxy tells the grpcio server
    who the caller is, and a caller cannot claim to be someone else (here: a remote address,
    which would be refused if it were believed)."""
    from tritonclient.utils import shared_memory as shm

    key = f"/mededge-test-peer-{uuid.uuid4().hex[:8]}"
    handle = shm.create_shared_memory_region("peer-test", key, 64)
    try:
        client.register_system_shared_memory("peer-test", key, 64,
                                             headers={"mededge-peer": "ipv4:10.9.8.7:1234"})
        assert client.get_system_shared_memory_status("peer-test", as_json=True)["regions"]
        client.unregister_system_shared_memory("peer-test")
    finally:
        shm.destroy_shared_memory_region(handle)


@native_only
def test_many_concurrent_answers_go_to_their_requests(server, native_url: str, grpcclient) -> None:
    failures: list[str] = []

    def run(worker: int) -> None:
        with grpcclient.InferenceServerClient(native_url) as c:
            for i in range(25):
                value = float(worker * 100 + i)
                x = grpcclient.InferInput("x", [1, 4], "FP32")
                x.set_data_from_numpy(np.full((1, 4), value, np.float32))
                k = grpcclient.InferInput("k", [1, 4], "INT32")
                k.set_data_from_numpy(np.full((1, 4), worker, np.int32))
                y = c.infer("affine", [x, k], request_id=f"{worker}-{i}").as_numpy("y")
                expected = value * 2 + worker  # the affine model: 2x + k
                if not np.array_equal(y, np.full((1, 4), expected, np.float32)):
                    failures.append(f"{worker}-{i}: {y} != {expected}")

    threads = [threading.Thread(target=run, args=(w,)) for w in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not failures, failures[:5]


def test_with_two_threads_a_model_running_inline_leaves_one_to_read(
        tmp_path: Path, grpcclient) -> None:
    """A request runs on the front-end thread that read it only while another thread waits for
    the next one: with two threads and a model of two instances, a second request while the
    first runs goes to the model's queue, and the port keeps answering (ServerLive, proxied)
    before the first answer. Were the second run inline too, no thread would read until the
    first ended."""
    from edge.api.server import EdgeServer

    repo = tmp_path / "repo"
    _save(slow_model(matmuls=240), repo / "slow2" / "1" / "model.onnx")
    (repo / "slow2" / "config.pbtxt").write_text(
        'name: "slow2"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 1\n'
        'input { name: "x" data_type: TYPE_FP32 dims: [1] }\n'
        'output { name: "y" data_type: TYPE_FP32 dims: [1] }\n'
        "instance_group { count: 2 }\n")
    edge_server = EdgeServer(server_settings(repo, tmp_path / "data", grpc={
        "native_frontend": True, "native_threads": 2}))
    edge_server.start()
    events: list[str] = []
    try:
        url = f"127.0.0.1:{edge_server.ports.grpc}"

        def infer(tag: str) -> None:
            with grpcclient.InferenceServerClient(url) as c:
                c.infer("slow2", [_ones_input(grpcclient)])
                events.append(tag)

        with grpcclient.InferenceServerClient(url) as c:
            c.infer("slow2", [_ones_input(grpcclient)])  # warm
            started = time.monotonic()
            c.infer("slow2", [_ones_input(grpcclient)])
            run_s = time.monotonic() - started
            first = threading.Thread(target=infer, args=("first",))
            first.start()
            time.sleep(run_s / 6)
            second = threading.Thread(target=infer, args=("second",))
            second.start()
            time.sleep(run_s / 6)
            assert c.is_server_live()
            events.append("live")
            first.join(30)
            second.join(30)
        assert events[0] == "live", (events, run_s)
        assert sorted(events) == ["first", "live", "second"]
    finally:
        edge_server.stop(5.0)


def _ones_input(grpcclient):  # noqa: ANN001, ANN202 (tritonclient's module)
    x = grpcclient.InferInput("x", [1, 1], "FP32")
    x.set_data_from_numpy(np.ones((1, 1), np.float32))
    return x


def test_without_the_extension_grpcio_serves_the_port(
        monkeypatch: pytest.MonkeyPatch, repository: Path, tmp_path: Path, grpcclient,
        caplog: pytest.LogCaptureFixture) -> None:
    """Where the C++ part cannot be built (no g++ or grpc++), the server still serves, with
    grpcio on the port, and says why."""
    from edge.api import native
    from edge.api.server import EdgeServer
    from edge.core.native_build import NativeBuildError

    def unavailable() -> None:
        raise NativeBuildError("missing g++ (Debian: g++ libgrpc++-dev ...)")

    # g++ and grpc++ are installed on this machine (.ci/run), so their absence is stood in for
    # at the one call that builds the extension; everything after it is the real server
    monkeypatch.setattr(native, "load", unavailable)
    edge_server = EdgeServer(server_settings(repository, tmp_path))
    with caplog.at_level("WARNING"):
        edge_server.start()
    try:
        assert edge_server.grpc_frontend == "grpcio"
        assert "grpc.native_frontend: not available" in caplog.text and "g++" in caplog.text
        with grpcclient.InferenceServerClient(f"127.0.0.1:{edge_server.ports.grpc}") as c:
            x = grpcclient.InferInput("x", [1, 4], "FP32")
            x.set_data_from_numpy(np.ones((1, 4), np.float32))
            k = grpcclient.InferInput("k", [1, 4], "INT32")
            k.set_data_from_numpy(np.zeros((1, 4), np.int32))
            np.testing.assert_array_equal(c.infer("affine", [x, k]).as_numpy("y"),
                                          np.full((1, 4), 2.0, np.float32))
    finally:
        edge_server.stop(5.0)
