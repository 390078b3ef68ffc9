"""ONNX FP32 -> INT8 with explicit QDQ (QuantizeLinear/DequantizeLinear) static quantisation.

``quant_pre_process`` (symbolic shape inference, BASIC optimisation: Conv+BN folding) runs
first; then ``quantize_static`` with ``QuantFormat.QDQ``, per-channel weights and activation
ranges from real preprocessed samples. The same QDQ graph serves two runtimes: ONNX Runtime's
CPU provider fuses each DQ -> op -> Q group into QLinearConv / QLinearMatMul / QGemm kernels,
and TensorRT builds INT8 layers from the explicit scales (it wants symmetric activations, so
``symmetric_activations`` is set for TensorRT targets).
"""

from __future__ import annotations

import collections
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from converters.calibration import calibration_reader
from edge.core.errors import ExportError

log = logging.getLogger(__name__)

METHODS = ("minmax", "entropy", "percentile")
TYPES = ("int8", "uint8")
#: Ops that ONNX Runtime's CPU provider runs with integer kernels after QDQ fusion.
INT8_KERNELS = ("QLinearConv", "QLinearMatMul", "QGemm", "QLinearAdd", "QLinearMul",
                "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearConcat",
                "QLinearSigmoid", "QLinearLeakyRelu", "ConvInteger", "MatMulInteger",
                "DynamicQuantizeLinear")

#: Float ops that should have become integer kernels; left over means a QDQ group was not fused.
FLOAT_OPS = ("Conv", "FusedConv", "ConvTranspose", "MatMul", "Gemm", "FusedGemm", "Concat")


@dataclass(frozen=True)
class Int8Options:
    """How to quantise. ``exclude_nodes`` stay FP32 (by node name).

    Defaults suit ONNX Runtime on x86: uint8 activations with int8 weights (U8S8) get
    QLinearConcat and the VNNI/AMX U8S8 kernels (S8S8 left the U-Net's Concats in float and ran
    at half the FP32 speed here). TensorRT wants int8 symmetric activations:
    ``activation_type="int8", symmetric_activations=True``.

    ``reduce_range`` quantises weights to 7 bits. ``None`` (default) decides by the CPU: on x86
    without VNNI, ONNX Runtime's U8S8 kernels multiply with ``vpmaddubsw``, whose pairwise sums
    saturate at int16 with full-range weights (ONNX Runtime's quantisation docs recommend
    ``reduce_range`` there); with VNNI, AMX or off x86 the full range is kept.
    """

    method: str = "minmax"
    per_channel: bool = True
    activation_type: str = "uint8"
    weight_type: str = "int8"
    symmetric_activations: bool = False
    reduce_range: bool | None = None
    exclude_nodes: tuple[str, ...] = ()
    percentile: float = 99.999
    batch_size: int = 8
    extra: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"calibration method {self.method!r}: not one of {METHODS}")
        for name in (self.activation_type, self.weight_type):
            if name not in TYPES:
                raise ValueError(f"quantisation type {name!r}: not one of {TYPES}")
        if self.symmetric_activations and self.activation_type != "int8":
            raise ValueError("symmetric activations (TensorRT) need activation type int8")


def cpu_has_vnni(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """True when the CPU has an 8-bit dot-product instruction (AVX-512 VNNI, AVX-VNNI, AMX), or
    is not x86 (no saturating ``vpmaddubsw`` path); False on x86 without them."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return True
    try:
        text = cpuinfo.read_text()
    except OSError:
        return True  # unknown: keep the full range
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
            break
    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})


def _reduce_range(options: Int8Options) -> bool:
    if options.reduce_range is not None:
        return options.reduce_range
    u8s8 = options.activation_type == "uint8" and options.weight_type == "int8"
    return u8s8 and not cpu_has_vnni()


def _input_name(path: Path) -> str:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    names = [i.name for i in graph.input if i.name not in initializers]
    if len(names) != 1:
        raise ExportError(f"{path}: INT8 calibration supports one input, the model has {names}")
    return names[0]


def quantize_int8(source: Path, target: Path, calibration: np.ndarray,
                  options: Int8Options = Int8Options()) -> dict[str, object]:
    """Write the QDQ INT8 model of ``source`` to ``target``, calibrated on ``calibration``.

    Returns what was done (method, types, node counts) for the version's report.

    Raises:
        ExportError: pre-processing or quantisation failed, or no calibration samples.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if len(calibration) == 0:
        raise ExportError("INT8: no calibration samples")
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    types = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
    target.parent.mkdir(parents=True, exist_ok=True)
    input_name = _input_name(source)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # ONNX shape inference is complete for these CNNs; ONNX Runtime's symbolic shape
        # inference (meant for transformers) dumps a temporary model into the working
        # directory whenever it cannot finish, so it is skipped.
        try:
            quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        except Exception as exc:  # shape inference and the optimiser raise many types
            raise ExportError(f"{source}: quantisation pre-processing failed: {exc}") from exc
        extra: dict[str, object] = {"ActivationSymmetric": options.symmetric_activations,
                                    "CalibPercentile": options.percentile,
                                    "CalibTensorRangeSymmetric": options.symmetric_activations,
                                    **options.extra}
        reader = calibration_reader(input_name, calibration, options.batch_size)
        reduce_range = _reduce_range(options)
        try:
            quantize_static(
                str(prepared), str(target), reader, quant_format=QuantFormat.QDQ,
                per_channel=options.per_channel, reduce_range=reduce_range,
                activation_type=types[options.activation_type],
                weight_type=types[options.weight_type],
                nodes_to_exclude=list(options.exclude_nodes) or None,
                calibrate_method=methods[options.method], extra_options=extra)
        except Exception as exc:  # the quantiser raises many types
            raise ExportError(f"{source}: INT8 quantisation failed: {exc}") from exc
    model = onnx.load(str(target), load_external_data=False)
    ops = collections.Counter(n.op_type for n in model.graph.node)
    log.info("int8 %s: %d QuantizeLinear, %d DequantizeLinear, calibrated on %d samples (%s)",
             source.name, ops["QuantizeLinear"], ops["DequantizeLinear"], len(calibration),
             options.method)
    return {"method": options.method, "per_channel": options.per_channel,
            "activation_type": options.activation_type, "weight_type": options.weight_type,
            "symmetric_activations": options.symmetric_activations,
            "reduce_range": reduce_range, "exclude_nodes": list(options.exclude_nodes),
            "calibration_samples": len(calibration),
            "quantize_linear": ops["QuantizeLinear"], "dequantize_linear": ops["DequantizeLinear"],
            "cpu_int8_kernels": cpu_int8_kernels(target)}


def cpu_int8_kernels(path: Path, exclude: Sequence[str] = ()) -> dict[str, int]:
    """Which integer kernels ONNX Runtime's CPU provider actually runs for ``path``.

    The graph ORT would execute (level ALL, this machine) is written to a temporary file and its
    op types counted; QDQ groups that were not fused stay as DequantizeLinear -> float op.

    Raises:
        ExportError: ONNX Runtime cannot load the model.
    """
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "runtime.onnx"
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.optimized_model_filepath = str(out)
        so.log_severity_level = 3
        try:
            ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises untyped errors
            raise ExportError(f"{path}: ONNX Runtime cannot load the model: {exc}") from exc
        ops = collections.Counter(n.op_type for n in onnx.load(str(out)).graph.node)
    kernels = {op: n for op, n in sorted(ops.items()) if op in INT8_KERNELS and op not in exclude}
    kernels["float_ops_left"] = sum(n for op, n in ops.items() if op in FLOAT_OPS)
    return kernels
