"""INT8 (QDQ, calibrated on real samples) passes the gate; a broken calibration is rejected."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from converters.calibration import load_samples
from converters.evaluate import onnx_runner
from converters.gate import GateError, enforce, evaluate_gate
from converters.int8 import Int8Options, quantize_int8
from edge.core.types import Task
from edge.preprocess.imaging import PreprocessSpec

SPEC = PreprocessSpec(32, 32)


@pytest.mark.parametrize(("name", "task", "labels"), [
    ("classifier", Task.CLASSIFY, ("no_blob", "blob")),
    ("segmenter", Task.SEGMENT, ("background", "lung", "blob"))])
def test_int8_passes_the_gate(tmp_path: Path, trained: dict[str, Path], name: str, task: Task,
                              labels: tuple[str, ...]) -> None:
    calibration = load_samples(trained["calibration"], SPEC, limit=64)
    out = tmp_path / "int8.onnx"
    details = quantize_int8(trained[name], out, calibration.images, Int8Options())
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops, "explicit QDQ expected"
    kernels = details["cpu_int8_kernels"]
    assert isinstance(kernels, dict) and kernels.get("QLinearConv", 0) >= 1, \
        f"ONNX Runtime should fuse QDQ into QLinearConv on CPU, got {kernels}"
    assert kernels["float_ops_left"] == 0, f"float Conv/Gemm left unquantised: {kernels}"
    report = evaluate_gate(task, labels, onnx_runner(str(trained[name])),
                           onnx_runner(str(out)), load_samples(trained["heldout"], SPEC))
    enforce(report, f"{name} int8")  # raises GateError with the drop if it fails
    assert report.reference > 0.5, f"the FP32 {report.metric} should be meaningful"


def test_constant_calibration_is_rejected_with_the_drop(tmp_path: Path,
                                                        trained: dict[str, Path]) -> None:
    out = tmp_path / "broken.onnx"
    quantize_int8(trained["classifier"], out, np.load(trained["constant"]), Int8Options())
    report = evaluate_gate(Task.CLASSIFY, ("no_blob", "blob"),
                           onnx_runner(str(trained["classifier"])), onnx_runner(str(out)),
                           load_samples(trained["heldout"], SPEC))
    assert not report.passed
    with pytest.raises(GateError, match=rf"auc .* drop \+{report.drop:.4f} \(tolerance 0.01\)"):
        enforce(report, "classifier int8 (constant calibration)")
    assert report.drop > 0.05, f"constant calibration should destroy accuracy, drop {report.drop}"


def test_excluded_nodes_stay_float(tmp_path: Path, trained: dict[str, Path]) -> None:
    model = onnx.load(str(trained["classifier"]))
    first_conv = next(n.name for n in model.graph.node if n.op_type == "Conv")
    out = tmp_path / "partial.onnx"
    calibration = load_samples(trained["calibration"], SPEC, limit=32)
    details = quantize_int8(trained["classifier"], out, calibration.images,
                            Int8Options(exclude_nodes=(first_conv,), method="percentile"))
    kernels = details["cpu_int8_kernels"]
    assert isinstance(kernels, dict) and kernels["float_ops_left"] >= 1, kernels


def test_weights_use_seven_bits_only_on_x86_without_vnni(tmp_path: Path) -> None:
    """reduce_range follows /proc/cpuinfo's flags on x86; an explicit option wins."""
    import platform

    from converters import int8

    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the VNNI check only reads flags on x86")
    avx2 = tmp_path / "avx2"
    avx2.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n")
    vnni = tmp_path / "vnni"
    vnni.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_vnni\n")
    assert not int8.cpu_has_vnni(avx2)
    assert int8.cpu_has_vnni(vnni)
    assert int8.cpu_has_vnni(tmp_path / "missing")  # unknown: keep the full range
    assert int8._reduce_range(Int8Options(reduce_range=False)) is False
    assert int8._reduce_range(Int8Options(activation_type="int8")) is False  # S8S8: no vpmaddubsw
