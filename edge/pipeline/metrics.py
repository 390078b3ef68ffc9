"""The ``mededge_*`` Prometheus families of the DICOM path.

Counters the pipeline updates itself (series completed, instance outcomes, deliveries, the time
from the last instance received to each result delivered) live in a per-server
``CollectorRegistry``; the listener's own counters (:class:`edge.ingest.stats.IngestStats`) and
the spool's usage are read at scrape time by a collector, so nothing is counted twice.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edge.ingest.stats import IngestSnapshot

#: Seconds from the last instance's C-STORE to a result accepted by the destination.
TIME_TO_RESULT_BUCKETS_S = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 30.0,
                            60.0, 120.0, 300.0)
_SPOOL_SCAN_INTERVAL_S = 10.0


def _tree_bytes(root: Path) -> int:
    total = 0
    stack = [root]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
            except OSError:
                continue  # removed while scanning
    return total


class _IngestCollector(Collector):
    """Reads the listener's counters and the spool's usage when /metrics is scraped."""

    def __init__(self, snapshot: Callable[[], IngestSnapshot], spool_dir: Path) -> None:
        self._snapshot = snapshot
        self._spool = spool_dir
        self._lock = threading.Lock()
        self._spool_bytes = 0
        self._scanned_at = -_SPOOL_SCAN_INTERVAL_S

    def _spool_usage(self) -> tuple[int, int]:
        with self._lock:
            now = time.monotonic()
            if now - self._scanned_at >= _SPOOL_SCAN_INTERVAL_S:
                self._spool_bytes = _tree_bytes(self._spool)
                self._scanned_at = now
            used = self._spool_bytes
        try:
            stat = os.statvfs(self._spool)
            free = stat.f_bavail * stat.f_frsize
        except OSError:
            free = 0
        return used, free

    def describe(self) -> Iterator[Metric]:
        """The families without their values (so registering does not scan the spool)."""
        yield CounterMetricFamily("mededge_associations", "DICOM associations")
        yield CounterMetricFamily("mededge_instances_received", "C-STORE instances stored")
        yield CounterMetricFamily("mededge_received_bytes", "bytes of datasets stored")
        yield CounterMetricFamily("mededge_instances_rejected", "C-STORE failures")
        yield GaugeMetricFamily("mededge_spool_bytes", "bytes held in the spool")
        yield GaugeMetricFamily("mededge_spool_free_bytes", "free space on the spool's disk")

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        accepted = CounterMetricFamily("mededge_associations", "DICOM associations",
                                       labels=["outcome", "reason"])
        accepted.add_metric(["accepted", ""], snap.associations_accepted)
        for reason, count in sorted(snap.associations_rejected.items()):
            accepted.add_metric(["rejected", reason], count)
        yield accepted
        instances = CounterMetricFamily("mededge_instances_received",
                                        "C-STORE instances answered with success",
                                        labels=["kind"])
        instances.add_metric(["new"], snap.instances_received)
        instances.add_metric(["duplicate"], snap.instances_duplicate)
        yield instances
        yield CounterMetricFamily("mededge_received_bytes", "bytes of datasets stored",
                                  value=snap.bytes_received)
        rejected = CounterMetricFamily("mededge_instances_rejected",
                                       "C-STORE requests answered with a failure status",
                                       labels=["status"])
        for status, count in sorted(snap.stores_failed.items()):
            rejected.add_metric([f"{status:04X}"], count)
        yield rejected
        used, free = self._spool_usage()
        yield GaugeMetricFamily("mededge_spool_bytes", "bytes held in the spool", value=used)
        yield GaugeMetricFamily("mededge_spool_free_bytes", "free space on the spool's disk",
                                value=free)


class PipelineMetrics:
    """The pipeline's counters and histogram; :meth:`exposition` renders every family."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.series_completed = Counter(
            "mededge_series_completed", "series found complete, by what completed them",
            ["reason"], registry=self.registry)
        self.instances_processed = Counter(
            "mededge_instances_processed", "instances through the pipeline, by outcome",
            ["outcome"], registry=self.registry)
        self.results_written = Counter(
            "mededge_results_written", "SEG / SR objects written", ["kind"],
            registry=self.registry)
        self.deliveries = Counter(
            "mededge_deliveries", "delivery attempts by outcome (done/failed/dead)",
            ["outcome"], registry=self.registry)
        self.time_to_result = Histogram(
            "mededge_time_to_result_seconds",
            "from the last instance of a series received to a result accepted by a destination",
            ["kind"], buckets=TIME_TO_RESULT_BUCKETS_S, registry=self.registry)
        self._lock = threading.Lock()
        self._awaiting: dict[int, tuple[float, str]] = {}  # delivery id -> (last received, kind)

    def watch_ingest(self, snapshot: Callable[[], IngestSnapshot], spool_dir: Path) -> None:
        """Export the listener's counters and the spool usage too (call once)."""
        self.registry.register(_IngestCollector(snapshot, spool_dir))

    def delivery_queued(self, delivery_id: int, last_received_at: float, kind: str) -> None:
        """Remember when the series' last instance arrived (``time.time()``)."""
        with self._lock:
            self._awaiting[delivery_id] = (last_received_at, kind)

    def delivery_outcome(self, delivery_id: int, state: str) -> None:
        """Count an attempt's outcome; a first success observes the time to result."""
        self.deliveries.labels(state).inc()
        if state in ("done", "dead"):
            with self._lock:
                awaited = self._awaiting.pop(delivery_id, None)
            if awaited is not None and state == "done":
                self.time_to_result.labels(awaited[1]).observe(
                    max(0.0, time.time() - awaited[0]))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
