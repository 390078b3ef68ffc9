"""onnx-opt and FP16 give the same answers as the FP32 source (real ONNX Runtime, real files)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from converters.calibration import load_samples
from converters.evaluate import onnx_runner, predict
from converters.fp16 import convert_fp16
from converters.gate import evaluate_gate
from converters.optimize import optimize_onnx
from edge.core.types import Task
from edge.preprocess.imaging import PreprocessSpec

SPEC = PreprocessSpec(32, 32)
CASES = [("classifier", Task.CLASSIFY, ("no_blob", "blob")),
         ("segmenter", Task.SEGMENT, ("background", "lung", "blob"))]


@pytest.mark.parametrize(("name", "task", "labels"), CASES)
def test_optimized_model_matches_source(tmp_path: Path, trained: dict[str, Path], name: str,
                                        task: Task, labels: tuple[str, ...]) -> None:
    out = optimize_onnx(trained[name], tmp_path / "opt.onnx")
    model = onnx.load(str(out))
    assert "BatchNormalization" not in {n.op_type for n in model.graph.node}, \
        "Conv+BatchNorm should be folded"
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}, \
        "the portable level must not add contrib ops"
    samples = load_samples(trained["heldout"], SPEC)
    ref = predict(onnx_runner(str(trained[name])), samples)
    got = predict(onnx_runner(str(out)), samples)
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)
    report = evaluate_gate(task, labels, onnx_runner(str(trained[name])),
                           onnx_runner(str(out)), samples)
    assert report.passed and abs(report.drop) < 1e-6


@pytest.mark.parametrize(("name", "task", "labels"), CASES)
def test_fp16_keeps_fp32_io_and_answers(tmp_path: Path, trained: dict[str, Path], name: str,
                                        task: Task, labels: tuple[str, ...]) -> None:
    out = convert_fp16(trained[name], tmp_path / "fp16.onnx")
    model = onnx.load(str(out))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer), \
        "weights should be FP16"
    samples = load_samples(trained["heldout"], SPEC)
    report = evaluate_gate(task, labels, onnx_runner(str(trained[name])),
                           onnx_runner(str(out)), samples)
    assert report.passed, report.message("fp16")
    assert report.agreement.max_abs_diff < 0.05
    assert report.agreement.top1 > 0.999
