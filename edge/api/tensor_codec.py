"""KServe v2 tensors <-> numpy: decoding requests, encoding responses.

Raw contents are decoded zero-copy (``np.frombuffer`` over the received bytes, read-only: see
:mod:`edge.api.infer_wire`) when they lie at an address aligned for their type, and copied once
when not (where a tensor starts inside the message depends on the names and shapes before it;
ONNX Runtime takes a slow path for unaligned input: +260 us for a 600 KB FP32 tensor here).
Typed contents are copied out of the repeated field. An input or requested output may instead
name a registered system shared-memory region (:mod:`edge.api.shared_memory`): the input is then
a view of that memory and the output is written into it. Every size check names the tensor.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from edge.core.errors import InvalidInputError
from edge.core.types import KSERVE_TO_NUMPY, NUMPY_TO_KSERVE
from edge.protos import inference_pb2

if TYPE_CHECKING:
    from edge.api.shared_memory import SharedMemoryRegistry

#: KServe datatype -> the InferTensorContents field that carries it (None: raw bytes only).
TYPED_FIELD: Mapping[str, str | None] = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP16": None,
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}


def _dtype(name: str, datatype: str) -> np.dtype:
    dtype = KSERVE_TO_NUMPY.get(datatype)
    if dtype is None:
        raise InvalidInputError(f"input {name!r}: unsupported datatype {datatype!r}")
    return dtype


def _shape(name: str, shape: Sequence[int]) -> tuple[int, ...]:
    dims = tuple(int(d) for d in shape)
    if any(d < 0 for d in dims):
        raise InvalidInputError(f"input {name!r}: negative dimension in shape {list(dims)}")
    return dims


#: Tensor parameters that place a tensor in a system shared-memory region.
SHM_REGION, SHM_BYTE_SIZE, SHM_OFFSET = (
    "shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")


@dataclass(frozen=True)
class ShmPlacement:
    """Where a tensor lies in shared memory: ``byte_size`` bytes at ``offset`` of ``region``."""

    region: str
    byte_size: int
    offset: int


def _int_param(parameters: Any, key: str, what: str) -> int:
    if key not in parameters:
        return 0
    param = parameters[key]
    value = param.int64_param or param.uint64_param
    if value < 0:
        raise InvalidInputError(f"{what}: parameter {key} is negative ({value})")
    return int(value)


def shm_placement(parameters: Any, what: str) -> ShmPlacement | None:
    """The tensor's shared-memory parameters, or None when it has none.

    Raises:
        InvalidInputError: ``shared_memory_byte_size`` is missing or a size is negative; the
            message names ``what`` (e.g. "input 'image'").
    """
    if SHM_REGION not in parameters:
        return None
    region = parameters[SHM_REGION].string_param
    if SHM_BYTE_SIZE not in parameters:
        raise InvalidInputError(f"{what}: {SHM_REGION} {region!r} without {SHM_BYTE_SIZE}")
    return ShmPlacement(region, _int_param(parameters, SHM_BYTE_SIZE, what),
                        _int_param(parameters, SHM_OFFSET, what))


def _aligned(array: np.ndarray) -> np.ndarray:
    # a tensor's offset in the message (or a region) is arbitrary; one copy here beats ONNX
    # Runtime's slow path for unaligned input
    return array if array.flags.aligned else array.copy()


def decode_inputs(request: inference_pb2.ModelInferRequest,
                  raw: Sequence[bytes | memoryview],
                  shared_memory: SharedMemoryRegistry | None = None) -> dict[str, np.ndarray]:
    """The request's inputs as numpy arrays, keyed by name; ``raw`` holds its
    ``raw_input_contents`` (kept outside the message, see :mod:`edge.api.infer_wire`), one entry
    per input that is not in shared memory, in order (as tritonclient and Triton have it).

    Raises:
        InvalidInputError: a datatype is unknown, a shape is negative, a byte or element count
            does not match shape x datatype, raw and typed contents are mixed, the number of
            raw buffers differs from the number of inputs sent in the message, or a
            shared-memory region is unknown or too small; the message names the input.
    """
    inputs = request.inputs
    placements = [shm_placement(t.parameters, f"input {t.name!r}") for t in inputs]
    in_message = sum(p is None for p in placements)
    if raw and len(raw) != in_message:
        raise InvalidInputError(
            f"raw_input_contents has {len(raw)} entries for {in_message} inputs "
            f"not in shared memory")
    arrays: dict[str, np.ndarray] = {}
    next_raw = 0
    for tensor, placement in zip(inputs, placements, strict=True):
        name = tensor.name
        dtype = _dtype(name, tensor.datatype)
        shape = _shape(name, tensor.shape)
        count = math.prod(shape)
        expected = count * dtype.itemsize
        if placement is not None or raw:
            if tensor.HasField("contents"):
                source = "shared memory" if placement is not None else "raw_input_contents"
                raise InvalidInputError(f"input {name!r}: both {source} and typed contents given")
            if placement is None:
                buf: bytes | memoryview = raw[next_raw]
                next_raw += 1
                source = "raw contents"
            else:
                buf = _shm_input(name, placement, shared_memory)
                source = f"shared memory ({SHM_BYTE_SIZE})"
            if len(buf) != expected:
                raise InvalidInputError(
                    f"input {name!r}: {len(buf)} bytes of {source}, expected {expected} "
                    f"for shape {list(shape)} {tensor.datatype}")
            array = _aligned(np.frombuffer(buf, dtype=dtype).reshape(shape))
        else:
            array = _typed(name, tensor, dtype, shape, count)
        if name in arrays:
            raise InvalidInputError(f"input {name!r} given twice")
        arrays[name] = array
    return arrays


def _shm_input(name: str, placement: ShmPlacement,
               shared_memory: SharedMemoryRegistry | None) -> memoryview:
    if shared_memory is None:
        raise InvalidInputError(f"input {name!r}: shared memory is not enabled on this server")
    view = shared_memory.window(f"input {name!r}", placement.region, placement.offset,
                                placement.byte_size)
    return view.toreadonly()  # the client's memory: the model must not write to it


def _typed(name: str, tensor: Any, dtype: np.dtype, shape: tuple[int, ...],
           count: int) -> np.ndarray:
    field = TYPED_FIELD[tensor.datatype]
    if field is None:
        raise InvalidInputError(
            f"input {name!r}: {tensor.datatype} needs raw_input_contents, not typed contents")
    values = getattr(tensor.contents, field)
    if len(values) != count:
        raise InvalidInputError(
            f"input {name!r}: {len(values)} values in {field}, expected {count} "
            f"for shape {list(shape)}")
    return np.asarray(values, dtype=dtype).reshape(shape)


_EMPTY = np.empty(0, dtype=np.uint8)


def encode_outputs(response: inference_pb2.ModelInferResponse,
                   outputs: Mapping[str, np.ndarray], names: Sequence[str],
                   placements: Mapping[str, ShmPlacement] | None = None,
                   shared_memory: SharedMemoryRegistry | None = None
                   ) -> tuple[np.ndarray, ...]:
    """Describe ``outputs[name]`` for each of ``names`` in ``response.outputs``; the arrays
    (C-contiguous) whose bytes are the raw contents, in the same order.

    An output with a placement is written into its shared-memory region instead: its tensor
    carries the region's name and the bytes written as parameters, and its raw entry is empty
    (kept so that clients which index raw contents by output position, as tritonclient does,
    find the others), or absent when every output went to shared memory.

    Raises:
        InvalidInputError: an output does not fit in its region; the message names it.
    """
    placements = placements or {}
    arrays = []
    for name in names:
        array = np.ascontiguousarray(outputs[name])
        tensor = response.outputs.add()
        tensor.name = name
        tensor.datatype = NUMPY_TO_KSERVE[array.dtype]
        tensor.shape.extend(array.shape)
        placement = placements.get(name)
        if placement is None:
            arrays.append(array)
            continue
        _write_shm_output(name, array, placement, shared_memory)
        tensor.parameters[SHM_REGION].string_param = placement.region
        tensor.parameters[SHM_BYTE_SIZE].int64_param = array.nbytes
        if placement.offset:
            tensor.parameters[SHM_OFFSET].int64_param = placement.offset
        arrays.append(_EMPTY)
    if all(a is _EMPTY for a in arrays):
        return ()
    return tuple(arrays)


def check_output_placement(name: str, placement: ShmPlacement,
                           shared_memory: SharedMemoryRegistry | None) -> None:
    """Refuse a requested output whose region is unknown before any work is done.

    Raises:
        InvalidInputError: shared memory is off, or the region is unknown or too small for the
            window asked for.
    """
    _output_window(name, placement, shared_memory)


def _output_window(name: str, placement: ShmPlacement,
                   shared_memory: SharedMemoryRegistry | None) -> memoryview:
    if shared_memory is None:
        raise InvalidInputError(f"output {name!r}: shared memory is not enabled on this server")
    return shared_memory.window(f"output {name!r}", placement.region, placement.offset,
                                placement.byte_size)


def _write_shm_output(name: str, array: np.ndarray, placement: ShmPlacement,
                      shared_memory: SharedMemoryRegistry | None) -> None:
    window = _output_window(name, placement, shared_memory)
    if array.nbytes > placement.byte_size:
        raise InvalidInputError(
            f"output {name!r}: {array.nbytes} bytes do not fit in shared memory region "
            f"{placement.region!r} ({SHM_BYTE_SIZE} {placement.byte_size})")
    np.frombuffer(window, dtype=np.uint8, count=array.nbytes)[:] = array.reshape(-1).view(
        np.uint8)
