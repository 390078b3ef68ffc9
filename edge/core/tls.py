"""TLS contexts and gRPC credentials built from the ``tls`` settings of each front end.

Every failure (a file missing or unreadable, a PEM that does not parse, a key that does not
match its certificate) is a :class:`ConfigError` naming the settings key, e.g.
``dicom.tls.cert_file: /etc/mededge/tls/server.pem: no such file``, so the server stops at
start-up with a message an engineer can act on. TLS 1.2 is the floor (BCP 195, which DICOM's
TLS profiles in PS3.15 Annex B follow).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge.core.config import ClientTlsSettings, ServerTlsSettings
from edge.core.errors import ConfigError


def read_pem(path: Path, key: str) -> bytes:
    """The bytes of a PEM file.

    Raises:
        ConfigError: the file cannot be read or holds no PEM block; names ``key`` and the path.
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError as exc:
        raise ConfigError(f"{key}: {path}: no such file") from exc
    except OSError as exc:
        raise ConfigError(f"{key}: {path}: cannot read: {exc.strerror}") from exc
    if b"-----BEGIN " not in data:
        raise ConfigError(f"{key}: {path}: not a PEM file")
    return data


def _load_chain(context: ssl.SSLContext, cert: Path, private_key: Path, key: str) -> None:
    read_pem(cert, f"{key}.cert_file")
    read_pem(private_key, f"{key}.key_file")
    try:
        context.load_cert_chain(str(cert), str(private_key))
    except ssl.SSLError as exc:
        raise ConfigError(f"{key}.cert_file/key_file: {cert}, {private_key}: not a usable "
                          f"certificate and matching unencrypted key: {exc.reason}") from exc


def _load_ca(context: ssl.SSLContext, ca: Path, key: str) -> None:
    read_pem(ca, f"{key}.ca_file")
    try:
        context.load_verify_locations(cafile=str(ca))
    except ssl.SSLError as exc:
        raise ConfigError(f"{key}.ca_file: {ca}: no usable CA certificate: {exc.reason}") from exc


class DeferredHandshakeContext(ssl.SSLContext):
    """A server context whose sockets do the TLS handshake on first read, not on accept.

    pynetdicom wraps each accepted socket in its one accept thread, and by default the
    handshake runs right there: a client that connects and says nothing would stop the
    listener for everyone. Deferred, the handshake runs in the association's own thread (the
    first ``recv``), bounded by ``handshake_timeout_s``.
    """

    handshake_timeout_s: float | None = None

    def wrap_socket(self, sock: Any, server_side: bool = False,  # type: ignore[override]
                    do_handshake_on_connect: bool = True, suppress_ragged_eofs: bool = True,
                    server_hostname: str | None = None, session: Any = None) -> ssl.SSLSocket:
        if server_side:
            sock.settimeout(self.handshake_timeout_s)
        return super().wrap_socket(sock, server_side=server_side,
                                   do_handshake_on_connect=not server_side,
                                   suppress_ragged_eofs=suppress_ragged_eofs,
                                   server_hostname=server_hostname, session=session)


def server_context(tls: ServerTlsSettings, key: str,
                   handshake_timeout_s: float | None = None) -> ssl.SSLContext | None:
    """A server-side context for ``tls`` (settings key ``key``, e.g. ``dicom.tls``), or None
    when TLS is off. Accepted sockets handshake on first read and time out after
    ``handshake_timeout_s`` without data (:class:`DeferredHandshakeContext`).

    Raises:
        ConfigError: a file is missing or invalid; the message names the key.
    """
    if not tls.enabled:
        return None
    assert tls.cert_file is not None and tls.key_file is not None  # the settings check this
    context = DeferredHandshakeContext(ssl.PROTOCOL_TLS_SERVER)
    context.handshake_timeout_s = handshake_timeout_s
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(context, tls.cert_file, tls.key_file, key)
    if tls.ca_file is not None:
        _load_ca(context, tls.ca_file, key)
        context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    return context


def client_context(tls: ClientTlsSettings, key: str) -> ssl.SSLContext | None:
    """A client-side context for ``tls``, or None when TLS is off.

    Raises:
        ConfigError: a file is missing or invalid; the message names the key.
    """
    if not tls.enabled:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = tls.check_hostname
    if not tls.verify_peer:
        context.verify_mode = ssl.CERT_NONE
    elif tls.ca_file is not None:
        _load_ca(context, tls.ca_file, key)
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if tls.cert_file is not None and tls.key_file is not None:
        _load_chain(context, tls.cert_file, tls.key_file, key)
    return context


@dataclass(frozen=True)
class PemMaterial:
    """PEM bytes for grpc's credential constructors (grpc wants bytes, not paths)."""

    cert_chain: bytes | None
    private_key: bytes | None
    root_certificates: bytes | None


def pem_material(cert: Path | None, private_key: Path | None, ca: Path | None,
                 key: str) -> PemMaterial:
    """Read and check (with :mod:`ssl`, as grpc reports bad PEM only at bind or connect time).

    Raises:
        ConfigError: a file is missing or invalid; the message names the key.
    """
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if cert is not None and private_key is not None:
        _load_chain(probe, cert, private_key, key)
    if ca is not None:
        _load_ca(probe, ca, key)
    return PemMaterial(
        read_pem(cert, f"{key}.cert_file") if cert is not None else None,
        read_pem(private_key, f"{key}.key_file") if private_key is not None else None,
        read_pem(ca, f"{key}.ca_file") if ca is not None else None)


def server_pem(tls: ServerTlsSettings, key: str) -> PemMaterial | None:
    """The checked PEM material of a TLS server port, or None when TLS is off.

    Raises:
        ConfigError: a file is missing or invalid; the message names the key.
    """
    if not tls.enabled:
        return None
    pem = pem_material(tls.cert_file, tls.key_file, tls.ca_file, key)
    assert pem.private_key is not None and pem.cert_chain is not None
    return pem


def grpc_server_credentials(tls: ServerTlsSettings, pem: PemMaterial | None) -> Any | None:
    """``grpc.ServerCredentials`` for ``tls`` from its material (:func:`server_pem`), or None
    when TLS is off. With ``require_client_cert`` clients must present a certificate signed
    by ``ca_file``."""
    if pem is None:
        return None
    import grpc  # only the front ends need grpc

    return grpc.ssl_server_credentials(
        [(pem.private_key, pem.cert_chain)], root_certificates=pem.root_certificates,
        require_client_auth=tls.require_client_cert)
