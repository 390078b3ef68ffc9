"""``mededge bench detect`` on a tiny published detector: it runs, states the sliding-window
overhead with its batches, fixed cost and load, and writes the JSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from google.protobuf import text_format
from onnx import TensorProto, helper, numpy_helper

from edge.core.types import Task
from edge.preprocess.imaging import PreprocessSpec
from edge.repository.model_config import ModelConfig
from edge.repository.publish import publish_version
from edge.repository.sidecar import Sidecar
from edge.tools import bench_detect

CONFIG = """
name: "det"
platform: "onnxruntime_onnx"
max_batch_size: 8
input { name: "image" data_type: TYPE_FP32 dims: [ 3, 32, 32 ] }
output { name: "heatmap" data_type: TYPE_FP32 dims: [ 1, 8, 8 ] }
output { name: "size" data_type: TYPE_FP32 dims: [ 2, 8, 8 ] }
output { name: "offset" data_type: TYPE_FP32 dims: [ 2, 8, 8 ] }
instance_group { count: 1 kind: KIND_CPU }
dynamic_batching { preferred_batch_size: [ 4, 8 ] max_queue_delay_microseconds: 500 }
"""


def _tiny_detector(path: Path) -> Path:
    """3 x 32 x 32 -> three heads at stride 4: a 4 x 4 average pool, then a 1 x 1 conv each."""
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 3, 32, 32])
    nodes = [helper.make_node("AveragePool", ["image"], ["pooled"], kernel_shape=[4, 4],
                              strides=[4, 4])]
    outputs, inits = [], []
    for name, channels in (("heatmap", 1), ("size", 2), ("offset", 2)):
        inits.append(numpy_helper.from_array(
            rng.normal(size=(channels, 3, 1, 1)).astype(np.float32), f"w_{name}"))
        nodes.append(helper.make_node("Conv", ["pooled", f"w_{name}"], [name]))
        outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT,
                                                     ["n", channels, 8, 8]))
    model = helper.make_model(helper.make_graph(nodes, "det", [x], outputs, inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    sidecar = Sidecar(task=Task.DETECT, labels=("nodule",),
                      preprocess=PreprocessSpec(height=32, width=32, context_slices=1),
                      postprocess={"stride": 4, "outputs": ["heatmap", "size", "offset"]})
    config = text_format.Parse(CONFIG, ModelConfig())
    publish_version(repo, "det", {"model.onnx": _tiny_detector(tmp_path / "det.onnx")}, config,
                    sidecar)
    return repo


def test_bench_detect_states_the_sliding_window_overhead(repo: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    out = tmp_path / "bench" / "detect.json"
    assert bench_detect.main(repo, "det", seconds=0.05, rounds=1, out=out) == 0
    printed = capsys.readouterr().out
    assert "9 tiles in batches of 1 + 8" in printed
    assert "overhead" in printed and "(target < 10 %)" in printed and "load average" in printed
    result = json.loads(out.read_text())
    assert result["sliding_tiles"] == 9 and result["sliding_batches"] == [1, 8]
    assert result["sliding_blocks"] >= 10 and result["sliding_per_block"] == 10
    assert result["sliding_pairs"] == 100 and "alternating pairs" in printed
    assert result["sliding_overhead"] == pytest.approx(
        result["sliding_fixed_s"] / result["sliding_raw_median_s"])
    assert result["sliding_raw_s"] > 0 and result["load_average_1m"] >= 0
