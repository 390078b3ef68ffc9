"""Building a TensorRT engine from ONNX: FP32, FP16, or INT8 from explicit QDQ scales.

One optimisation profile covers the batch range (min = opt = max on a DLA core, which has no
dynamic shapes); the workspace is capped; the timing cache is loaded from and saved to disk so
rebuilds of similar networks take seconds; on Jetson a DLA core can be targeted with GPU
fallback for layers it cannot run. Progress: TensorRT >= 10's ``IProgressMonitor`` logs each
phase; older versions get a log line per build step. The engine and its key manifest are
written atomically (temporary file, fsync, rename). TensorRT is imported inside the functions.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge.backends.engine_manager import (
    PRECISIONS,
    DeviceInfo,
    EngineKey,
    Profile,
    default_profiles,
    sha256_of,
    write_engine_manifest,
)
from edge.core.durable import write_atomically
from edge.core.errors import BackendError

log = logging.getLogger(__name__)

__all__ = ["BuildSpec", "build_engine", "default_profiles"]


@dataclass(frozen=True)
class BuildSpec:
    """How to build: precision, profiles, workspace (MiB), DLA core, timing cache file."""

    precision: str
    profiles: tuple[Profile, ...]
    workspace_mb: int = 2048
    dla_core: int | None = None
    timing_cache: Path | None = None

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r}: not one of {PRECISIONS}")


def _progress_monitor(trt: Any) -> Any | None:
    base = getattr(trt, "IProgressMonitor", None)
    if base is None:
        return None

    class _Monitor(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__()
            self._last = 0.0

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            log.info("TensorRT build: %s%s (%d steps)",
                     f"{parent_phase} / " if parent_phase else "", phase_name, num_steps)

        def step_complete(self, phase_name: str, step: int) -> bool:
            now = time.monotonic()
            if now - self._last > 5:
                log.info("TensorRT build: %s step %d", phase_name, step)
                self._last = now
            return True  # False would cancel the build

        def phase_finish(self, phase_name: str) -> None:
            log.debug("TensorRT build: %s done", phase_name)

    return _Monitor()


def build_engine(onnx_path: Path, spec: BuildSpec, plan_path: Path,
                 device: DeviceInfo | None) -> EngineKey:
    """Build ``plan_path`` (and ``plan_path.json``, its key) from ``onnx_path``.

    Raises:
        BackendError: TensorRT is missing, the ONNX does not parse, or the build fails; the
            parser's or builder's errors are in the message.
    """
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendError(f"TensorRT is not installed: {exc}") from exc
    if device is None:
        raise BackendError("no CUDA GPU to build a TensorRT engine on")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if int(trt.__version__.split(".")[0]) < 10:
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    log.info("TensorRT %s: parsing %s", trt.__version__, onnx_path)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendError(f"{onnx_path}: TensorRT cannot parse the model: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, spec.workspace_mb << 20)
    if spec.precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)  # layers without QDQ run FP16, not FP32
    if spec.precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)  # scales come from the graph's Q/DQ nodes
    if spec.dla_core is not None:
        if builder.num_DLA_cores <= spec.dla_core:
            raise BackendError(f"DLA core {spec.dla_core} requested; this device has "
                               f"{builder.num_DLA_cores}")
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = spec.dla_core
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    profile = builder.create_optimization_profile()
    for p in spec.profiles:
        profile.set_shape(p.input, p.min, p.opt, p.max)
    config.add_optimization_profile(profile)
    cache_bytes = spec.timing_cache.read_bytes() if spec.timing_cache and \
        spec.timing_cache.is_file() else b""
    timing_cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(timing_cache, ignore_mismatch=False)
    monitor = _progress_monitor(trt)
    if monitor is not None:
        config.progress_monitor = monitor
    log.info("TensorRT: building %s engine for %s (workspace %d MiB%s); this takes minutes",
             spec.precision, device.gpu_name, spec.workspace_mb,
             f", DLA core {spec.dla_core}" if spec.dla_core is not None else "")
    started = time.monotonic()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BackendError(f"{onnx_path}: TensorRT engine build failed (see the log above)")
    log.info("TensorRT: engine built in %.0f s", time.monotonic() - started)
    if spec.timing_cache is not None:
        write_atomically(spec.timing_cache, bytes(memoryview(timing_cache.serialize())))
    key = EngineKey(sha256_of(onnx_path), trt.__version__, device.gpu_name,
                    device.compute_capability, spec.precision, spec.profiles, spec.dla_core)
    write_atomically(plan_path, bytes(memoryview(serialized)))
    write_engine_manifest(plan_path, key, {"sm_count": device.sm_count,
                                           "workspace_mb": spec.workspace_mb,
                                           "built_seconds": round(time.monotonic() - started)})
    return key
