"""ONNX FP32 -> FP16 weights and activations, with FP32 inputs and outputs kept.

Uses ``onnxruntime.transformers.float16`` (shipped with onnxruntime, so no extra dependency on the
edge box); ``keep_io_types=True`` puts Cast nodes at the edges so clients keep sending FP32.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edge.core.errors import ExportError

log = logging.getLogger(__name__)

#: Ops kept in FP32: reductions and normalisations whose range or precision FP16 loses.
DEFAULT_BLOCKED_OPS = ("Softmax", "ReduceMean", "ReduceSum", "LayerNormalization", "Resize")


def _sort_topologically(graph: Any) -> None:
    """Reorder ``graph.node`` so every node follows its producers (the converter appends the
    input Casts at the end, which ``onnx.checker`` rejects).

    Raises:
        ExportError: the graph has a cycle or a dangling input.
    """
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise ExportError(f"FP16 graph: cannot order nodes {[n.name for n in pending][:5]}")
        for node in ready:
            ordered.append(node)
            available.update(node.output)
        pending = [n for n in pending if all(n is not r for r in ready)]
    copies = [type(n)() for n in ordered]
    for copy, node in zip(copies, ordered, strict=True):
        copy.CopyFrom(node)
    del graph.node[:]
    graph.node.extend(copies)


def convert_fp16(source: Path, target: Path, *, exclude_nodes: Sequence[str] = (),
                 blocked_ops: Sequence[str] = DEFAULT_BLOCKED_OPS) -> Path:
    """Write the FP16 version of ``source`` to ``target``; ``exclude_nodes`` stay FP32.

    Raises:
        ExportError: the conversion fails or its result is not valid ONNX.
    """
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = onnx.load(str(source))
    try:
        converted = convert_float_to_float16(
            model, keep_io_types=True,
            op_block_list=sorted(set(DEFAULT_OP_BLOCK_LIST) | set(blocked_ops)),
            node_block_list=list(exclude_nodes) or None)
        _sort_topologically(converted.graph)
        onnx.checker.check_model(converted)
    except Exception as exc:  # the converter raises assorted types
        raise ExportError(f"{source}: FP16 conversion failed: {exc}") from exc
    target.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(converted, str(target))
    log.info("fp16 %s -> %s (%d nodes kept FP32 by name)", source.name, target, len(exclude_nodes))
    return target
