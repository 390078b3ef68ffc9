"""The public gRPC port served by the native front end (:mod:`edge.api.native`).

ModelInfer and ModelStreamInfer go from the C++ server straight to
:meth:`InferenceServicer.start_infer`, after the same token check the grpcio server's
:class:`~edge.api.auth.AuthInterceptor` makes. Every other method reaches the grpcio server
(:class:`edge.api.grpc_server.GrpcServer`) through the C++ proxy on a Unix socket in a private
directory, with the caller's peer in :data:`PEER_KEY`. The wire, the status codes and the
messages are the same as with grpcio alone: ``tests/edge/api`` runs against this front end.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import grpc

from edge.api import native
from edge.api.auth import TokenStore, bearer_token, is_public, right_for
from edge.api.errors import status_for
from edge.api.inference_service import InferenceServicer, Reply
from edge.core.errors import ConfigError
from edge.core.tls import PemMaterial

log = logging.getLogger(__name__)

#: Metadata key the proxy sets to the caller's peer (a caller's own entry is dropped).
PEER_KEY = "mededge-peer"
_METHODS = {False: "/inference.GRPCInferenceService/ModelInfer",
            True: "/inference.GRPCInferenceService/ModelStreamInfer"}

class NativeFrontend:
    """The C++ server on the public address, and the private socket it proxies to."""

    def __init__(self, servicer: InferenceServicer, tokens: TokenStore | None,
                 public_methods: Sequence[str]) -> None:
        """``tokens`` None: no token is required (``grpc.require_token`` off).

        Raises:
            NativeBuildError: the extension cannot be built here.
        """
        self._module = native.load()
        self._servicer = servicer
        self._tokens = tokens
        self._public = tuple(public_methods)
        self._dir = Path(tempfile.mkdtemp(prefix="mededge-grpc-"))  # 0700: only we connect
        self.upstream = f"unix:{self._dir / 'grpc.sock'}"
        self._frontend: Any = None

    def start(self, address: str, max_message_bytes: int, threads: int,
              tls: PemMaterial | None = None, require_client_cert: bool = False) -> int:
        """Serve ``address`` (the grpcio server must already serve :attr:`upstream`), over
        TLS with ``tls`` (mutual with ``require_client_cert``); the bound port.

        Raises:
            ConfigError: the address cannot be bound.
        """
        self._servicer.forwarded_peer_key = PEER_KEY
        credentials = None if tls is None else (tls.private_key, tls.cert_chain,
                                                tls.root_certificates, require_client_cert)
        try:
            self._frontend = self._module.Frontend(address, self.upstream, self._dispatch,
                                                   max_message_bytes, threads, credentials)
        except OSError as exc:
            raise ConfigError(f"server.grpc_port: cannot bind {address}: {exc}") from exc
        return int(self._frontend.port)

    def stop(self, grace_s: float) -> None:
        """Refuse new calls and give in-flight ones ``grace_s`` (the grpcio server keeps
        serving the proxied ones meanwhile)."""
        if self._frontend is not None:
            self._frontend.stop(grace_s)
        shutil.rmtree(self._dir, ignore_errors=True)

    def _dispatch(self, stream: bool, payload: bytes, remaining: float | None,
                  authorization: str | None, peer: str, reply: Reply, inline: bool
                  ) -> Future[Any] | None:
        """Called by the C++ server for each request; never raises (a failure is answered).
        ``inline``: another front-end thread is free to read requests, so an idle model may
        run this one on the calling thread."""
        try:
            if self._tokens is not None:
                self._authorize(_METHODS[stream], authorization)
            return self._servicer.start_infer(payload, remaining, stream, reply, inline)
        except Exception as exc:
            status = status_for(exc)
            if status.code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                log.warning("gRPC %s from %s refused: %s", _METHODS[stream], peer, exc)
            reply(status.code.value[0], status.message, None)
            return None

    def _authorize(self, method: str, authorization: str | None) -> None:
        """Raises AuthenticationError / PermissionDeniedError as the interceptor would."""
        assert self._tokens is not None
        if is_public(method, self._public):
            return
        metadata = [("authorization", authorization)] if authorization else None
        self._tokens.authorize(bearer_token(metadata), right_for(method), method)
