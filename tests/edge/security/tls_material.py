"""The test PKI and tokens. Certificates made with ``cryptography``: a CA, a server
certificate for 127.0.0.1 / localhost (subjectAltName), a client certificate signed by the CA,
and a client certificate from a second, untrusted CA. Bearer tokens and their sha256 entries."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

INFER_TOKEN = "infer-token-7f3a9c21d4e8b6a0"
REPO_TOKEN = "repo-token-2b8e4d6f1a3c5e7g"
METRICS_TOKEN = "metrics-token-9d1c3b5a7e2f4h6i"


@dataclass(frozen=True)
class Pki:
    """Paths of the PEM files."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path  # a client certificate from a CA the server does not trust
    rogue_key: Path


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return path


def _issue(subject: str, key: ec.EllipticCurvePrivateKey, issuer: str,
           issuer_key: ec.EllipticCurvePrivateKey, *, ca: bool = False,
           server: bool = False) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=2))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False,
            encipher_only=False, decipher_only=False), critical=True)
        builder = builder.add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    else:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        builder = builder.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            issuer_key.public_key()), critical=False)
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(cert: x509.Certificate, path: Path) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def make_pki(folder: Path) -> Pki:
    """Write a CA, server, client and rogue client certificate under ``folder``."""
    ca_key, rogue_ca_key = ec.generate_private_key(ec.SECP256R1()), \
        ec.generate_private_key(ec.SECP256R1())
    ca = _issue("mededge test CA", ca_key, "mededge test CA", ca_key, ca=True)
    server_key, client_key, rogue_key = (ec.generate_private_key(ec.SECP256R1())
                                         for _ in range(3))
    return Pki(
        ca=_pem(ca, folder / "ca.pem"),
        server_cert=_pem(_issue("localhost", server_key, "mededge test CA", ca_key, server=True),
                         folder / "server.pem"),
        server_key=_write_key(server_key, folder / "server.key"),
        client_cert=_pem(_issue("modality", client_key, "mededge test CA", ca_key),
                         folder / "client.pem"),
        client_key=_write_key(client_key, folder / "client.key"),
        rogue_cert=_pem(_issue("rogue", rogue_key, "rogue CA", rogue_ca_key),
                        folder / "rogue.pem"),
        rogue_key=_write_key(rogue_key, folder / "rogue.key"),
    )


def token_entry(name: str, token: str, *rights: str) -> dict[str, object]:
    """A settings ``auth.tokens`` entry: the token's sha256, never the token."""
    return {"name": name, "sha256": hashlib.sha256(token.encode()).hexdigest(),
            "rights": list(rights)}


def write_repository(repo: Path) -> Path:
    """``add`` and ``spare`` (OUTPUT0 = INPUT0 * 2 + 1 on float32 [batch, 4])."""
    from model_factory import write_add_scale_repo

    write_add_scale_repo(repo, "add")
    write_add_scale_repo(repo, "spare")
    return repo


@contextlib.contextmanager
def edge_server(repo: Path, data: Path, **sections: dict[str, object]) -> Iterator[Any]:
    """A started in-process EdgeServer (gRPC + HTTP on ephemeral loopback ports) with
    ``sections`` merged into its settings; stopped on exit."""
    from edge.api.server import EdgeServer
    from edge.core.config import load_settings

    settings = load_settings(None, {
        "server": {"bind": "127.0.0.1", "grpc_port": 0, "http_port": 0, "drain_timeout_s": 2.0,
                   "model_repository": str(repo), "data_dir": str(data)},
        "backend": {"providers": ["CPUExecutionProvider"], "intra_op_threads": 1},
        "repository": {"warmup": False}, **sections}, environ={})
    server = EdgeServer(settings)
    server.start()
    try:
        yield server
    finally:
        server.stop(2.0)
