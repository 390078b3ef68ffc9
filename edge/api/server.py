"""Wires the service: model manager, gRPC and HTTP front ends, and their lifecycle.

Start order: models (so readiness is true when the ports open), gRPC, HTTP. Stop order on
SIGTERM: health goes NOT_SERVING, the gRPC server refuses new calls and lets in-flight ones
finish (up to ``server.drain_timeout_s``), the manager drains its queues, HTTP closes last so
metrics stay scrapable during the drain.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from edge.api.grpc_server import GrpcServer
from edge.api.http_server import HttpServer
from edge.api.inference_service import InferenceServicer
from edge.api.metrics import MetricsExporter, RequestCounters
from edge.api.statistics import model_figures
from edge.core.config import Settings
from edge.scheduler.manager import ModelManager

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BoundPorts:
    """The ports the service actually listens on (differs from settings when those are 0)."""

    host: str
    grpc: int
    http: int


class EdgeServer:
    """The running service. Use :meth:`start`, then :meth:`wait` or :meth:`stop`."""

    def __init__(self, settings: Settings, manager: ModelManager | None = None) -> None:
        self.settings = settings
        self.manager = manager if manager is not None else ModelManager(settings)
        self.counters = RequestCounters()
        self._grpc = GrpcServer(InferenceServicer(self.manager, self.counters), settings.grpc)
        exporter = MetricsExporter(lambda: model_figures(self.manager, self.counters),
                                   self.counters)
        self._http = HttpServer(exporter, self.manager.ready)
        self._stopped = threading.Event()
        self.ports: BoundPorts | None = None

    def start(self) -> BoundPorts:
        """Load the models and open the ports.

        Raises:
            ConfigError: a port cannot be bound.
            RepositoryError: the repository cannot be read.
        """
        server = self.settings.server
        self.manager.start()
        grpc_endpoint = self._grpc.start(server.bind, server.grpc_port)
        self._grpc.set_serving(True)
        http_port = self._http.start(server.bind, server.http_port)
        self.ports = BoundPorts(server.bind, grpc_endpoint.port, http_port)
        log.info("serving: grpc %s:%d, http %s:%d", server.bind, grpc_endpoint.port,
                 server.bind, http_port)
        return self.ports

    def stop(self, drain_timeout_s: float | None = None) -> None:
        """Drain in-flight requests (up to ``drain_timeout_s``) and release everything."""
        if self._stopped.is_set():
            return
        timeout = self.settings.server.drain_timeout_s if drain_timeout_s is None \
            else drain_timeout_s
        log.info("stopping: draining for up to %.1f s", timeout)
        self._grpc.set_serving(False)
        self._grpc.stop(timeout)
        self.manager.close(timeout)
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
