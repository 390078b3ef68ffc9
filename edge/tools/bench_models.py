"""Benchmark models built directly as ONNX graphs (untrained, seeded weights, no torch).

``resnet18``: the ResNet-18 topology (He et al. 2016) at 224x224, BatchNorm folded into the
convolutions as an exported, optimised model would have it; 1000 logits.
``unet2d``: a 4-level 2D U-Net (Ronneberger et al. 2015) at 256x256, 32 base channels,
2 output classes.
``floor``: ResNet-18's tensors (a 600 KB image in, 1000 logits out) with next to no compute
(a mean per channel and one small Gemm): what a server adds to a request, its transport floor.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class _Graph:
    def __init__(self, seed: int) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.rng = np.random.default_rng(seed)
        self.count = 0

    def name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def conv(self, x: str, cin: int, cout: int, k: int, stride: int = 1, relu: bool = True,
             transpose: bool = False) -> str:
        w, b, out = self.name("w"), self.name("b"), self.name("t")
        shape = (cin, cout, k, k) if transpose else (cout, cin, k, k)
        scale = np.sqrt(2.0 / (cin * k * k))
        self.inits += [numpy_helper.from_array(
            (self.rng.standard_normal(shape) * scale).astype(np.float32), w),
            numpy_helper.from_array(np.zeros(cout, np.float32), b)]
        if transpose:
            self.nodes.append(helper.make_node("ConvTranspose", [x, w, b], [out],
                                               kernel_shape=[k, k], strides=[stride, stride]))
        else:
            pad = k // 2
            self.nodes.append(helper.make_node("Conv", [x, w, b], [out], kernel_shape=[k, k],
                                               strides=[stride, stride], pads=[pad] * 4))
        return self.relu(out) if relu else out

    def relu(self, x: str) -> str:
        out = self.name("r")
        self.nodes.append(helper.make_node("Relu", [x], [out]))
        return out

    def op(self, kind: str, inputs: list[str], **attrs: object) -> str:
        out = self.name(kind.lower())
        self.nodes.append(helper.make_node(kind, inputs, [out], **attrs))
        return out

    def model(self, inp: str, in_shape: list, out: str, out_shape: list, name: str
              ) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, name, [helper.make_tensor_value_info(inp, TensorProto.FLOAT, in_shape)],
            [helper.make_tensor_value_info(out, TensorProto.FLOAT, out_shape)], self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        return model


def resnet18(seed: int = 0) -> onnx.ModelProto:
    """ResNet-18, input ``input`` [B,3,224,224], output ``logits`` [B,1000]."""
    g = _Graph(seed)
    x = g.conv("input", 3, 64, 7, 2)
    x = g.op("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    cin = 64
    for stage, cout in enumerate((64, 128, 256, 512)):
        for block in range(2):
            stride = 2 if stage > 0 and block == 0 else 1
            y = g.conv(x, cin, cout, 3, stride)
            y = g.conv(y, cout, cout, 3, 1, relu=False)
            skip = g.conv(x, cin, cout, 1, stride, relu=False) if stride != 1 or cin != cout \
                else x
            x = g.relu(g.op("Add", [y, skip]))
            cin = cout
    x = g.op("GlobalAveragePool", [x])
    x = g.op("Flatten", [x], axis=1)
    w, b = g.name("fcw"), g.name("fcb")
    g.inits += [numpy_helper.from_array(
        (g.rng.standard_normal((512, 1000)) / np.sqrt(512)).astype(np.float32), w),
        numpy_helper.from_array(np.zeros(1000, np.float32), b)]
    g.nodes.append(helper.make_node("Gemm", [x, w, b], ["logits"]))
    return g.model("input", ["B", 3, 224, 224], "logits", ["B", 1000], "resnet18")


def floor(seed: int = 0) -> onnx.ModelProto:
    """Input ``input`` [B,3,224,224], output ``logits`` [B,1000]: the channel means times a
    3x1000 matrix (about 0.05 ms of compute)."""
    g = _Graph(seed)
    x = g.op("ReduceMean", ["input"], axes=[2, 3], keepdims=0)
    w, b = g.name("fcw"), g.name("fcb")
    g.inits += [numpy_helper.from_array(g.rng.standard_normal((3, 1000)).astype(np.float32), w),
                numpy_helper.from_array(np.zeros(1000, np.float32), b)]
    g.nodes.append(helper.make_node("Gemm", [x, w, b], ["logits"]))
    return g.model("input", ["B", 3, 224, 224], "logits", ["B", 1000], "floor")


def unet2d(seed: int = 0, base: int = 32, classes: int = 2) -> onnx.ModelProto:
    """2D U-Net, input ``image`` [B,1,256,256], output ``logits`` [B,classes,256,256]."""
    g = _Graph(seed)
    skips: list[tuple[str, int]] = []
    x, cin = "image", 1
    for level in range(4):
        cout = base * 2 ** level
        x = g.conv(g.conv(x, cin, cout, 3), cout, cout, 3)
        skips.append((x, cout))
        x = g.op("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
        cin = cout
    cout = base * 16
    x = g.conv(g.conv(x, cin, cout, 3), cout, cout, 3)
    cin = cout
    for skip, channels in reversed(skips):
        x = g.conv(x, cin, channels, 2, 2, relu=False, transpose=True)
        x = g.op("Concat", [x, skip], axis=1)
        x = g.conv(g.conv(x, channels * 2, channels, 3), channels, channels, 3)
        cin = channels
    out = g.conv(x, cin, classes, 1, relu=False)
    g.nodes.append(helper.make_node("Identity", [out], ["logits"]))
    return g.model("image", ["B", 1, 256, 256], "logits", ["B", classes, 256, 256], "unet2d")


CONFIG = """name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: {max_batch}
input {{ name: "{inp}" data_type: TYPE_FP32 dims: {in_dims} }}
output {{ name: "{out}" data_type: TYPE_FP32 dims: {out_dims} }}
"""


def write_model(repo: Path, name: str, model: onnx.ModelProto, max_batch: int = 8) -> Path:
    """Write ``model`` as version 1 of ``name`` in a Triton-layout repository; returns the file."""
    path = repo / name / "1" / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    graph = model.graph

    def dims(value: onnx.ValueInfoProto) -> list[int]:
        return [d.dim_value for d in value.type.tensor_type.shape.dim[1:]]

    (repo / name / "config.pbtxt").write_text(CONFIG.format(
        name=name, max_batch=max_batch, inp=graph.input[0].name, out=graph.output[0].name,
        in_dims=dims(graph.input[0]), out_dims=dims(graph.output[0])))
    return path
