"""ONNX -> TensorRT engine for this machine's GPU, through ``edge.backends.tensorrt_build``.

The engine is built from the source version's ONNX (a QDQ INT8 version gives an INT8 engine);
the engine key (ONNX sha256, TensorRT version, GPU, compute capability, precision, profiles,
DLA core) is written beside it as ``model.plan.json`` and checked by the runtime at every load.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from converters.evaluate import Runner
from edge.core.errors import BackendError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineRequest:
    """What the user asked for; ``precision`` fp32, fp16 or int8 (int8 needs a QDQ model)."""

    precision: str = "fp16"
    max_batch: int = 8
    opt_batch: int | None = None
    workspace_mb: int = 2048
    dla_core: int | None = None
    timing_cache: Path | None = None


def build_engine_for(onnx_path: Path, request: EngineRequest, out_dir: Path
                     ) -> tuple[Path, dict[str, Any]]:
    """Build ``out_dir/model.plan`` (and its key manifest) from ``onnx_path``.

    Returns the plan's path and the engine manifest (key plus SM count) for the version report.

    Raises:
        BackendError: no GPU or no TensorRT here (the reason says which), or the build failed.
    """
    from edge.backends.engine_manager import probe_device
    from edge.backends.tensorrt_build import BuildSpec, build_engine, default_profiles

    device, reason = probe_device()
    if device is None:
        raise BackendError(f"cannot build a TensorRT engine on this machine: {reason}")
    profiles = default_profiles(onnx_path, request.max_batch, request.opt_batch,
                                fixed=request.dla_core is not None)
    spec = BuildSpec(precision=request.precision, profiles=profiles,
                     workspace_mb=request.workspace_mb, dla_core=request.dla_core,
                     timing_cache=request.timing_cache)
    plan = out_dir / "model.plan"
    key = build_engine(onnx_path, spec, plan, device)
    return plan, {**key.to_dict(), "sm_count": device.sm_count}


def engine_runner(plan: Path, batched: bool = True, all_outputs: bool = False
                  ) -> tuple[Runner, Any]:
    """A runner for the gate over the engine at ``plan`` (its first output, or with
    ``all_outputs`` every output by name), and the backend to close afterwards.

    Raises:
        BackendError: TensorRT cannot deserialize the engine here.
    """
    from edge.backends.base import BackendOptions
    from edge.backends.tensorrt_backend import TensorRTBackend

    backend = TensorRTBackend(plan, BackendOptions(batched=batched))
    name = backend.inputs[0].name
    if all_outputs:
        return (lambda x: dict(backend.infer({name: x}))), backend
    out = backend.outputs[0].name
    return (lambda x: backend.infer({name: x})[out]), backend
