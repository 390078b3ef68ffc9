"""The HTTP side: ``/metrics`` (Prometheus text), ``/v2/health/live``, ``/v2/health/ready``.

The standard library's threading HTTP server in one daemon thread; handlers get their
dependencies from the server object, not from globals. Optional (``http:`` settings, see
docs/security.md): TLS, with the handshake in each request's thread so a silent client stops
no one; a bearer token with the ``metrics`` right on ``/metrics`` (``Authorization: Bearer
<token>``, or Basic with the token's configured name as user and the token as password, as
Prometheus' ``basic_auth`` sends), and on the health endpoints with ``health_auth``.
"""

from __future__ import annotations

import base64
import binascii
import logging
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from edge.api.auth import (
    AuthenticationError,
    PermissionDeniedError,
    TokenStore,
    bearer_token,
)
from edge.api.metrics import CONTENT_TYPE, MetricsExporter
from edge.core.config import HttpSettings
from edge.core.errors import ConfigError
from edge.core.tls import server_context

log = logging.getLogger(__name__)

_HEALTH = ("/v2/health/live", "/v2/health/ready")
_CHALLENGE = 'Bearer realm="mededge", Basic realm="mededge"'


@dataclass(frozen=True)
class _Guard:
    """Which paths need a ``metrics`` token, and the tokens."""

    tokens: TokenStore | None
    metrics: bool
    health: bool

    def protects(self, path: str) -> bool:
        return (self.metrics and path == "/metrics") or (self.health and path in _HEALTH)


@dataclass(frozen=True)
class _Credentials:
    """What an Authorization header carries: a token, and with Basic the user it names."""

    token: str | None
    user: str | None = None


def _credentials(header: str | None) -> _Credentials:
    if not header:
        return _Credentials(None)
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return _Credentials(bearer_token([("authorization", header)]))
    try:
        user, _, password = base64.b64decode(value.strip(), validate=True).decode(
            "utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return _Credentials(None)
    return _Credentials(password or None, user)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], exporter: MetricsExporter,
                 ready: Callable[[], bool], tls: ssl.SSLContext | None, guard: _Guard) -> None:
        super().__init__(address, _Handler)
        self.exporter = exporter
        self.ready = ready
        self.tls = tls
        self.guard = guard

    def process_request_thread(self, request: socket.socket,  # type: ignore[override]
                               client_address: tuple[str, int]) -> None:
        if self.tls is not None:
            try:
                request = self.tls.wrap_socket(request, server_side=True)
                request.do_handshake()  # here, in this request's thread
            except (OSError, ValueError) as exc:
                log.debug("http %s: TLS handshake failed: %s", client_address[0], exc)
                self.shutdown_request(request)
                return
        super().process_request_thread(request, client_address)

    def authorize(self, path: str, header: str | None) -> None:
        """Raises AuthenticationError / PermissionDeniedError when ``path`` is protected and
        the header's token is missing, unknown, or lacks the ``metrics`` right."""
        if not self.guard.protects(path):
            return
        given = _credentials(header)
        if self.guard.tokens is None:
            raise AuthenticationError("no tokens configured")
        principal = self.guard.tokens.authorize(given.token, "metrics", path)
        if given.user is not None and given.user != principal.name:
            raise AuthenticationError("the basic auth user is not the token's name")


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = self.path.split("?", 1)[0]
        try:
            self.server.authorize(path, self.headers.get("Authorization"))
        except AuthenticationError:
            self._send(401, b"unauthorized\n", "text/plain", _CHALLENGE)
            return
        except PermissionDeniedError:
            self._send(403, b"forbidden\n", "text/plain")
            return
        if path == "/metrics":
            self._send(200, self.server.exporter.exposition(), CONTENT_TYPE)
        elif path == "/v2/health/live":
            self._send(200, b"", "text/plain")
        elif path == "/v2/health/ready":
            self._send(200 if self.server.ready() else 503, b"", "text/plain")
        else:
            self._send(404, b"not found\n", "text/plain")

    def _send(self, code: int, body: bytes, content_type: str,
              challenge: str | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if challenge is not None:
            self.send_header("WWW-Authenticate", challenge)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        log.debug("http %s " + format, self.address_string(), *args)


class HttpServer:
    """Serves metrics and health in a background thread."""

    def __init__(self, exporter: MetricsExporter, ready: Callable[[], bool],
                 settings: HttpSettings | None = None, tokens: TokenStore | None = None,
                 handshake_timeout_s: float = 10.0) -> None:
        """Build the server; :meth:`start` opens the port.

        Raises:
            ConfigError: ``http.tls`` names a missing or invalid file, or a protected path
                is configured without any token; the message names the key.
        """
        settings = settings if settings is not None else HttpSettings()
        if (settings.metrics_auth or settings.health_auth) and not tokens:
            key = "http.metrics_auth" if settings.metrics_auth else "http.health_auth"
            raise ConfigError(f"{key}: no tokens configured (auth.tokens or auth.tokens_file)")
        self._exporter = exporter
        self._ready = ready
        self._tls = server_context(settings.tls, "http.tls", handshake_timeout_s)
        self._guard = _Guard(tokens, settings.metrics_auth, settings.health_auth)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self, host: str, port: int) -> int:
        """Bind and serve; returns the bound port.

        Raises:
            ConfigError: the address cannot be bound; the message names it.
        """
        try:
            self._server = _Server((host, port), self._exporter, self._ready, self._tls,
                                   self._guard)
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
