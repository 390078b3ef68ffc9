"""The HTTP side: ``/metrics`` (Prometheus text), ``/v2/health/live``, ``/v2/health/ready``.

The standard library's threading HTTP server in one daemon thread; handlers get their
dependencies from the server object, not from globals.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from edge.api.metrics import CONTENT_TYPE, MetricsExporter
from edge.core.errors import ConfigError

log = logging.getLogger(__name__)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], exporter: MetricsExporter,
                 ready: Callable[[], bool]) -> None:
        super().__init__(address, _Handler)
        self.exporter = exporter
        self.ready = ready


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, self.server.exporter.exposition(), CONTENT_TYPE)
        elif path == "/v2/health/live":
            self._send(200, b"", "text/plain")
        elif path == "/v2/health/ready":
            self._send(200 if self.server.ready() else 503, b"", "text/plain")
        else:
            self._send(404, b"not found\n", "text/plain")

    def _send(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        log.debug("http %s " + format, self.address_string(), *args)


class HttpServer:
    """Serves metrics and health in a background thread."""

    def __init__(self, exporter: MetricsExporter, ready: Callable[[], bool]) -> None:
        self._exporter = exporter
        self._ready = ready
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self, host: str, port: int) -> int:
        """Bind and serve; returns the bound port.

        Raises:
            ConfigError: the address cannot be bound; the message names it.
        """
        try:
            self._server = _Server((host, port), self._exporter, self._ready)
        except OSError as exc:
            raise ConfigError(f"server.http_port: cannot bind {host}:{port}: {exc}") from exc
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.2}, name="http", daemon=True)
        self._thread.start()
        return int(self._server.server_address[1])

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
