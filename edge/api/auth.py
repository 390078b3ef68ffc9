"""Bearer-token authentication and rights for the gRPC and HTTP front ends.

Tokens are configured as the sha256 of the token (``auth.tokens``, ``auth.tokens_file``), so
the settings never hold a usable secret; a presented token is hashed and compared with every
entry by :func:`hmac.compare_digest`. Each token carries rights:

- ``infer``: ModelInfer, ModelStreamInfer, model/server metadata, ModelReady, ModelConfig,
  ModelStatistics and the mededge.v1 jobs API (submit, watch, get, list);
- ``repository``: RepositoryIndex, RepositoryModelLoad, RepositoryModelUnload;
- ``metrics``: the HTTP ``/metrics`` page (and health, when ``http.health_auth``).

:class:`AuthInterceptor` checks every gRPC call except ``grpc.public_methods`` (health,
reflection by default). A missing or unknown token raises :class:`AuthenticationError`
(UNAUTHENTICATED), a token without the right :class:`PermissionDeniedError`
(PERMISSION_DENIED); edge/api/errors.py maps both, as every other error. Tokens are never
logged: log lines name the token's configured ``name`` only.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import yaml
from pydantic import TypeAdapter, ValidationError

from edge.core.config import AuthSettings, TokenEntry
from edge.core.errors import ConfigError, MededgeError

log = logging.getLogger(__name__)

_INFERENCE = "/inference.GRPCInferenceService/"
#: Methods that need the ``repository`` right; every other checked method needs ``infer``.
REPOSITORY_METHODS = frozenset(_INFERENCE + name for name in (
    "RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload"))


class AuthenticationError(MededgeError):
    """No token, or one that matches no configured token (gRPC UNAUTHENTICATED, HTTP 401)."""


class PermissionDeniedError(MededgeError):
    """A valid token without the right the call needs (gRPC PERMISSION_DENIED, HTTP 403)."""


@dataclass(frozen=True)
class Principal:
    """Who a valid token belongs to: its configured name and rights."""

    name: str
    rights: frozenset[str]


def token_digest(token: str) -> str:
    """The hex sha256 of a token, as configured in ``auth.tokens[].sha256``."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _read_tokens_file(path: Path) -> tuple[TokenEntry, ...]:
    try:
        loaded = yaml.safe_load(path.read_text()) or []
    except OSError as exc:
        raise ConfigError(f"auth.tokens_file: {path}: cannot read: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"auth.tokens_file: {path}: not valid YAML: {exc}") from exc
    try:
        return TypeAdapter(tuple[TokenEntry, ...]).validate_python(loaded)
    except ValidationError as exc:
        where = "; ".join(".".join(str(p) for p in e["loc"]) + ": " + e["msg"]
                          for e in exc.errors())
        raise ConfigError(f"auth.tokens_file: {path}: {where}") from exc


class TokenStore:
    """The configured tokens, by digest. Immutable after construction."""

    def __init__(self, entries: Iterable[TokenEntry]) -> None:
        self._entries = tuple((e.sha256, Principal(e.name, frozenset(e.rights)))
                              for e in entries)

    @classmethod
    def from_settings(cls, settings: AuthSettings) -> TokenStore:
        """``auth.tokens`` plus the entries of ``auth.tokens_file`` (a YAML list of
        ``{name, sha256, rights}``).

        Raises:
            ConfigError: the tokens file cannot be read or an entry is invalid; names the key.
        """
        entries = list(settings.tokens)
        if settings.tokens_file is not None:
            entries += _read_tokens_file(settings.tokens_file)
        names = [e.name for e in entries]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(f"auth.tokens: names must be unique: {duplicates}")
        return cls(entries)

    def __len__(self) -> int:
        return len(self._entries)

    def authenticate(self, token: str) -> Principal | None:
        """The principal whose digest matches ``token``; None when none does. Every entry is
        compared (constant time per entry), so timing does not tell which one is close."""
        digest = token_digest(token)
        found: Principal | None = None
        for expected, principal in self._entries:
            if hmac.compare_digest(digest, expected):
                found = principal
        return found

    def authorize(self, token: str | None, right: str, what: str) -> Principal:
        """The principal for ``token`` if it holds ``right``.

        Raises:
            AuthenticationError: no token, or an unknown one.
            PermissionDeniedError: the token lacks ``right``; the message names the token's
                configured name, ``right`` and ``what``.
        """
        principal = self.authenticate(token) if token else None
        if principal is None:
            raise AuthenticationError("a valid bearer token is required "
                                      "(metadata 'authorization: Bearer <token>')")
        if right not in principal.rights:
            raise PermissionDeniedError(f"token {principal.name!r} lacks the {right!r} right "
                                        f"for {what}")
        return principal


def bearer_token(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    """The token of an ``authorization: Bearer <token>`` entry, if any."""
    for key, value in metadata or ():
        if key.lower() == "authorization" and isinstance(value, str):
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


def right_for(method: str) -> str:
    """The right a gRPC method (``/package.Service/Method``) needs."""
    return "repository" if method in REPOSITORY_METHODS else "infer"


def is_public(method: str, public_methods: Sequence[str]) -> bool:
    """Whether ``method`` needs no token: listed in full, or under a listed ``/service/``."""
    return any(method == p or (p.endswith("/") and method.startswith(p))
               for p in public_methods)


def _raising(exc: MededgeError) -> Callable[..., Any]:
    kind, message = type(exc), str(exc)

    def deny(request: Any, context: grpc.ServicerContext) -> Any:
        raise kind(message)  # a fresh exception per call: calls run on many threads

    return deny


class AuthInterceptor(grpc.ServerInterceptor):
    """Checks the bearer token and its rights before any handler runs.

    Place it after :class:`edge.api.errors.ErrorInterceptor`, which turns the errors raised
    here into UNAUTHENTICATED / PERMISSION_DENIED.
    """

    def __init__(self, tokens: TokenStore, public_methods: Sequence[str]) -> None:
        self._tokens = tokens
        self._public = tuple(public_methods)


    def intercept_service(self, continuation: Callable[[Any], Any],
                          handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(handler_call_details)
        method = str(handler_call_details.method)
        if handler is None or is_public(method, self._public):
            return handler
        try:
            self._tokens.authorize(bearer_token(handler_call_details.invocation_metadata),
                                   right_for(method), method)
        except (AuthenticationError, PermissionDeniedError) as exc:
            log.warning("gRPC %s refused: %s", method, exc)
            deny = _raising(exc)
            for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
                if getattr(handler, kind) is not None:
                    return handler._replace(**{kind: deny})
        return handler
