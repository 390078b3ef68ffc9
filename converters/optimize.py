"""ONNX -> optimised ONNX: constant folding and graph simplification, portable across runtimes.

ONNX Runtime's offline optimiser writes the graph it would run (``optimized_model_filepath``).
Only the BASIC level is used: it folds constants, removes redundant nodes and fuses
Conv+BatchNorm/Add/Mul into the Conv's weights, all with standard ONNX ops. EXTENDED and ALL add
``com.microsoft`` contrib ops (FusedConv, ...) and ALL adds layout-specific nodes for this CPU,
which neither TensorRT nor another machine's ONNX Runtime can be relied on to run.
Shapes are then inferred (``onnx.shape_inference``) so later steps (quantisation, TensorRT) see
every intermediate shape.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from edge.core.errors import ExportError

log = logging.getLogger(__name__)

PORTABLE_LEVEL = "basic"


def optimize_onnx(source: Path, target: Path) -> Path:
    """Write the constant-folded, simplified, shape-inferred ``source`` to ``target``.

    Raises:
        ExportError: ONNX Runtime cannot load ``source`` or the result fails ``onnx.checker``.
    """
    import onnx
    import onnxruntime as ort

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        folded = Path(tmp) / "folded.onnx"
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = str(folded)
        so.log_severity_level = 3
        try:
            ort.InferenceSession(str(source), sess_options=so, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises untyped errors
            raise ExportError(f"{source}: ONNX Runtime cannot load the model: {exc}") from exc
        model = onnx.load(str(folded))
        used = {n.domain for n in model.graph.node} | {"", "ai.onnx"}
        keep = [o for o in model.opset_import if o.domain in used]
        del model.opset_import[:]
        model.opset_import.extend(keep)  # ORT declares com.microsoft even when unused
        try:
            model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
            onnx.checker.check_model(model)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
            raise ExportError(f"{source}: optimised graph is not valid ONNX: {exc}") from exc
        before = len(onnx.load(str(source), load_external_data=False).graph.node)
        onnx.save_model(model, str(target))
    log.info("optimised %s: %d -> %d nodes", source.name, before, len(model.graph.node))
    return target
