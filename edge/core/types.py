"""Typed values that cross stage boundaries. Frozen dataclasses only: no tuples, no loose dicts."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

#: KServe v2 datatype names and the numpy dtype each maps to.
KSERVE_TO_NUMPY: Mapping[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}
NUMPY_TO_KSERVE: Mapping[np.dtype, str] = {v: k for k, v in KSERVE_TO_NUMPY.items()}


class Task(str, enum.Enum):
    """What a model does; decides its postprocessing and result objects."""

    CLASSIFY = "classify"
    SEGMENT = "segment"
    DETECT = "detect"


@dataclass(frozen=True)
class TensorSpec:
    """A named model input or output. ``shape`` excludes the batch axis; -1 is dynamic."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    @property
    def dtype(self) -> np.dtype:
        return KSERVE_TO_NUMPY[self.datatype]


@dataclass(frozen=True)
class ModelId:
    """A model name and a concrete version number."""

    name: str
    version: int

    def __str__(self) -> str:
        return f"{self.name}:{self.version}"


@dataclass(frozen=True)
class InferenceRequest:
    """One request for one model: named inputs that each carry the batch axis first.

    ``deadline`` is a ``time.monotonic()`` instant (None: no deadline); ``priority`` 1 is the
    highest, as in Triton; 0 means the model's default level. ``no_delay``: the sender sized
    this batch itself (a sliding window's tiles), so the scheduler dispatches it, with whatever
    else is queued, without waiting the dynamic batcher's queue delay for company.
    """

    model: str
    inputs: Mapping[str, np.ndarray]
    version: int | None = None
    request_id: str = ""
    priority: int = 0
    deadline: float | None = None
    outputs: tuple[str, ...] = ()
    no_delay: bool = False


@dataclass(frozen=True)
class InferenceResponse:
    """The outputs of one request, batch axis first, matched to it by ``request_id``."""

    model: ModelId
    request_id: str
    outputs: Mapping[str, np.ndarray]
    queue_ns: int = 0
    compute_ns: int = 0
    extra: Mapping[str, str] = field(default_factory=dict)
