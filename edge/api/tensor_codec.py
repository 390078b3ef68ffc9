"""KServe v2 tensors <-> numpy: decoding requests, encoding responses.

Raw contents are decoded zero-copy (``np.frombuffer`` over the received bytes, read-only: see
:mod:`edge.api.infer_wire`) when they lie at an address aligned for their type, and copied once
when not (where a tensor starts inside the message depends on the names and shapes before it;
ONNX Runtime takes a slow path for unaligned input: +260 us for a 600 KB FP32 tensor here).
Typed contents are copied out of the repeated field. Every size check names the input.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from edge.core.errors import InvalidInputError
from edge.core.types import KSERVE_TO_NUMPY, NUMPY_TO_KSERVE
from edge.protos import inference_pb2

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


def decode_inputs(request: inference_pb2.ModelInferRequest,
                  raw: Sequence[bytes | memoryview]) -> dict[str, np.ndarray]:
    """The request's inputs as numpy arrays, keyed by name; ``raw`` holds its
    ``raw_input_contents`` (kept outside the message, see :mod:`edge.api.infer_wire`).

    Raises:
        InvalidInputError: a datatype is unknown, a shape is negative, a byte or element count
            does not match shape x datatype, raw and typed contents are mixed, or the number of
            raw buffers differs from the number of inputs; the message names the input.
    """
    inputs = request.inputs
    if raw and len(raw) != len(inputs):
        raise InvalidInputError(
            f"raw_input_contents has {len(raw)} entries for {len(inputs)} inputs")
    arrays: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(inputs):
        name = tensor.name
        dtype = _dtype(name, tensor.datatype)
        shape = _shape(name, tensor.shape)
        count = math.prod(shape)
        if raw:
            if tensor.HasField("contents"):
                raise InvalidInputError(
                    f"input {name!r}: both raw_input_contents and typed contents given")
            buf = raw[index]
            expected = count * dtype.itemsize
            if len(buf) != expected:
                raise InvalidInputError(
                    f"input {name!r}: {len(buf)} bytes of raw contents, expected {expected} "
                    f"for shape {list(shape)} {tensor.datatype}")
            array = np.frombuffer(buf, dtype=dtype).reshape(shape)
            if not array.flags.aligned:  # the tensor's offset in the message is arbitrary;
                array = array.copy()  # one copy here beats ONNX Runtime's slow unaligned path
        else:
            array = _typed(name, tensor, dtype, shape, count)
        if name in arrays:
            raise InvalidInputError(f"input {name!r} given twice")
        arrays[name] = array
    return arrays


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


def encode_outputs(response: inference_pb2.ModelInferResponse,
                   outputs: Mapping[str, np.ndarray], names: Sequence[str]
                   ) -> tuple[np.ndarray, ...]:
    """Describe ``outputs[name]`` for each of ``names`` in ``response.outputs``; the arrays
    (C-contiguous) whose bytes are the raw contents, in the same order."""
    arrays = []
    for name in names:
        array = np.ascontiguousarray(outputs[name])
        tensor = response.outputs.add()
        tensor.name = name
        tensor.datatype = NUMPY_TO_KSERVE[array.dtype]
        tensor.shape.extend(array.shape)
        arrays.append(array)
    return tuple(arrays)
