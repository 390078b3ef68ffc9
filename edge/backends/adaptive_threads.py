"""Instances that take every core when they run alone (config parameter ``adaptive_threads``).

With ``instance_group { count: N }`` each instance gets ``cores / N`` intra-op threads: under
load N batches run side by side, each on its own cores, and no thread of one run waits for a
preempted thread of another (a parallel section is as slow as its slowest thread). But a single
request then runs on ``cores / N`` threads, N times fewer than one instance would give it.

``parameters { key: "adaptive_threads" value: { string_value: "true" } }`` gives both: every
instance keeps its narrow backend, and the instances share one wide backend with every core.
A batch runs on the wide one when it runs alone: no other instance of the model is executing,
and none was for as long as the last batch took (under load one instance finishes a moment
before the other starts again; widening then would put ``cores + cores / N`` threads on the
cores for the whole wide run as soon as the other starts). Otherwise it runs on the instance's
own narrow backend. Only one batch can be alone, so the wide backend never runs two at once.
Memory: N + 1 sessions of the model. Triton ignores the parameter (the same folder serves there
with its plain instances).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping

import numpy as np

from edge.backends.base import Backend


class ExecutionGauge:
    """Which executions of a model run alone; shared by its instances. Thread-safe."""

    def __init__(self, clock: Callable[[], int] = time.monotonic_ns) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._running = 0
        self._overlap_ns = 0  # when two or more executions last overlapped
        self._last_ns = 0  # how long the last execution took

    def now(self) -> int:
        return self._clock()

    def enter(self) -> bool:
        """Count one more execution; True when it runs alone: no other one now, and none
        overlapping another for as long as the last execution took."""
        now = self._clock()
        with self._lock:
            self._running += 1
            if self._running > 1:
                self._overlap_ns = now
                return False
            return now - self._overlap_ns > self._last_ns

    def leave(self, started_ns: int) -> None:
        """Count an execution that began at ``started_ns`` (this gauge's clock) as ended."""
        now = self._clock()
        with self._lock:
            if self._running > 1:
                self._overlap_ns = now
            self._running -= 1
            self._last_ns = now - started_ns


class AdaptiveThreadsBackend(Backend):
    """One instance: ``narrow`` (its own) or ``wide`` (shared with the model's other instances,
    closed by the instance that ``owns_wide``), chosen per batch through ``gauge``."""

    def __init__(self, narrow: Backend, wide: Backend, gauge: ExecutionGauge,
                 owns_wide: bool) -> None:
        super().__init__()
        self.inputs = narrow.inputs
        self.outputs = narrow.outputs
        self.description = f"{narrow.description}; alone: {wide.description}"
        self._narrow = narrow
        self._wide = wide
        self._gauge = gauge
        self._owns_wide = owns_wide
        #: Batches run on the wide and on the narrow backend (written by the executing thread).
        self.wide_runs = 0
        self.narrow_runs = 0

    def _infer_impl(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        started = self._gauge.now()
        alone = self._gauge.enter()
        try:
            if alone:
                self.wide_runs += 1
                return self._wide.infer(inputs)
            self.narrow_runs += 1
            return self._narrow.infer(inputs)
        finally:
            self._gauge.leave(started)

    def _close_impl(self) -> None:
        self._narrow.close()
        if self._owns_wide:
            self._wide.close()
