"""A real model repository (ONNX models built with onnx.helper) and a real server on loopback.

Models:
- ``affine``: x FP32[4], k INT32[4] -> y = 2x + k (FP32[4]), z = -k (INT32[4]); batching.
- ``slow``: x FP32[1] -> y FP32[1], ~100+ ms per execution, queue of 1: for deadlines,
  cancellation and RESOURCE_EXHAUSTED.
- ``seg``: image FP32[1,8,8] -> mask FP32[1,8,8] (sigmoid), with a sidecar.
- ``spare``: a copy of ``affine`` that the repository tests unload and load.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

SLOW_MATMULS = 80


def _save(model: onnx.ModelProto, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    model.opset_import[0].version = 17
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def affine_model() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 4])
    k = helper.make_tensor_value_info("k", TensorProto.INT32, ["B", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 4])
    z = helper.make_tensor_value_info("z", TensorProto.INT32, ["B", 4])
    two = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    nodes = [helper.make_node("Mul", ["x", "two"], ["x2"]),
             helper.make_node("Cast", ["k"], ["kf"], to=TensorProto.FLOAT),
             helper.make_node("Add", ["x2", "kf"], ["y"]),
             helper.make_node("Neg", ["k"], ["z"])]
    return helper.make_model(helper.make_graph(nodes, "affine", [x, k], [y, z], [two]))


def slow_model(matmuls: int = SLOW_MATMULS) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 1])
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.ones((1, 512, 512), np.float32), "ones"),
             numpy_helper.from_array(np.array([-1, 1, 1], np.int64), "shape3"),
             numpy_helper.from_array(
                 (rng.standard_normal((512, 512)) / 512).astype(np.float32), "w")]
    nodes = [helper.make_node("Reshape", ["x", "shape3"], ["x3"]),
             helper.make_node("Mul", ["x3", "ones"], ["h0"])]
    for i in range(matmuls):
        nodes.append(helper.make_node("MatMul", [f"h{i}", "w"], [f"h{i + 1}"]))
    nodes += [helper.make_node("ReduceMean", [f"h{matmuls}"], ["r"], axes=[2], keepdims=0),
              helper.make_node("ReduceMean", ["r"], ["y"], axes=[1], keepdims=1)]
    model = helper.make_model(helper.make_graph(nodes, "slow", [x], [y], inits))
    model.opset_import[0].version = 17
    return model


def seg_model() -> onnx.ModelProto:
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["B", 1, 8, 8])
    mask = helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["B", 1, 8, 8])
    nodes = [helper.make_node("Sigmoid", ["image"], ["mask"])]
    return helper.make_model(helper.make_graph(nodes, "seg", [image], [mask]))


AFFINE_CONFIG = """
name: "affine"
platform: "onnxruntime_onnx"
max_batch_size: 8
input { name: "x" data_type: TYPE_FP32 dims: [4] }
input { name: "k" data_type: TYPE_INT32 dims: [4] }
output { name: "y" data_type: TYPE_FP32 dims: [4] }
output { name: "z" data_type: TYPE_INT32 dims: [4] }
"""

SLOW_CONFIG = """
name: "slow"
platform: "onnxruntime_onnx"
max_batch_size: 1
input { name: "x" data_type: TYPE_FP32 dims: [1] }
output { name: "y" data_type: TYPE_FP32 dims: [1] }
dynamic_batching { default_queue_policy { max_queue_size: 1 } }
"""

SEG_CONFIG = """
name: "seg"
platform: "onnxruntime_onnx"
max_batch_size: 4
input { name: "image" data_type: TYPE_FP32 dims: [1, 8, 8] }
output { name: "mask" data_type: TYPE_FP32 dims: [1, 8, 8] }
"""

SEG_SIDECAR = """
task: segment
labels: [background, lung]
preprocess: {height: 8, width: 8, window_center: 40.0, window_width: 400.0}
"""


def build_repository(repo: Path) -> Path:
    """Write the test models in Triton's layout; returns ``repo``."""
    for name, model, config in (("affine", affine_model(), AFFINE_CONFIG),
                                ("spare", affine_model(), AFFINE_CONFIG.replace("affine", "spare")),
                                ("slow", slow_model(), SLOW_CONFIG),
                                ("seg", seg_model(), SEG_CONFIG)):
        _save(model, repo / name / "1" / "model.onnx")
        (repo / name / "config.pbtxt").write_text(config)
    (repo / "seg" / "mededge.yaml").write_text(SEG_SIDECAR)
    return repo


@pytest.fixture(scope="session")
def onnx_models() -> dict[str, onnx.ModelProto]:
    """The repository's models by name, for direct ONNX Runtime reference runs."""
    return {"affine": affine_model(), "slow": slow_model(), "seg": seg_model()}


@pytest.fixture(scope="session")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_repository(tmp_path_factory.mktemp("repo"))


def server_settings(repo: Path, data_dir: Path, grpc: dict | None = None,
                    **server: object):  # -> Settings
    from edge.core.config import load_settings

    return load_settings(None, {
        "server": {"bind": "127.0.0.1", "grpc_port": 0, "http_port": 0,
                   "model_repository": str(repo), "data_dir": str(data_dir),
                   "drain_timeout_s": 5.0, **server},
        "backend": {"providers": ["CPUExecutionProvider"], "intra_op_threads": 1},
        "grpc": grpc or {},
    }, environ={})


@pytest.fixture(scope="session", params=["native", "grpcio"])
def server(request: pytest.FixtureRequest, repository: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """One in-process EdgeServer per gRPC front end (the native one, the default, and grpcio
    alone), each for the whole session: every API test runs against both. Tests use distinct
    models or deltas."""
    from edge.api.server import EdgeServer

    edge_server = EdgeServer(server_settings(
        repository, tmp_path_factory.mktemp("data"),
        grpc={"native_frontend": request.param == "native"}))
    edge_server.start()
    assert edge_server.grpc_frontend == request.param
    yield edge_server
    edge_server.stop(5.0)


@pytest.fixture(scope="session")
def grpc_url(server) -> str:
    return f"127.0.0.1:{server.ports.grpc}"


@pytest.fixture(scope="session")
def http_url(server) -> str:
    return f"http://127.0.0.1:{server.ports.http}"


@pytest.fixture(scope="session")
def grpcclient():
    from edge.tools.triton_client import grpcclient as load

    return load()


@pytest.fixture()
def client(grpcclient, grpc_url):
    with grpcclient.InferenceServerClient(grpc_url) as c:
        yield c


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
