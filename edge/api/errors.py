"""The one place where runtime errors become gRPC status codes.

:func:`status_for` is the mapping; :class:`ErrorInterceptor` applies it to every unary and
streaming handler of the gRPC server, so servicers simply raise :mod:`edge.core.errors` types.
The streaming inference RPC reports per-request errors in its responses' ``error_message``
instead of ending the stream; it uses :func:`status_for` for the text so both paths agree.
"""

from __future__ import annotations

import concurrent.futures
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from edge.api.auth import AuthenticationError, PermissionDeniedError
from edge.api.shared_memory import SharedMemoryExistsError, SharedMemoryNotFoundError
from edge.core import errors
from edge.jobs.queries import SeriesNotFoundError

log = logging.getLogger(__name__)

#: Exception type -> gRPC code. Order matters only for subclasses (none overlap today).
_CODES: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (AuthenticationError, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (errors.ModelNotFoundError, grpc.StatusCode.NOT_FOUND),
    (SeriesNotFoundError, grpc.StatusCode.NOT_FOUND),
    (SharedMemoryNotFoundError, grpc.StatusCode.NOT_FOUND),
    (SharedMemoryExistsError, grpc.StatusCode.ALREADY_EXISTS),
    (errors.ModelNotReadyError, grpc.StatusCode.UNAVAILABLE),
    (errors.InvalidInputError, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.QueueFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.DeadlineExceededError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.CancelledError, grpc.StatusCode.CANCELLED),
    (concurrent.futures.CancelledError, grpc.StatusCode.CANCELLED),
    (errors.ConfigError, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.RepositoryError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.BackendError, grpc.StatusCode.INTERNAL),
)


@dataclass(frozen=True)
class GrpcStatus:
    """A gRPC status code and the message sent with it."""

    code: grpc.StatusCode
    message: str


def status_for(exc: BaseException) -> GrpcStatus:
    """The gRPC status for ``exc``; unexpected exceptions are INTERNAL (and logged)."""
    for kind, code in _CODES:
        if isinstance(exc, kind):
            return GrpcStatus(code, str(exc) or kind.__name__)
    if isinstance(exc, errors.MededgeError):
        return GrpcStatus(grpc.StatusCode.INTERNAL, str(exc))
    log.exception("unexpected error in a gRPC handler", exc_info=exc)
    return GrpcStatus(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}")


def _abort(context: grpc.ServicerContext, exc: BaseException) -> None:
    status = status_for(exc)
    if status.code is not grpc.StatusCode.CANCELLED:
        log.debug("gRPC call failed: %s: %s", status.code.name, status.message)
    context.abort(status.code, status.message)


def _wrap_unary(behavior: Callable[[Any, grpc.ServicerContext], Any]) -> Callable[..., Any]:
    def unary(request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return behavior(request, context)
        except Exception as exc:
            if _is_abort(exc):
                raise
            _abort(context, exc)
            raise  # unreachable: abort raises

    return unary


def _wrap_stream(behavior: Callable[[Any, grpc.ServicerContext], Iterator[Any]]
                 ) -> Callable[..., Iterator[Any]]:
    def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            yield from behavior(request, context)
        except Exception as exc:
            if _is_abort(exc):
                raise
            _abort(context, exc)

    return stream


def _is_abort(exc: BaseException) -> bool:
    # grpc's context.abort() records the status and raises a bare ``Exception()``; let it through.
    return type(exc) is Exception


class ErrorInterceptor(grpc.ServerInterceptor):
    """Turns exceptions escaping any handler into the status :func:`status_for` gives."""

    def intercept_service(self, continuation: Callable[[Any], Any],
                          handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=_wrap_unary(handler.unary_unary))
        if handler.unary_stream is not None:
            return handler._replace(unary_stream=_wrap_stream(handler.unary_stream))
        if handler.stream_unary is not None:
            return handler._replace(stream_unary=_wrap_unary(handler.stream_unary))
        if handler.stream_stream is not None:
            return handler._replace(stream_stream=_wrap_stream(handler.stream_stream))
        return handler
