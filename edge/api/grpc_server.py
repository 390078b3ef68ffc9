"""The gRPC server: KServe v2 inference service, mededge.v1.DicomJobs (with the DICOM path),
grpc.health.v1 and server reflection.

A synchronous grpc server on a thread pool: each inference RPC blocks one worker while its
request waits in the scheduler, which keeps the per-call overhead at one Python function call
and a future wait (measured against grpc.aio, the sync server was not slower here). By default
the public port belongs to the native front end (:mod:`edge.api.native_frontend`), which runs
inference requests itself and proxies every other call to this server on a private Unix
socket (docs/serving-interfaces.md).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from edge.api.auth import AuthInterceptor, TokenStore
from edge.api.errors import ErrorInterceptor
from edge.api.infer_wire import (
    parse_infer_request,
    serialize_infer_response,
    serialize_stream_response,
)
from edge.api.inference_service import InferenceServicer
from edge.api.jobs_service import SERVICE_NAME as JOBS_SERVICE_NAME
from edge.api.jobs_service import JobsServicer, add_to_server
from edge.api.native_frontend import NativeFrontend
from edge.core.config import GrpcSettings
from edge.core.errors import ConfigError
from edge.core.native_build import NativeBuildError
from edge.core.tls import grpc_server_credentials, server_pem
from edge.protos import POOL, inference_pb2

log = logging.getLogger(__name__)

SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


_HANDLER_KINDS = {(False, False): grpc.unary_unary_rpc_method_handler,
                  (False, True): grpc.unary_stream_rpc_method_handler,
                  (True, False): grpc.stream_unary_rpc_method_handler,
                  (True, True): grpc.stream_stream_rpc_method_handler}


def inference_handlers(servicer: InferenceServicer) -> dict[str, grpc.RpcMethodHandler]:
    """The KServe v2 methods, each with protobuf (de)serializers from its descriptor, except
    that ModelInfer and ModelStreamInfer read requests with :func:`parse_infer_request` and
    write answers with :func:`serialize_infer_response` / :func:`serialize_stream_response`
    (no tensor copies)."""
    service = inference_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in service.methods:
        request_type = getattr(inference_pb2, method.input_type.name)
        response_type = getattr(inference_pb2, method.output_type.name)
        deserialize: Callable[[bytes], Any] = request_type.FromString
        serialize: Callable[[Any], bytes] = response_type.SerializeToString
        if method.name in ("ModelInfer", "ModelStreamInfer"):
            deserialize = parse_infer_request
        if method.name == "ModelInfer":
            serialize = serialize_infer_response
        if method.name == "ModelStreamInfer":
            serialize = serialize_stream_response
        make = _HANDLER_KINDS[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = make(getattr(servicer, method.name),
                                     request_deserializer=deserialize,
                                     response_serializer=serialize)
    return handlers


def _reflection_pool() -> descriptor_pool.DescriptorPool:
    """Our private descriptor pool (see edge.protos), with health and reflection added."""
    for module in (health_pb2, reflection_pb2):
        try:
            POOL.FindFileByName(module.DESCRIPTOR.name)
        except KeyError:
            POOL.AddSerializedFile(module.DESCRIPTOR.serialized_pb)
    return POOL


@dataclass(frozen=True)
class GrpcEndpoint:
    """Where a started gRPC server listens."""

    host: str
    port: int


class GrpcServer:
    """Owns the grpc.Server, its health servicer and its thread pool.

    ``grpc.tls`` makes the port TLS only (mutual TLS with ``require_client_cert``);
    ``grpc.require_token`` puts :class:`AuthInterceptor` with ``tokens`` in front of every
    method but ``grpc.public_methods`` (docs/security.md).
    """

    def __init__(self, servicer: InferenceServicer, settings: GrpcSettings,
                 jobs: JobsServicer | None = None, tokens: TokenStore | None = None) -> None:
        """Build the server; :meth:`start` opens the port.

        Raises:
            ConfigError: ``grpc.tls`` names a missing or invalid file, or ``require_token``
                is set without any configured token; the message names the key.
        """
        limit = settings.max_message_bytes
        self._settings, self._servicer = settings, servicer
        self._tokens = tokens if settings.require_token else None  # what the native path checks
        self._native: NativeFrontend | None = None
        self._pem = server_pem(settings.tls, "grpc.tls")  # None: no TLS
        self._credentials = grpc_server_credentials(settings.tls, self._pem)
        interceptors: list[grpc.ServerInterceptor] = [ErrorInterceptor()]
        if settings.require_token:
            if not tokens:
                raise ConfigError("grpc.require_token: no tokens configured (auth.tokens or "
                                  "auth.tokens_file)")
            interceptors.append(AuthInterceptor(tokens, settings.public_methods))
        self._pool = ThreadPoolExecutor(max_workers=settings.max_workers,
                                        thread_name_prefix="grpc")
        self._server = grpc.server(
            self._pool, interceptors=interceptors,
            maximum_concurrent_rpcs=None,
            options=[("grpc.max_receive_message_length", limit),
                     ("grpc.max_send_message_length", limit),
                     ("grpc.so_reuseport", 0)])
        handlers = inference_handlers(servicer)
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
        self._server.add_registered_method_handlers(SERVICE_NAME, handlers)
        self._services: tuple[str, ...] = (SERVICE_NAME,)
        if jobs is not None:
            add_to_server(jobs, self._server)
            self._services += (JOBS_SERVICE_NAME,)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        if settings.reflection:
            reflection.enable_server_reflection(
                (*self._services, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server,
                pool=_reflection_pool())

    def start(self, host: str, port: int) -> GrpcEndpoint:
        """Bind ``host:port`` (0: an ephemeral port) and start serving: through the native
        front end when ``grpc.native_frontend`` is on and it can be built here, else with
        grpcio on that port. ``grpc.tls`` applies to either.

        Raises:
            ConfigError: the address cannot be bound; the message names it.
        """
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if self._settings.native_frontend:
            try:
                self._native = NativeFrontend(self._servicer, self._tokens,
                                              self._settings.public_methods)
            except NativeBuildError as exc:
                log.warning("grpc.native_frontend: not available, serving with grpcio: %s",
                            exc)
            else:
                return self._start_native(host, address)
        try:
            bound = (self._server.add_insecure_port(address) if self._credentials is None
                     else self._server.add_secure_port(address, self._credentials))
        except RuntimeError as exc:
            raise ConfigError(f"server.grpc_port: cannot bind {address}: {exc}") from exc
        if bound == 0:
            raise ConfigError(f"server.grpc_port: cannot bind {address}")
        self._server.start()
        return GrpcEndpoint(host, bound)

    @property
    def frontend(self) -> str:
        """What serves the public port: "native" or "grpcio"."""
        return "native" if self._native is not None else "grpcio"

    def _start_native(self, host: str, address: str) -> GrpcEndpoint:
        assert self._native is not None
        if self._server.add_insecure_port(self._native.upstream) == 0:
            raise ConfigError(f"cannot bind the private socket {self._native.upstream}")
        self._server.start()
        try:
            bound = self._native.start(address, self._settings.max_message_bytes,
                                       self._settings.native_threads,
                                       self._pem, self._settings.tls.require_client_cert)
        except ConfigError:
            self._server.stop(None)
            self._native.stop(0)
            self._native = None
            raise
        log.info("gRPC: native front end on %s, other methods via %s", address,
                 self._native.upstream)
        return GrpcEndpoint(host, bound)

    def set_serving(self, serving: bool) -> None:
        """Report SERVING / NOT_SERVING on grpc.health.v1 for the server and the service."""
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in ("", *self._services):
            self.health.set(name, status)

    def stop(self, grace_s: float) -> None:
        """Refuse new RPCs, let in-flight ones finish for up to ``grace_s``, then stop."""
        self.health.enter_graceful_shutdown()
        if self._native is not None:  # first: its proxied calls need the grpcio server
            self._native.stop(grace_s)
        self._server.stop(grace_s).wait()
        self._pool.shutdown(wait=False)
