"""A model's bounded request queue: priority levels, earliest deadline first, aging.

Selection: each priority level (0 is the highest) keeps a heap ordered by (deadline, arrival);
the level served next is the one with the smallest ``level - waited // aging`` of its oldest
request, so a request waiting ``aging`` longer than a higher level's rises one level and low
priority is never starved. Removal (cancel, deadline) is lazy in the heaps but immediate in the
counts that bound the queue; the heaps are compacted when they hold more garbage than requests.
Workers block on a condition variable: no polling, and an idle model dispatches at once. A
queued ``no_delay`` request makes what is queued due at once (no wait for company).
``slots`` bounds what executes at a time (the model's instances): a worker that finds work waits
for a free slot, and :meth:`RequestQueue.begin_inline` lets a caller take a free slot itself
when nothing is queued, so the request runs on the caller's thread without a hand-off.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import numpy as np

from edge.core.errors import ModelNotReadyError, QueueFullError
from edge.core.types import InferenceRequest, InferenceResponse
from edge.scheduler.batcher import BatchPolicy, plan_batch

QUEUED, TAKEN, GONE = 0, 1, 2
_NO_DEADLINE = 1 << 62


class RequestFuture(Future[InferenceResponse]):
    """A Future whose ``cancel()`` also takes its request out of the queue at once (through
    ``on_cancel``); a request already executing cannot be cancelled, as with any Future."""

    def __init__(self) -> None:
        super().__init__()
        self.on_cancel: Callable[[], None] | None = None

    def cancel(self) -> bool:
        cancelled = super().cancel()
        if cancelled and self.on_cancel is not None:
            self.on_cancel()
        return cancelled


class Pending:
    """One queued request (internal to the scheduler; mutable state guarded by the queue)."""

    __slots__ = ("request", "inputs", "future", "level", "deadline_ns", "enqueue_ns", "seq",
                 "size", "nbytes", "key", "outputs", "state")

    def __init__(self, request: InferenceRequest, inputs: dict[str, np.ndarray],
                 future: RequestFuture, level: int, deadline_ns: int | None, size: int,
                 nbytes: int, key: Any, outputs: tuple[str, ...]) -> None:
        self.request = request
        self.inputs = inputs
        self.future = future
        self.level = level
        self.deadline_ns = deadline_ns
        self.enqueue_ns = time.monotonic_ns()
        self.seq = 0
        self.size = size
        self.nbytes = nbytes
        self.key = key
        self.outputs = outputs
        self.state = QUEUED


class RequestQueue:
    """Bounded by request count and by input bytes; thread-safe."""

    def __init__(self, name: str, levels: int, max_requests: int, max_bytes: int,
                 aging_ns: int, slots: int = 1) -> None:
        self._name = name
        self._slots = max(1, slots)
        self._levels = max(1, levels)
        self._max_requests = max_requests
        self._max_bytes = max_bytes
        self._aging_ns = max(1, aging_ns)
        lock = threading.Lock()
        self._cond = threading.Condition(lock)  # workers wait here for requests
        self._idle = threading.Condition(lock)  # drains wait here for an empty, idle queue
        self._heaps: list[list[tuple[int, int, Pending]]] = [[] for _ in range(self._levels)]
        self._fifos: list[deque[Pending]] = [deque() for _ in range(self._levels)]
        self._count = 0
        self._items = 0
        self._bytes = 0
        self._no_delay = 0  # queued requests that must not wait for company
        self._garbage = 0
        self._seq = 0
        self._busy = 0
        self._closed = False

    @property
    def levels(self) -> int:
        return self._levels

    def __len__(self) -> int:
        return self._count

    @property
    def executing(self) -> int:
        """Batches executing now (by workers or inline callers)."""
        return self._busy

    def put(self, item: Pending) -> None:
        """Queue ``item`` and wake one worker.

        Raises:
            QueueFullError: the queue holds its maximum of requests or bytes.
            ModelNotReadyError: the queue is closed (the model is being unloaded).
        """
        with self._cond:
            if self._closed:
                raise ModelNotReadyError(f"{self._name}: unloading")
            if self._count >= self._max_requests or (
                    self._count and self._bytes + item.nbytes > self._max_bytes):
                raise QueueFullError(
                    f"{self._name}: queue full ({self._count} requests, {self._bytes} bytes)")
            self._seq += 1
            item.seq = self._seq
            self._push(item)
            self._fifos[item.level].append(item)
            self._count += 1
            self._items += item.size
            self._bytes += item.nbytes
            self._no_delay += item.request.no_delay
            self._cond.notify()

    def _push(self, item: Pending) -> None:
        key = item.deadline_ns if item.deadline_ns is not None else _NO_DEADLINE
        heapq.heappush(self._heaps[item.level], (key, item.seq, item))

    def _unlink(self, item: Pending, state: int) -> None:
        item.state = state
        self._count -= 1
        self._items -= item.size
        self._bytes -= item.nbytes
        self._no_delay -= item.request.no_delay

    def remove(self, item: Pending) -> bool:
        """Take ``item`` out if it is still queued (cancelled, expired); True if it was."""
        if item.state != QUEUED:  # only ever leaves QUEUED under the lock, never returns
            return False
        with self._cond:
            if item.state != QUEUED:
                return False
            self._unlink(item, GONE)
            self._garbage += 1
            if self._garbage > self._count + 64:
                self._compact()
            if self._count == 0 and self._busy == 0:
                self._idle.notify_all()
            return True

    def _compact(self) -> None:
        for level in range(self._levels):
            live = [e for e in self._heaps[level] if e[2].state == QUEUED]
            heapq.heapify(live)
            self._heaps[level] = live
            self._fifos[level] = deque(i for i in self._fifos[level] if i.state == QUEUED)
        self._garbage = 0

    def _level_order(self, now: int) -> tuple[list[int], int]:
        """Levels with queued requests, best first, and the oldest request's arrival."""
        ranked = []
        oldest = now
        for level, fifo in enumerate(self._fifos):
            while fifo and fifo[0].state != QUEUED:
                fifo.popleft()
            if fifo:
                arrival = fifo[0].enqueue_ns
                oldest = min(oldest, arrival)
                ranked.append((level - (now - arrival) // self._aging_ns, level))
        ranked.sort()
        return [level for _, level in ranked], oldest

    def _pop(self, level: int) -> Pending | None:
        heap = self._heaps[level]
        while heap:
            item = heapq.heappop(heap)[2]
            if item.state == QUEUED:
                return item
            self._garbage -= 1
        return None

    def take_batch(self, policy: BatchPolicy) -> list[Pending] | None:
        """Block until a batch is due (see :func:`plan_batch`) and take it; None once closed
        and empty. Each taken future is moved to running; cancelled ones are dropped."""
        with self._cond:
            while True:
                if self._count == 0:
                    if self._closed:
                        return None
                    self._cond.wait()
                    continue
                if self._busy >= self._slots:  # every instance executing (inline ones too)
                    self._cond.wait()
                    continue
                now = time.monotonic_ns()
                order, oldest = self._level_order(now)
                waited = policy.max_delay_ns if self._no_delay else now - oldest
                want = plan_batch(self._items, waited, policy)
                if want is None:
                    self._cond.wait((policy.max_delay_ns - (now - oldest)) / 1e9)
                    continue
                batch = self._gather(order, want)
                if batch:
                    self._busy += 1
                    if self._count:
                        self._cond.notify()
                    return batch
                if self._count == 0 and self._busy == 0:
                    self._idle.notify_all()

    def _gather(self, order: list[int], want: int) -> list[Pending]:
        batch: list[Pending] = []
        skipped: list[Pending] = []
        total = 0
        key: Any = None
        for level in order:
            while total < want and len(skipped) <= 2 * want:
                item = self._pop(level)
                if item is None:
                    break
                if batch and (item.key != key or total + item.size > want):
                    skipped.append(item)
                    continue
                self._unlink(item, TAKEN)
                if not item.future.set_running_or_notify_cancel():
                    item.state = GONE
                    continue
                key = item.key
                batch.append(item)
                total += item.size
        for item in skipped:
            self._push(item)
        return batch

    def begin_inline(self, item: Pending) -> bool:
        """Take a free slot for ``item`` without queueing it, if nothing is queued and the
        queue is open; True: the caller executes it now and then calls :meth:`batch_done`."""
        with self._cond:
            if self._closed or self._count or self._busy >= self._slots:
                return False
            if not item.future.set_running_or_notify_cancel():
                return False
            item.state = TAKEN
            self._busy += 1
            return True

    def batch_done(self) -> None:
        """A worker (or an inline caller) finished executing what it took."""
        with self._cond:
            self._busy -= 1
            if self._count:
                self._cond.notify()  # a worker may be waiting for this slot
            elif self._busy == 0:
                self._idle.notify_all()

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until nothing is queued or executing; False on timeout."""
        end = time.monotonic() + timeout_s
        with self._idle:
            while self._count or self._busy:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
            return True

    def close(self) -> list[Pending]:
        """Refuse new requests, wake the workers so they exit; returns what was still queued."""
        with self._cond:
            self._closed = True
            left = [e[2] for heap in self._heaps for e in heap if e[2].state == QUEUED]
            for item in left:
                self._unlink(item, GONE)
            self._heaps = [[] for _ in range(self._levels)]
            self._fifos = [deque() for _ in range(self._levels)]
            self._garbage = 0
            self._cond.notify_all()
            self._idle.notify_all()
            return left
