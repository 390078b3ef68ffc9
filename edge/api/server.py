"""Wires the service: model manager, the DICOM path, gRPC and HTTP front ends, their lifecycle.

Start order: models (so readiness is true when the ports open), then with ``dicom=True`` the
ledger, the delivery worker (resumes queued deliveries), reconciliation of the spool with the
ledger (power-loss recovery), the orchestrator (resumes unfinished
instances) and the DICOM listener, then gRPC, HTTP. Stop order on SIGTERM: health goes
NOT_SERVING, the DICOM listener stops taking associations, the gRPC server refuses new calls and
lets in-flight ones finish (up to ``server.drain_timeout_s``), the orchestrator drains its
instances and the series being finished, the delivery worker stops after the association in
progress, the manager drains its queues, HTTP closes last so metrics stay scrapable during the
drain. Whatever is not finished stays in the ledger and resumes at the next start.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import pydicom.config

from edge.api.auth import TokenStore
from edge.api.grpc_server import GrpcServer
from edge.api.http_server import HttpServer
from edge.api.inference_service import InferenceServicer
from edge.api.jobs_service import JobsServicer
from edge.api.metrics import MetricsExporter, RequestCounters
from edge.api.sd_notify import Watchdog, service_ready, service_stopping
from edge.api.shared_memory import SharedMemoryRegistry
from edge.api.statistics import model_figures
from edge.core.config import Settings
from edge.dispatch.retry import RetryPolicy
from edge.dispatch.sender import DicomSender
from edge.dispatch.worker import DeliveryWorker
from edge.ingest.listener import DicomListener
from edge.jobs.ledger import DeliveryUpdate, Ledger
from edge.jobs.reconcile import reconcile
from edge.pipeline.metrics import PipelineMetrics
from edge.pipeline.orchestrator import Orchestrator
from edge.scheduler.manager import ModelManager

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BoundPorts:
    """The ports the service actually listens on (differs from settings when those are 0)."""

    host: str
    grpc: int
    http: int
    dicom: int | None = None  # None: the DICOM path is not running


class EdgeServer:
    """The running service. Use :meth:`start`, then :meth:`wait` or :meth:`stop`."""

    def __init__(self, settings: Settings, manager: ModelManager | None = None, *,
                 dicom: bool = False) -> None:
        """``dicom``: also run the DICOM path (listener, orchestrator, deliveries).

        Raises:
            ConfigError: a destination is not AET@HOST:PORT, a TLS file (``grpc.tls``,
                ``http.tls``) or the tokens file is missing or invalid, or authentication is
                required without tokens; the message names the key.
        """
        self.settings = settings
        self.manager = manager if manager is not None else ModelManager(settings)
        self.counters = RequestCounters()
        self.pipeline_metrics = PipelineMetrics()
        self.ledger: Ledger | None = None
        self.delivery: DeliveryWorker | None = None
        self.orchestrator: Orchestrator | None = None
        self.listener: DicomListener | None = None
        self._dicom = dicom
        jobs = JobsServicer(lambda: self.orchestrator) if dicom else None
        tokens = TokenStore.from_settings(settings.auth)
        shared_memory = SharedMemoryRegistry() if settings.grpc.shared_memory else None
        self._grpc = GrpcServer(InferenceServicer(self.manager, self.counters, shared_memory),
                                settings.grpc, jobs, tokens)
        exporter = MetricsExporter(lambda: model_figures(self.manager, self.counters),
                                   self.counters, extra=self.pipeline_metrics.exposition)
        self._http = HttpServer(exporter, self.manager.ready, settings.http, tokens)
        self._stopped = threading.Event()
        self._watchdog: Watchdog | None = None  # systemd (Type=notify, WatchdogSec)
        self.ports: BoundPorts | None = None

    def start(self) -> BoundPorts:
        """Load the models and open the ports.

        Raises:
            ConfigError: a port cannot be bound.
            RepositoryError: the repository cannot be read.
        """
        server = self.settings.server
        # pydicom's warnings on invalid values quote the value: a malformed Patient's Name or a
        # UID carrying one would reach the log. Our own validation names the attribute only.
        pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
        self.manager.start()
        dicom_port = self._start_dicom() if self._dicom else None
        grpc_endpoint = self._grpc.start(server.bind, server.grpc_port)
        self._grpc.set_serving(True)
        http_port = self._http.start(self.settings.http.bind or server.bind, server.http_port)
        self.ports = BoundPorts(server.bind, grpc_endpoint.port, http_port, dicom_port)
        self._watchdog = service_ready(lambda: not self._stopped.is_set())
        log.info("serving: grpc %s:%d (%s), http %s:%d, dicom %s", server.bind,
                 grpc_endpoint.port, self._grpc.frontend, server.bind, http_port, dicom_port)
        return self.ports

    @property
    def grpc_frontend(self) -> str:
        """What serves the gRPC port: "native" (the C++ front end) or "grpcio"."""
        return self._grpc.frontend

    def _start_dicom(self) -> int:
        """Ledger, delivery worker, orchestrator, listener; return the DICOM port.

        Raises:
            LedgerError: the ledger is unusable.
            OSError: the spool cannot be created or the port bound.
        """
        settings = self.settings
        self.ledger = Ledger(settings.spool.ledger or settings.server.data_dir / "ledger.sqlite3")
        self.delivery = DeliveryWorker(
            self.ledger, DicomSender(settings.dispatch),
            RetryPolicy.from_settings(settings.dispatch),
            max_batch=settings.dispatch.max_batch,
            max_destinations=settings.dispatch.max_destinations,
            on_outcome=self._delivery_outcome)
        self.delivery.start()
        self.orchestrator = Orchestrator(settings, self.ledger, self.manager, self.delivery,
                                         self.pipeline_metrics)
        self.listener = DicomListener(settings, self.orchestrator.recorder,
                                      self.orchestrator.on_release)
        # power-loss recovery: spool files the ledger lost are recorded before anything resumes
        reconcile(self.listener.spool, self.ledger)
        self.orchestrator.start(self.listener.spool)
        port = self.listener.start()
        self.pipeline_metrics.watch_ingest(self.listener.stats.snapshot, self.listener.spool.root)
        return port

    def _delivery_outcome(self, update: DeliveryUpdate) -> None:
        if self.orchestrator is not None:  # metrics, result events, slice pruning
            self.orchestrator.delivery_outcome(update)
        else:
            self.pipeline_metrics.delivery_outcome(update.delivery_id, str(update.state.value))

    def stop(self, drain_timeout_s: float | None = None) -> None:
        """Drain in-flight requests (up to ``drain_timeout_s``) and release everything."""
        if self._stopped.is_set():
            return
        timeout = self.settings.server.drain_timeout_s if drain_timeout_s is None \
            else drain_timeout_s
        log.info("stopping: draining for up to %.1f s", timeout)
        service_stopping(self._watchdog)
        self._grpc.set_serving(False)
        if self.listener is not None:
            self.listener.stop()
        self._grpc.stop(timeout)
        if self.orchestrator is not None:
            self.orchestrator.stop(timeout)
        if self.delivery is not None:
            self.delivery.stop(timeout)
        self.manager.close(timeout)
        if self.ledger is not None:
            self.ledger.close()
        self._http.stop()
        self._stopped.set()
        log.info("stopped")

    def wait(self, timeout: float | None = None) -> bool:
        """Block until :meth:`stop` finished; True if it did within ``timeout``."""
        return self._stopped.wait(timeout)

    def __enter__(self) -> EdgeServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
