"""The one interface every inference backend implements (Polygraphy's runner shape).

A backend is a context manager that owns one loaded model. Public methods check state and inputs
and then call the ``_impl`` methods subclasses fill in, so every backend fails the same way.
Heavy imports (onnxruntime, TensorRT, CUDA) happen inside the subclass modules' constructors.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import TracebackType

import numpy as np

from edge.core.errors import BackendError, InvalidInputError
from edge.core.types import TensorSpec


@dataclass(frozen=True)
class BackendOptions:
    """How to run a model; built from BackendSettings and the model's config.pbtxt.

    ``providers`` is the preference order; a backend uses those it has, in that order.
    ``graph_optimization`` is one of disable, basic, extended, all. ``batched`` says whether
    axis 0 of every tensor is the batch axis (config ``max_batch_size > 0``).
    """

    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    intra_op_threads: int = 0
    inter_op_threads: int = 1
    graph_optimization: str = "all"
    batched: bool = True
    provider_options: Mapping[str, Mapping[str, str]] = field(default_factory=dict)


class Backend(abc.ABC):
    """One loaded model. Subclasses set ``inputs``/``outputs`` in their constructor.

    ``inputs`` and ``outputs`` exclude the batch axis when the model is batched.
    """

    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    #: What actually runs the model, e.g. the execution providers chosen; for logs and metadata.
    description: str = ""

    def __init__(self) -> None:
        self._closed = False

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model on named arrays (batch axis first when batched); returns every output.

        Only cheap checks happen here (names, dtypes); the scheduler validates shapes before
        queueing, so the hot path does not repeat that work.

        Raises:
            BackendError: the backend is closed or the runtime failed.
            InvalidInputError: an input is missing, unknown or has the wrong dtype.
        """
        if self._closed:
            raise BackendError(f"{type(self).__name__}: infer() after close()")
        if len(inputs) != len(self.inputs):
            expected = {s.name for s in self.inputs}
            missing = sorted(expected - set(inputs))
            unknown = sorted(set(inputs) - expected)
            raise InvalidInputError(f"inputs: missing {missing}, unknown {unknown}")
        for spec in self.inputs:
            array = inputs.get(spec.name)
            if array is None:
                raise InvalidInputError(f"input {spec.name!r}: missing")
            if array.dtype != spec.dtype:
                raise InvalidInputError(
                    f"input {spec.name!r}: dtype {array.dtype}, expected {spec.datatype}")
        return self._infer_impl(inputs)

    def close(self) -> None:
        """Release the model; idempotent."""
        if not self._closed:
            self._closed = True
            self._close_impl()

    @abc.abstractmethod
    def _infer_impl(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model. Raises BackendError on a runtime failure."""

    @abc.abstractmethod
    def _close_impl(self) -> None:
        """Free the runtime's resources."""
