"""TensorRT engine backend: one deserialized engine, one execution context per instance.

Input batches are copied into pinned host buffers, then host->device copies, ``execute_async_v3``
and device->host copies are queued on this instance's CUDA stream, which is synchronised once.
Device and pinned buffers are sized for the profile's largest batch and allocated once. CUDA is
reached through cuda-python (``cuda.bindings.runtime``, or ``cuda.cudart`` before 12.6); no
PyCUDA. TensorRT and CUDA are imported in the constructor, so this module imports on a CPU box.
Only engines whose key was checked (see ``engine_manager``) should be opened.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge.backends.base import Backend, BackendOptions
from edge.core.errors import BackendError, InvalidInputError, RepositoryError
from edge.core.types import TensorSpec

log = logging.getLogger(__name__)

_NUMPY_TO_KSERVE = {np.dtype(np.float32): "FP32", np.dtype(np.float16): "FP16",
                    np.dtype(np.int8): "INT8", np.dtype(np.int32): "INT32",
                    np.dtype(np.int64): "INT64", np.dtype(np.uint8): "UINT8",
                    np.dtype(np.bool_): "BOOL"}


def _check(result: Any, what: str) -> Any:
    """cuda-python returns (error, *values); raise on an error, return the values."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise BackendError(f"CUDA {what} failed: {err}")
    return values[0] if len(values) == 1 else tuple(values)


@dataclass
class _Binding:
    name: str
    is_input: bool
    dtype: np.dtype
    max_shape: tuple[int, ...]
    device: int
    host: np.ndarray  # pinned, flat, max_shape's size


class TensorRTBackend(Backend):
    """One engine file, one execution context and stream. Not shared between threads.

    Raises (constructor):
        RepositoryError: the file is missing.
        BackendError: TensorRT/CUDA are missing or the engine cannot be deserialized here.
    """

    def __init__(self, plan_path: Path, options: BackendOptions | None = None) -> None:
        super().__init__()
        options = options or BackendOptions()
        plan_path = Path(plan_path)
        if not plan_path.is_file():
            raise RepositoryError(f"{plan_path}: engine file missing")
        try:
            import tensorrt as trt

            from edge.backends.engine_manager import cuda_runtime

            self._cudart = cuda_runtime()
        except ImportError as exc:
            raise BackendError(f"{plan_path}: TensorRT backend needs tensorrt and cuda-python: "
                               f"{exc}") from exc
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(plan_path.read_bytes())
        if self._engine is None:
            raise BackendError(f"{plan_path}: TensorRT {trt.__version__} cannot deserialize "
                               "this engine (built by another TensorRT version or GPU?)")
        self._context = self._engine.create_execution_context()
        self._stream = _check(self._cudart.cudaStreamCreate(), "cudaStreamCreate")
        self._lock = threading.Lock()
        self._bindings: list[_Binding] = []
        self._batched = options.batched
        try:
            self._allocate(trt)
        except BaseException:
            self._free()
            raise
        skip = 1 if self._batched else 0
        specs = [TensorSpec(b.name, _NUMPY_TO_KSERVE[b.dtype],
                            tuple(self._engine.get_tensor_shape(b.name))[skip:])
                 for b in self._bindings]
        self.inputs = tuple(s for s, b in zip(specs, self._bindings, strict=True) if b.is_input)
        self.outputs = tuple(s for s, b in zip(specs, self._bindings, strict=True)
                             if not b.is_input)
        self.description = f"tensorrt {trt.__version__} {plan_path.name}"
        log.info("%s: TensorRT engine, max batch %d", plan_path, self.max_batch)

    def _allocate(self, trt: Any) -> None:
        cudart = self._cudart
        for i in range(self._engine.num_io_tensors):
            name = self._engine.get_tensor_name(i)
            is_input = self._engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(name)))
            shape = tuple(self._engine.get_tensor_shape(name))
            if is_input:
                shape = tuple(self._engine.get_tensor_profile_shape(name, 0)[2])
            elif any(d < 0 for d in shape):  # output: the shape at the inputs' max
                for b in self._bindings:
                    if b.is_input:
                        self._context.set_input_shape(b.name, b.max_shape)
                shape = tuple(self._context.get_tensor_shape(name))
            nbytes = int(np.prod(shape)) * dtype.itemsize
            device = _check(cudart.cudaMalloc(nbytes), "cudaMalloc")
            host_ptr = _check(cudart.cudaMallocHost(nbytes), "cudaMallocHost")
            buffer = (ctypes.c_byte * nbytes).from_address(int(host_ptr))
            host = np.frombuffer(buffer, dtype=dtype)
            self._bindings.append(_Binding(name, is_input, dtype, shape, int(device), host))
            self._context.set_tensor_address(name, int(device))

    @property
    def max_batch(self) -> int:
        inputs = [b for b in self._bindings if b.is_input]
        return inputs[0].max_shape[0] if inputs and self._batched else 1

    def _infer_impl(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        cudart = self._cudart
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        with self._lock:
            for b in self._bindings:
                if not b.is_input:
                    continue
                array = inputs[b.name]
                if array.ndim != len(b.max_shape) or any(
                        s > m for s, m in zip(array.shape, b.max_shape, strict=True)):
                    raise InvalidInputError(f"input {b.name!r}: shape {list(array.shape)} is "
                                            f"outside the engine's profile (max "
                                            f"{list(b.max_shape)})")
                host = b.host[:array.size].reshape(array.shape)
                np.copyto(host, array, casting="no")
                if not self._context.set_input_shape(b.name, array.shape):
                    raise InvalidInputError(f"input {b.name!r}: shape {list(array.shape)} "
                                            "rejected by the engine's profile")
                _check(cudart.cudaMemcpyAsync(b.device, host.ctypes.data, host.nbytes, h2d,
                                              self._stream), "cudaMemcpyAsync H2D")
            if not self._context.execute_async_v3(self._stream):
                raise BackendError("TensorRT execute_async_v3 failed")
            results = {}
            for b in self._bindings:
                if b.is_input:
                    continue
                shape = tuple(self._context.get_tensor_shape(b.name))
                host = b.host[:int(np.prod(shape))].reshape(shape)
                _check(cudart.cudaMemcpyAsync(host.ctypes.data, b.device, host.nbytes, d2h,
                                              self._stream), "cudaMemcpyAsync D2H")
                results[b.name] = host
            _check(cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
            return {name: array.copy() for name, array in results.items()}

    def _free(self) -> None:
        cudart = self._cudart
        for b in self._bindings:
            cudart.cudaFree(b.device)
            cudart.cudaFreeHost(b.host.ctypes.data)
        self._bindings = []
        cudart.cudaStreamDestroy(self._stream)

    def _close_impl(self) -> None:
        with self._lock:
            self._free()
            del self._context, self._engine, self._runtime
