"""The remote KServe v2 backend against two real servers on loopback: Triton (the server bundled
in nvidia-pytriton, serving an ONNX Runtime session from Python, as ``mededge bench serve``
starts it) and mededge's own gRPC server. Results must equal a local ONNX Runtime run."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from model_factory import add_scale, add_scale_config, served, write_add_scale_repo

from edge.api.server import EdgeServer
from edge.backends.base import BackendOptions
from edge.backends.onnxruntime_backend import OnnxRuntimeBackend
from edge.backends.registry import backend_options, open_backend
from edge.backends.remote_kserve import RemoteKServeBackend, RemoteTarget
from edge.core.config import BackendSettings, load_settings
from edge.core.errors import BackendError, RepositoryError
from edge.core.types import InferenceRequest
from edge.repository.model_config import parse_model_config

X = np.arange(12, dtype=np.float32).reshape(3, 4) - 5.0


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return add_scale(tmp_path_factory.mktemp("onnx") / "add.onnx", scale=3.0, offset=0.5)


@pytest.fixture(scope="module")
def local(model_path: Path) -> dict[str, np.ndarray]:
    with OnnxRuntimeBackend(model_path, BackendOptions(intra_op_threads=1)) as backend:
        return backend.infer({"INPUT0": X})


@pytest.fixture(scope="module")
def triton_url(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """pytriton's Triton from ``.venv-triton`` (``make venv-triton``: numpy<2, which its Python
    backend needs), in its own process group, serving the model with ONNX Runtime."""
    from edge.tools.bench_triton import TritonUnavailable, start_triton

    venv = Path(__file__).resolve().parents[3] / ".venv-triton"
    try:
        server = start_triton(venv, model_path, "add", "INPUT0", "OUTPUT0", 1, 8,
                              tmp_path_factory.mktemp("triton"), timeout_s=240)
    except TritonUnavailable as exc:
        pytest.skip(f"Triton is not available here: {exc}")
    with server:
        yield server.url


@pytest.fixture(scope="module")
def mededge_url(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[str]:
    """mededge's own gRPC server serving the same model as ``add``."""
    repo = tmp_path_factory.mktemp("repo")
    (repo / "add" / "1").mkdir(parents=True)
    (repo / "add" / "1" / "model.onnx").write_bytes(model_path.read_bytes())
    (repo / "add" / "config.pbtxt").write_text(add_scale_config("add"))
    settings = load_settings(environ={}, overrides={
        "server": {"bind": "127.0.0.1", "grpc_port": 0, "http_port": 0,
                   "model_repository": str(repo),
                   "data_dir": str(tmp_path_factory.mktemp("data"))}})
    with EdgeServer(settings) as server:
        assert server.ports is not None
        yield f"127.0.0.1:{server.ports.grpc}"


def _returns_data(url: str) -> bool:
    """One raw ModelInfer: does the server fill raw_output_contents?"""
    import grpc

    from edge.protos import inference_pb2, inference_pb2_grpc

    with grpc.insecure_channel(url) as channel:
        request = inference_pb2.ModelInferRequest(model_name="add")
        request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 4])
        request.raw_input_contents.append(np.ones((1, 4), np.float32).tobytes())
        response = inference_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            request, timeout=30)
    return bool(response.raw_output_contents and response.raw_output_contents[0])


@pytest.fixture(params=["triton", "mededge"])
def url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue(f"{request.param}_url"))


def _assert_values(url: str) -> None:
    """Both servers must send values (pytriton under numpy 2 sent empty outputs: a broken
    reference must fail here, not pass quietly)."""
    assert _returns_data(url), f"{url} answered ModelInfer without output values"


def _dead_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"  # closed again: nothing listens


def test_results_equal_local_onnxruntime(url: str, local: dict[str, np.ndarray]) -> None:
    with RemoteKServeBackend(RemoteTarget(url, "add"), BackendOptions(batched=True)) as remote:
        assert [s.name for s in remote.inputs] == ["INPUT0"]
        assert remote.inputs[0].datatype == "FP32" and remote.inputs[0].shape == (4,)
        assert [s.name for s in remote.outputs] == ["OUTPUT0"]
        _assert_values(url)
        result = remote.infer({"INPUT0": X})
        assert url in remote.description
    np.testing.assert_array_equal(result["OUTPUT0"], local["OUTPUT0"])


