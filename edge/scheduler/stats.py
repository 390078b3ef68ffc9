"""Per model-version statistics, shaped like Triton's ModelStatistics.

They feed the ModelStatistics RPC and the Prometheus collector (``nv_inference_*``). Durations
are nanoseconds, counts are cumulative since the version was loaded.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

#: Failure reasons, as Triton labels ``nv_inference_request_failure``.
REASON_REJECTED = "REJECTED"      # queue full, invalid input
REASON_CANCELED = "CANCELED"      # caller went away, deadline passed, unloaded
REASON_BACKEND = "BACKEND"        # the backend failed
REASON_OTHER = "OTHER"


@dataclass(frozen=True)
class DurationStat:
    """How many times something happened and its total duration."""

    count: int = 0
    ns: int = 0


@dataclass(frozen=True)
class InferenceStats:
    """Request-level counters (Triton's InferStatistics)."""

    success: DurationStat = DurationStat()
    fail: DurationStat = DurationStat()
    queue: DurationStat = DurationStat()
    compute_input: DurationStat = DurationStat()
    compute_infer: DurationStat = DurationStat()
    compute_output: DurationStat = DurationStat()


@dataclass(frozen=True)
class BatchStats:
    """Executions of one batch size (Triton's InferBatchStatistics)."""

    batch_size: int
    compute_input: DurationStat = DurationStat()
    compute_infer: DurationStat = DurationStat()
    compute_output: DurationStat = DurationStat()


@dataclass(frozen=True)
class ModelStatistics:
    """A snapshot of one model version's counters.

    ``inference_count`` counts items (a batch-4 request counts 4), ``execution_count`` counts
    backend executions (batches); their ratio is the achieved batch size.
    """

    name: str
    version: int
    last_inference_ms: int = 0  # wall clock, ms since the epoch; 0: never
    inference_count: int = 0
    execution_count: int = 0
    pending_count: int = 0
    inference_stats: InferenceStats = InferenceStats()
    batch_stats: tuple[BatchStats, ...] = ()
    failures_by_reason: Mapping[str, int] = field(default_factory=dict)


class _Acc:
    __slots__ = ("count", "ns")

    def __init__(self) -> None:
        self.count = 0
        self.ns = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns

    def freeze(self) -> DurationStat:
        return DurationStat(self.count, self.ns)


class StatsRecorder:
    """Thread-safe accumulators behind one ModelStatistics; cheap enough for the hot path."""

    def __init__(self, name: str, version: int) -> None:
        self._name = name
        self._version = version
        self._lock = threading.Lock()
        self._last_ms = 0
        self._inferences = 0
        self._executions = 0
        self._success = _Acc()
        self._fail = _Acc()
        self._queue = _Acc()
        self._input = _Acc()
        self._infer = _Acc()
        self._output = _Acc()
        self._batches: dict[int, tuple[_Acc, _Acc, _Acc]] = {}
        self._reasons: dict[str, int] = {}

    def record_execution(self, batch_size: int, input_ns: int, infer_ns: int,
                         output_ns: int) -> None:
        """One backend execution of ``batch_size`` items."""
        with self._lock:
            self._executions += 1
            self._inferences += batch_size
            self._last_ms = time.time_ns() // 1_000_000
            accs = self._batches.get(batch_size)
            if accs is None:
                accs = self._batches[batch_size] = (_Acc(), _Acc(), _Acc())
            accs[0].add(input_ns)
            accs[1].add(infer_ns)
            accs[2].add(output_ns)

    def record_success(self, total_ns: int, queue_ns: int, input_ns: int, infer_ns: int,
                       output_ns: int) -> None:
        """One request answered; durations are its share of the batch it ran in."""
        with self._lock:
            self._success.add(total_ns)
            self._queue.add(queue_ns)
            self._input.add(input_ns)
            self._infer.add(infer_ns)
            self._output.add(output_ns)

    def record_failure(self, total_ns: int, reason: str) -> None:
        """One request failed (rejected, cancelled, expired or a backend error)."""
        with self._lock:
            self._fail.add(total_ns)
            self._reasons[reason] = self._reasons.get(reason, 0) + 1

    def snapshot(self, pending: int) -> ModelStatistics:
        with self._lock:
            return ModelStatistics(
                name=self._name, version=self._version, last_inference_ms=self._last_ms,
                inference_count=self._inferences, execution_count=self._executions,
                pending_count=pending,
                inference_stats=InferenceStats(
                    self._success.freeze(), self._fail.freeze(), self._queue.freeze(),
                    self._input.freeze(), self._infer.freeze(), self._output.freeze()),
                batch_stats=tuple(BatchStats(size, a.freeze(), b.freeze(), c.freeze())
                                  for size, (a, b, c) in sorted(self._batches.items())),
                failures_by_reason=dict(self._reasons))
