"""Tiny ONNX models (built with onnx.helper, no torch) and Triton-layout repositories for tests.

- ``add_scale``: OUTPUT0 = INPUT0 * scale + offset, INPUT0 float32 [batch, 4]; the offset tells
  versions apart.
- ``slow_matmul``: a chain of ``steps`` 128x128 MatMuls on [batch, 128, 128], to keep an
  instance busy for a controllable time.
- ``conv_net``: Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm, [batch, 1, 16, 16] -> 3.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edge.core.config import load_settings
from edge.repository.loader import read_model
from edge.scheduler.loading import load_version
from edge.scheduler.model import ServedModel

OPSET = 17


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def add_scale(path: Path, scale: float = 2.0, offset: float = 0.0, width: int = 4) -> Path:
    """OUTPUT0 = INPUT0 * scale + offset on float32 [batch, width]."""
    x = helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["batch", width])
    y = helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["batch", width])
    inits = [numpy_helper.from_array(np.array(scale, np.float32), "scale"),
             numpy_helper.from_array(np.array(offset, np.float32), "offset")]
    nodes = [helper.make_node("Mul", ["INPUT0", "scale"], ["scaled"]),
             helper.make_node("Add", ["scaled", "offset"], ["OUTPUT0"])]
    return _save(helper.make_graph(nodes, "add_scale", [x], [y], inits), path)


def slow_matmul(path: Path, steps: int = 20, size: int = 128) -> Path:
    """Y = X @ W @ W ... (``steps`` times) on float32 [batch, size, size]; W is 1/size."""
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", size, size])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", size, size])
    w = numpy_helper.from_array(np.full((size, size), 1.0 / size, np.float32), "W")
    nodes = []
    prev = "X"
    for i in range(steps):
        out = "Y" if i == steps - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [prev, "W"], [out]))
        prev = out
    return _save(helper.make_graph(nodes, "slow_matmul", [x], [y], [w]), path)


def conv_net(path: Path, seed: int = 0) -> Path:
    """A small classifier: float32 [batch, 1, 16, 16] -> logits [batch, 3]."""
    rng = np.random.default_rng(seed)
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, 16, 16])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])
    inits = [
        numpy_helper.from_array(rng.normal(size=(4, 1, 3, 3)).astype(np.float32), "conv_w"),
        numpy_helper.from_array(rng.normal(size=(4,)).astype(np.float32), "conv_b"),
        numpy_helper.from_array(rng.normal(size=(4, 3)).astype(np.float32), "fc_w"),
        numpy_helper.from_array(rng.normal(size=(3,)).astype(np.float32), "fc_b"),
    ]
    nodes = [
        helper.make_node("Conv", ["image", "conv_w", "conv_b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"]),
    ]
    return _save(helper.make_graph(nodes, "conv_net", [x], [y], inits), path)


ADD_SCALE_CONFIG = """
name: "{name}"
backend: "onnxruntime"
max_batch_size: {max_batch_size}
input [ {{ name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] }} ]
output [ {{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] }} ]
instance_group [ {{ count: {instances} kind: KIND_CPU }} ]
parameters {{ key: "intra_op_thread_count" value: {{ string_value: "1" }} }}
{extra}
"""


def add_scale_config(name: str, max_batch_size: int = 8, instances: int = 1,
                     extra: str = "") -> str:
    """A config.pbtxt for ``add_scale`` as Triton users write them."""
    return ADD_SCALE_CONFIG.format(name=name, max_batch_size=max_batch_size,
                                   instances=instances, extra=extra)


def write_version(repo: Path, name: str, version: int, offset: float = 0.0,
                  scale: float = 2.0) -> Path:
    """Write ``repo/name/version/model.onnx`` (an add_scale model) and return the folder."""
    add_scale(repo / name / str(version) / "model.onnx", scale=scale, offset=offset)
    return repo / name / str(version)


def write_add_scale_repo(repo: Path, name: str = "add", versions: tuple[int, ...] = (1,),
                         config: str | None = None) -> Path:
    """A Triton-only repository (config.pbtxt + N/model.onnx, no sidecar); version v adds v."""
    for version in versions:
        write_version(repo, name, version, offset=float(version))
    (repo / name / "config.pbtxt").write_text(config if config is not None
                                              else add_scale_config(name))
    return repo / name


def served(repo: Path, name: str, **scheduler: object) -> ServedModel:
    """Load ``repo/name``'s selected latest version as a ServedModel (caller closes it)."""
    settings = load_settings(overrides={"server": {"model_repository": str(repo)},
                                        "scheduler": dict(scheduler)}, environ={})
    source = read_model(repo, name)
    return load_version(source, source.versions[-1], settings)