def test_outbound_hook_sees_and_changes_what_leaves(url: str) -> None:
    seen: list[str] = []

    def scrub(inputs):  # type: ignore[no-untyped-def]
        seen.extend(inputs)
        return {name: np.zeros_like(array) for name, array in inputs.items()}

    with RemoteKServeBackend(RemoteTarget(url, "add"), BackendOptions(), outbound=scrub) as r:
        _assert_values(url)
        seen.clear()
        result = r.infer({"INPUT0": X})
    assert seen == ["INPUT0"]
    np.testing.assert_array_equal(result["OUTPUT0"], np.full((3, 4), 0.5, np.float32))


def test_repository_model_runs_remotely_through_the_scheduler(
        tmp_path: Path, url: str, local: dict[str, np.ndarray]) -> None:
    """``backend: "remote"`` in config.pbtxt, tensors from the remote metadata, an empty
    version folder: the same ServedModel (queue, batching, statistics) as a local model."""
    _assert_values(url)
    (tmp_path / "add" / "1").mkdir(parents=True)
    (tmp_path / "add" / "config.pbtxt").write_text(
        'backend: "remote"\nmax_batch_size: 8\ndynamic_batching { }\n'
        f'parameters {{ key: "remote_url" value: {{ string_value: "{url}" }} }}\n')
    model = served(tmp_path, "add")
    try:
        assert "remote KServe v2" in model.backend_description
        response = model.submit(InferenceRequest(model="add", inputs={"INPUT0": X})).result(30)
        np.testing.assert_array_equal(response.outputs["OUTPUT0"], local["OUTPUT0"])
        assert model.statistics().inference_stats.success.count == 1
    finally:
        model.close(5.0)


def test_remote_url_parameter_overrides_an_onnx_platform(tmp_path: Path,
                                                         mededge_url: str) -> None:
    """The same folder Triton serves locally runs remotely when it names a remote_url."""
    write_add_scale_repo(tmp_path, "add", config=add_scale_config(
        "add", extra='parameters { key: "remote_url" value: { string_value: "grpc://'
                     f'{mededge_url}" }} }}'))
    config = parse_model_config((tmp_path / "add" / "config.pbtxt").read_text())
    options = backend_options(config, BackendSettings())
    with open_backend("onnxruntime", tmp_path / "add" / "1" / "model.onnx", options) as backend:
        assert isinstance(backend, RemoteKServeBackend)
        assert backend.target.url == mededge_url and backend.target.model == "add"


def test_remote_down_raises_backend_error_naming_the_url(tmp_path: Path) -> None:
    dead = _dead_url()
    with pytest.raises(BackendError, match=dead):
        RemoteKServeBackend(RemoteTarget(dead, "add", connect_timeout_s=0.5), BackendOptions())


def test_remote_stopping_mid_service_fails_requests_with_backend_error(
        tmp_path: Path, model_path: Path) -> None:
    write_add_scale_repo(tmp_path / "repo", "add")
    settings = load_settings(environ={}, overrides={
        "server": {"bind": "127.0.0.1", "grpc_port": 0, "http_port": 0,
                   "model_repository": str(tmp_path / "repo"), "data_dir": str(tmp_path)}})
    server = EdgeServer(settings)
    ports = server.start()
    url = f"127.0.0.1:{ports.grpc}"
    backend = RemoteKServeBackend(RemoteTarget(url, "add", timeout_s=5), BackendOptions())
    try:
        backend.infer({"INPUT0": X})
        server.stop(1.0)
        with pytest.raises(BackendError, match=url):
            backend.infer({"INPUT0": X})
    finally:
        backend.close()
        server.stop(1.0)


def test_unknown_remote_model_is_a_backend_error(mededge_url: str) -> None:
    with pytest.raises(BackendError, match="nosuch"):
        RemoteKServeBackend(RemoteTarget(mededge_url, "nosuch", connect_timeout_s=2),
                            BackendOptions())


@pytest.mark.parametrize(("params", "message"), [
    ({}, "remote_url.*required"),
    ({"remote_url": "h:1", "remote_tls": "maybe"}, "remote_tls.*true or false"),
    ({"remote_url": "h:1", "remote_timeout_s": "soon"}, "remote_timeout_s.*not a number"),
    ({"remote_url": "h:1", "remote_connect_timeout_s": "0"}, "must be > 0"),
])
def test_bad_parameters_name_the_key(params: dict[str, str], message: str) -> None:
    with pytest.raises(RepositoryError, match=message):
        RemoteTarget.from_parameters(params, Path("/repo/add/1/model.onnx"))


def test_parameter_defaults_come_from_the_model_folder() -> None:
    target = RemoteTarget.from_parameters({"remote_url": "grpc://triton:8001"},
                                          Path("/repo/lung_seg/3/model.onnx"))
    assert (target.url, target.model, target.version) == ("triton:8001", "lung_seg", "")
