"""A tiny chest CT model repository (ONNX graphs built with onnx.helper, no training) for the
time-to-result bench and demos; the same models as the DICOM-path tests use.

- ``nodule_cls`` (classify): image FP32 [N,1,64,64] (window -500/1000) -> ``probabilities``
  [N,2] = softmax of (-8 m + 4, 8 m - 4) where m is the mean windowed intensity, so brighter
  slices (more soft tissue) lean to ``nodule``.
  With ``cam``, a second output ``cam`` [N,1,64,64] (the windowed image itself) stands in for
  a class-activation map, so the pipeline's heatmap objects can be exercised.
- ``lung_seg`` (segment): image FP32 [N,1,64,64] -> ``logits`` [N,3,64,64]: ``lung`` wins
  where the windowed intensity lies in (0.05, 0.5) (HU about -950 to -500: lung parenchyma),
  ``background`` elsewhere; ``nodule`` never wins.
Both apply to CT CHEST (their sidecar applicability).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edge.core.types import Task
from edge.preprocess.imaging import PreprocessSpec
from edge.repository.model_config import parse_model_config
from edge.repository.publish import publish_version
from edge.repository.sidecar import Applicability, Sidecar

SIZE = 64
SPEC = PreprocessSpec(height=SIZE, width=SIZE, window_center=-500.0, window_width=1000.0)
CONFIG = """
name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: 8
input {{ name: "image" data_type: TYPE_FP32 dims: [1, {size}, {size}] }}
output {{ name: "{output}" data_type: TYPE_FP32 dims: {dims} }}
instance_group {{ count: 1 kind: KIND_CPU }}
parameters {{ key: "intra_op_thread_count" value: {{ string_value: "1" }} }}
"""


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def classifier(path: Path, cam: bool = False) -> Path:
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, SIZE, SIZE])
    y = [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 2])]
    inits = [numpy_helper.from_array(np.array([[-8.0, 8.0]], np.float32), "w"),
             numpy_helper.from_array(np.array([4.0, -4.0], np.float32), "b")]
    nodes = [helper.make_node("GlobalAveragePool", ["image"], ["m"]),
             helper.make_node("Flatten", ["m"], ["f"]),
             helper.make_node("Gemm", ["f", "w", "b"], ["z"]),
             helper.make_node("Softmax", ["z"], ["probabilities"], axis=1)]
    if cam:
        inits.append(numpy_helper.from_array(np.array(1.0, np.float32), "one"))
        nodes.append(helper.make_node("Mul", ["image", "one"], ["cam"]))
        y.append(helper.make_tensor_value_info("cam", TensorProto.FLOAT, ["N", 1, SIZE, SIZE]))
    return _save(helper.make_graph(nodes, "nodule_cls", [x], y, inits), path)


def segmenter(path: Path) -> Path:
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, SIZE, SIZE])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])
    inits = [numpy_helper.from_array(np.array(0.05, np.float32), "lo"),
             numpy_helper.from_array(np.array(0.5, np.float32), "hi"),
             numpy_helper.from_array(np.array(-40.0, np.float32), "k"),
             numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
             numpy_helper.from_array(np.array(-10.0, np.float32), "never")]
    nodes = [helper.make_node("Sub", ["image", "lo"], ["a"]),
             helper.make_node("Sub", ["image", "hi"], ["b"]),
             helper.make_node("Mul", ["a", "b"], ["ab"]),
             helper.make_node("Mul", ["ab", "k"], ["lung"]),  # > 0 inside (lo, hi)
             helper.make_node("Mul", ["image", "zero"], ["bg"]),
             helper.make_node("Add", ["bg", "never"], ["nodule"]),
             helper.make_node("Concat", ["bg", "lung", "nodule"], ["logits"], axis=1)]
    return _save(helper.make_graph(nodes, "lung_seg", [x], [y], inits), path)


def build_repository(repo: Path, work: Path, cam: bool = False,
                     nodule_threshold: float = 0.5) -> Path:
    """Publish ``nodule_cls`` and ``lung_seg`` (version 1) into ``repo``; return ``repo``.
    ``cam``: the classifier also has a ``cam`` output named in its sidecar."""
    applicability = Applicability(modality=("CT",), body_part=("CHEST",))
    config_text = CONFIG.format(name="nodule_cls", size=SIZE, output="probabilities",
                                dims="[2]")
    postprocess = {"activation": "none", "output": "probabilities"}
    if cam:
        config_text += (f'output {{ name: "cam" data_type: TYPE_FP32 '
                        f'dims: [1, {SIZE}, {SIZE}] }}\n')
        postprocess["cam"] = "cam"
    publish_version(repo, "nodule_cls", {"model.onnx": classifier(work / "cls.onnx", cam)},
                    parse_model_config(config_text), Sidecar(
                        task=Task.CLASSIFY, labels=("no_nodule", "nodule"), preprocess=SPEC,
                        applicability=applicability,
                        thresholds={"nodule": nodule_threshold}, postprocess=postprocess))
    seg_config = parse_model_config(CONFIG.format(name="lung_seg", size=SIZE, output="logits",
                                                  dims=f"[3, {SIZE}, {SIZE}]"))
    publish_version(repo, "lung_seg", {"model.onnx": segmenter(work / "seg.onnx")},
                    seg_config, Sidecar(
                        task=Task.SEGMENT, labels=("background", "lung", "nodule"),
                        preprocess=SPEC, applicability=applicability,
                        postprocess={"activation": "softmax", "output": "logits"}))
    return repo
