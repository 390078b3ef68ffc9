"""ServedModel: one loaded, warmed model version behind a queue and N instance threads.

``submit`` validates and queues a request and returns a future at once; instance threads take
batches from the queue (see ``queue.py`` and ``batcher.py``), run them on a free backend and
answer each request with its own rows. Nothing polls: threads sleep on condition variables.
``submit(..., inline=True)`` (the gRPC front end, which waits for the answer anyway) runs the
request on the caller's thread instead when the model is idle and the batcher would not wait
for company (no queue delay), which saves two thread hand-offs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError
from pathlib import Path

import numpy as np

from edge.backends.base import Backend
from edge.core.config import SchedulerSettings
from edge.core.errors import (
    BackendError,
    DeadlineExceededError,
    InvalidInputError,
    MededgeError,
    ModelNotReadyError,
    QueueFullError,
)
from edge.core.types import InferenceRequest, InferenceResponse, ModelId, TensorSpec
from edge.repository.model_config import ModelConfig
from edge.repository.sidecar import Sidecar
from edge.scheduler.batcher import BatchPolicy, shape_key, split_outputs, stack_inputs
from edge.scheduler.deadlines import DeadlineTimer
from edge.scheduler.queue import TAKEN, Pending, RequestFuture, RequestQueue
from edge.scheduler.stats import (
    REASON_BACKEND,
    REASON_CANCELED,
    REASON_REJECTED,
    ModelStatistics,
    StatsRecorder,
)

log = logging.getLogger(__name__)


def batch_policy(config: ModelConfig) -> BatchPolicy:
    """The batching a config asks for (``max_batch_size``, ``dynamic_batching``)."""
    dyn = config.dynamic_batching
    return BatchPolicy(
        max_items=config.max_batch_size, dynamic=config.HasField("dynamic_batching"),
        preferred=tuple(sorted(int(p) for p in dyn.preferred_batch_size
                               if 0 < p <= config.max_batch_size)),
        max_delay_ns=int(dyn.max_queue_delay_microseconds) * 1000)


class ServedModel:
    """One model version, ready to serve. Thread-safe.

    ``backends`` holds one backend per instance (the same object repeated when instances
    share a session); the ServedModel owns them and closes each once.
    """

    def __init__(self, model_id: ModelId, config: ModelConfig, platform: str,
                 sidecar: Sidecar | None, inputs: Sequence[TensorSpec],
                 outputs: Sequence[TensorSpec], backends: Sequence[Backend],
                 settings: SchedulerSettings, fingerprint: str = "",
                 directory: Path | None = None) -> None:
        if not backends:
            raise ValueError("a ServedModel needs at least one backend instance")
        self.id = model_id
        self.config = config
        self.platform = platform
        self.sidecar = sidecar
        self.inputs = tuple(inputs)
        self.outputs = tuple(outputs)
        self.max_batch_size = int(config.max_batch_size)
        self.fingerprint = fingerprint
        self.directory = directory
        self.backend_description = backends[0].description
        self._backends = list(backends)
        self._specs = {s.name: s for s in self.inputs}
        self._optional = {i.name for i in config.input if i.optional}
        self._output_names = tuple(s.name for s in self.outputs)
        self._policy = batch_policy(config)
        dyn = config.dynamic_batching
        self._levels = max(1, int(dyn.priority_levels))
        default_level = int(dyn.default_priority_level) or self._levels
        self._default_level = min(max(default_level, 1), self._levels) - 1
        queue_policy = dyn.default_queue_policy
        self._default_timeout_ns = int(queue_policy.default_timeout_microseconds) * 1000
        max_requests = int(queue_policy.max_queue_size) or settings.max_queue_size
        self._queue = RequestQueue(str(model_id), self._levels, max_requests,
                                   settings.max_queue_bytes, int(settings.aging_ms * 1e6),
                                   slots=len(self._backends))
        # Backends not executing; the queue's slots guarantee one is here for whoever holds a
        # slot (deque append/pop are atomic).
        self._free_backends: deque[Backend] = deque(self._backends)
        self._inline = self._policy.max_delay_ns == 0
        self._timer = DeadlineTimer(str(model_id), self._expire)
        self._stats = StatsRecorder(model_id.name, model_id.version)
        self._successor: ServedModel | None = None
        self._retired = False
        self._closed = False
        self._close_lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._worker, daemon=True, name=f"{model_id}-instance{i}")
            for i in range(len(self._backends))]
        for thread in self._threads:
            thread.start()

    # -- submitting ---------------------------------------------------------------------------

    def submit(self, request: InferenceRequest, inline: bool = False,
               on_done: Callable[[Future[InferenceResponse]], None] | None = None
               ) -> Future[InferenceResponse]:
        """Validate and queue ``request``; the future gets its response. With ``inline``, an
        idle model without queue delay executes it on this thread before returning.
        ``on_done`` is added to the future's done callbacks before it can complete, so that
        an inline execution answers before its bookkeeping (statistics) is done.

        The future fails with DeadlineExceededError at ``request.deadline`` (or the queue
        policy's default timeout), BackendError when execution fails, and ModelNotReadyError
        when the version is unloaded before it ran; ``future.cancel()`` removes it from the queue.

        Raises:
            InvalidInputError: an input is unknown, missing, or has the wrong dtype or shape;
                or an output name is unknown. The message names it.
            QueueFullError: the bounded queue is full.
            ModelNotReadyError: the version was unloaded (and no newer version took over).
        """
        if self._retired:
            return self._forward(request, inline, on_done)
        inputs, size = self._validate(request)
        if request.outputs:
            unknown = [n for n in request.outputs if n not in self._output_names]
            if unknown:
                raise InvalidInputError(f"{self.id}: unknown output {unknown[0]!r}")
            outputs = tuple(request.outputs)
        else:
            outputs = self._output_names
        level = request.priority - 1 if 0 < request.priority <= self._levels \
            else self._default_level
        deadline_ns = None
        if request.deadline is not None:
            deadline_ns = int(request.deadline * 1e9)
        elif self._default_timeout_ns:
            deadline_ns = time.monotonic_ns() + self._default_timeout_ns
        future = RequestFuture()
        if on_done is not None:
            future.add_done_callback(on_done)
        nbytes = sum(a.nbytes for a in inputs.values())
        item = Pending(request, inputs, future, level, deadline_ns, size, nbytes,
                       shape_key(inputs) if self._policy.batches_requests else None, outputs)
        future.on_cancel = lambda: self._cancelled(item)
        if inline and self._inline and self._queue.begin_inline(item):
            self._run_taken([item])
            return future
        try:
            self._queue.put(item)
        except QueueFullError:
            self._stats.record_failure(0, REASON_REJECTED)
            raise
        except ModelNotReadyError:
            return self._forward(request, inline, on_done)
        if deadline_ns is not None:
            self._timer.schedule(item)
        return future

    def _forward(self, request: InferenceRequest, inline: bool = False,
                 on_done: Callable[[Future[InferenceResponse]], None] | None = None
                 ) -> Future[InferenceResponse]:
        successor = self._successor
        if successor is not None and request.version in (None, successor.id.version):
            return successor.submit(request, inline, on_done)
        raise ModelNotReadyError(f"{self.id}: unloaded")

    def _validate(self, request: InferenceRequest) -> tuple[dict[str, np.ndarray], int]:
        batched = self.max_batch_size > 0
        size = 1
        first = True
        inputs: dict[str, np.ndarray] = {}
        for name, array in request.inputs.items():
            spec = self._specs.get(name)
            if spec is None:
                raise InvalidInputError(f"{self.id}: unknown input {name!r}")
            if not isinstance(array, np.ndarray):
                raise InvalidInputError(f"{self.id}: input {name!r}: not a numpy array")
            if array.dtype != spec.dtype:
                raise InvalidInputError(f"{self.id}: input {name!r}: datatype "
                                        f"{array.dtype}, expected {spec.datatype}")
            shape = array.shape
            dims = spec.shape
            if batched:
                if array.ndim != len(dims) + 1:
                    raise InvalidInputError(f"{self.id}: input {name!r}: shape {list(shape)}, "
                                            f"expected [batch, {', '.join(map(str, dims))}]")
                if first:
                    size = shape[0]
                    first = False
                elif shape[0] != size:
                    raise InvalidInputError(f"{self.id}: input {name!r}: batch {shape[0]} "
                                            f"differs from the other inputs' {size}")
                shape = shape[1:]
            if len(shape) != len(dims) or any(
                    d != -1 and d != s for d, s in zip(dims, shape, strict=True)):
                raise InvalidInputError(f"{self.id}: input {name!r}: shape {list(array.shape)} "
                                        f"does not match {list(dims)}")
            inputs[name] = array if array.flags.c_contiguous else np.ascontiguousarray(array)
        if len(inputs) < len(self._specs):
            missing = [n for n in self._specs if n not in inputs and n not in self._optional]
            if missing:
                raise InvalidInputError(f"{self.id}: missing input {missing[0]!r}")
        if batched and not 1 <= size <= self.max_batch_size:
            raise InvalidInputError(
                f"{self.id}: batch size {size} outside 1..{self.max_batch_size}")
        return inputs, size

    # -- executing ----------------------------------------------------------------------------

    def _worker(self) -> None:
        while True:
            batch = self._queue.take_batch(self._policy)
            if batch is None:
                return
            self._run_taken(batch)

    def _run_taken(self, batch: list[Pending]) -> None:
        """Execute a batch that holds one of the queue's slots, on a free backend."""
        backend = self._free_backends.pop()
        try:
            self._execute(backend, batch)
        finally:
            self._free_backends.append(backend)
            self._queue.batch_done()

    def _execute(self, backend: Backend, batch: list[Pending]) -> None:
        start = time.monotonic_ns()
        try:
            feed = stack_inputs([item.inputs for item in batch])
            t_infer = time.monotonic_ns()
            outputs = backend.infer(feed)
            t_output = time.monotonic_ns()
            parts = split_outputs(outputs, [i.size for i in batch], [i.outputs for i in batch])
        except Exception as exc:  # every failure, expected or not, answers each request
            error = exc if isinstance(exc, MededgeError) else BackendError(f"{self.id}: {exc}")
            if not isinstance(exc, MededgeError):
                log.exception("%s: batch of %d failed", self.id, len(batch))
            end = time.monotonic_ns()
            for item in batch:
                if _settle(item.future, error=error):
                    self._stats.record_failure(end - item.enqueue_ns, REASON_BACKEND)
            return
        end = time.monotonic_ns()
        # answers first (a future's callbacks may send them), then the statistics
        answered = [item for item, part in zip(batch, parts, strict=True) if _settle(
            item.future, result=InferenceResponse(
                model=self.id, request_id=item.request.request_id, outputs=part,
                queue_ns=start - item.enqueue_ns, compute_ns=end - start))]
        input_ns, infer_ns, output_ns = t_infer - start, t_output - t_infer, end - t_output
        self._stats.record_execution(sum(i.size for i in batch), input_ns, infer_ns, output_ns)
        for item in answered:
            self._stats.record_success(end - item.enqueue_ns, start - item.enqueue_ns,
                                       input_ns, infer_ns, output_ns)

    def _cancelled(self, item: Pending) -> None:
        if self._queue.remove(item):
            self._stats.record_failure(time.monotonic_ns() - item.enqueue_ns, REASON_CANCELED)

    def _expire(self, item: Pending) -> None:
        if not self._queue.remove(item) and item.state != TAKEN:
            return  # cancelled, or failed by an unload
        error = DeadlineExceededError(
            f"{self.id}: request {item.request.request_id!r} passed its deadline")
        if _settle(item.future, error=error):
            self._stats.record_failure(time.monotonic_ns() - item.enqueue_ns, REASON_CANCELED)

    # -- state --------------------------------------------------------------------------------

    def statistics(self) -> ModelStatistics:
        """A snapshot of this version's counters."""
        return self._stats.snapshot(len(self._queue))

    @property
    def instances(self) -> tuple[Backend, ...]:
        """The backend of each instance (the same object repeated when they share one)."""
        return tuple(self._backends)

    @property
    def pending_count(self) -> int:
        return len(self._queue)

    @property
    def executing_count(self) -> int:
        """Batches executing now on this version's instances."""
        return self._queue.executing

    def close(self, drain_timeout_s: float = 30.0, successor: ServedModel | None = None) -> None:
        """Stop taking requests (new ones go to ``successor`` when given), let queued and
        executing ones finish for up to ``drain_timeout_s``, fail the rest with
        ModelNotReadyError, stop the threads and close the backends. Idempotent."""
        with self._close_lock:
            if self._closed:
                return
            self._successor = successor
            self._retired = True
            if not self._queue.wait_idle(drain_timeout_s):
                log.warning("%s: drain timed out after %.1f s", self.id, drain_timeout_s)
            for item in self._queue.close():
                if _settle(item.future, error=ModelNotReadyError(f"{self.id}: unloaded")):
                    self._stats.record_failure(0, REASON_CANCELED)
            for thread in self._threads:
                thread.join(timeout=max(1.0, drain_timeout_s))
            self._timer.stop()
            for backend in {id(b): b for b in self._backends}.values():
                backend.close()
            self._closed = True


def _settle(future: Future[InferenceResponse], result: InferenceResponse | None = None,
            error: BaseException | None = None) -> bool:
    """Complete ``future`` unless something else did first (a deadline, a cancel)."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]
    except InvalidStateError:
        return False
    return True
