"""Deadlines that fire on time: one timer thread per model version, a heap, a condition.

A request's future fails with DeadlineExceededError at its deadline whether it is still queued
(it is taken out of the queue) or executing (its result is dropped), never later.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections.abc import Callable

from edge.scheduler.queue import Pending

log = logging.getLogger(__name__)


class DeadlineTimer:
    """Calls ``on_expire(item)`` at each scheduled item's ``deadline_ns`` (monotonic ns)."""

    def __init__(self, name: str, on_expire: Callable[[Pending], None]) -> None:
        self._name = name
        self._on_expire = on_expire
        self._cond = threading.Condition(threading.Lock())
        self._heap: list[tuple[int, int, Pending]] = []
        self._seq = 0
        self._stopped = False
        self._thread: threading.Thread | None = None

    def schedule(self, item: Pending) -> None:
        """Arm a timer for ``item`` (which must have a deadline)."""
        assert item.deadline_ns is not None
        with self._cond:
            if self._stopped:
                return
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name=f"deadline-{self._name}")
                self._thread.start()
            self._seq += 1
            if len(self._heap) > 4096:  # drop timers of requests already answered
                self._heap = [e for e in self._heap if not e[2].future.done()]
                heapq.heapify(self._heap)
            heapq.heappush(self._heap, (item.deadline_ns, self._seq, item))
            if self._heap[0][2] is item:
                self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped:
                    if not self._heap:
                        self._cond.wait()
                        continue
                    wait_ns = self._heap[0][0] - time.monotonic_ns()
                    if wait_ns <= 0:
                        break
                    self._cond.wait(wait_ns / 1e9)
                if self._stopped:
                    return
                item = heapq.heappop(self._heap)[2]
            if not item.future.done():
                try:
                    self._on_expire(item)
                except Exception:  # a failing callback must not stop every later deadline
                    log.exception("%s: deadline callback failed", self._name)

    def stop(self) -> None:
        """Stop the thread; pending timers are dropped."""
        with self._cond:
            self._stopped = True
            self._heap.clear()
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=5)
