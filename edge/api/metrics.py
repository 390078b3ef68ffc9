"""Prometheus metrics with Triton's names, so Triton's Grafana dashboards work unchanged.

prometheus_client appends ``_total`` to every counter it exposes; Triton exposes
``nv_inference_count`` with ``# TYPE nv_inference_count counter``. The Triton families are
therefore written out here in the text format directly (:func:`render_triton`), while the
latency histogram, which has no Triton twin, is an ordinary prometheus_client Histogram in a
per-server registry (no module-level state) appended after them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Histogram, generate_latest

#: Prometheus text exposition format 0.0.4.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LATENCY_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                     5.0, 10.0, 30.0)


@dataclass(frozen=True)
class ModelFigures:
    """One model version's cumulative serving figures, as Triton reports them."""

    model: str
    version: str
    success: int = 0
    failure: int = 0
    inference_count: int = 0  # batch items inferred
    exec_count: int = 0       # backend executions
    pending: int = 0          # requests queued, not yet executing
    request_us: int = 0
    queue_us: int = 0
    compute_infer_us: int = 0


#: (name, type, help, ModelFigures attribute), in Triton's order and wording.
TRITON_FAMILIES: tuple[tuple[str, str, str, str], ...] = (
    ("nv_inference_request_success", "counter",
     "Number of successful inference requests, all batch sizes", "success"),
    ("nv_inference_request_failure", "counter",
     "Number of failed inference requests, all batch sizes", "failure"),
    ("nv_inference_count", "counter",
     "Number of inferences performed (does not include cached requests)", "inference_count"),
    ("nv_inference_exec_count", "counter",
     "Number of model executions performed (does not include cached requests)", "exec_count"),
    ("nv_inference_pending_request_count", "gauge",
     "Instantaneous number of pending requests awaiting execution per-model.", "pending"),
    ("nv_inference_request_duration_us", "counter",
     "Cumulative inference request duration in microseconds (includes cached requests)",
     "request_us"),
    ("nv_inference_queue_duration_us", "counter",
     "Cumulative inference queuing duration in microseconds (includes cached requests)",
     "queue_us"),
    ("nv_inference_compute_infer_duration_us", "counter",
     "Cumulative compute inference duration in microseconds (does not include cached requests)",
     "compute_infer_us"),
)


def _label(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def render_triton(figures: Iterable[ModelFigures]) -> str:
    """The Triton metric families in Prometheus text format, one sample per model version."""
    rows = list(figures)
    out: list[str] = []
    for name, kind, help_text, attr in TRITON_FAMILIES:
        out.append(f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n")
        for row in rows:
            out.append(f'{name}{{model="{_label(row.model)}",version="{_label(row.version)}"}} '
                       f"{int(getattr(row, attr))}\n")
    return "".join(out)


class RequestCounters:
    """What only the front end sees: end-to-end latency, and requests it refused itself.

    Everything else (success, failure, queue and compute time) is counted by the scheduler; a
    request the front end refuses before submitting it (undecodable tensors, unknown output
    names) never reaches the scheduler, so it is counted here and added to the failures.
    Thread-safe; :meth:`observe` is on the hot path and costs one histogram observe.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._refused: dict[tuple[str, str], int] = {}
        self.registry = CollectorRegistry(auto_describe=False)
        self._latency = Histogram(
            "mededge_inference_request_duration_seconds",
            "End-to-end gRPC inference request latency inside the server",
            ("model", "version"), registry=self.registry, buckets=LATENCY_BUCKETS_S)
        self._latency_children: dict[tuple[str, str], Histogram] = {}

    def observe(self, model: str, version: str, duration_ns: int) -> None:
        """One finished request of a known model version, successful or not."""
        child = self._latency_children.get((model, version))
        if child is None:  # labels() costs ~6 us a call: once per model version
            child = self._latency_children.setdefault((model, version),
                                                      self._latency.labels(model, version))
        child.observe(duration_ns / 1e9)

    def refuse(self, model: str, version: str) -> None:
        """One request refused by the front end before it reached the scheduler."""
        with self._lock:
            self._refused[(model, version)] = self._refused.get((model, version), 0) + 1

    def refused(self, model: str, version: str) -> int:
        """How many requests of this model version the front end refused."""
        with self._lock:
            return self._refused.get((model, version), 0)


class MetricsExporter:
    """Renders ``/metrics``: Triton's families from ``figures()``, then the histogram."""

    def __init__(self, figures: Callable[[], list[ModelFigures]],
                 counters: RequestCounters, extra: Callable[[], bytes] | None = None) -> None:
        """``extra`` renders more families appended to the page (the ``mededge_*`` ones)."""
        self._figures = figures
        self._counters = counters
        self._extra = extra

    def exposition(self) -> bytes:
        """The full Prometheus text page."""
        text = render_triton(self._figures())
        page = text.encode() + generate_latest(self._counters.registry)
        return page + self._extra() if self._extra is not None else page
