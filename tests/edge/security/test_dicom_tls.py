"""DICOM TLS with real peers: dcmtk's TLS-enabled storescu pushes to mededge's TLS listener,
and mededge's SCU sends to dcmtk's TLS-enabled storescp (PS3.15 Annex B.1, BCP 195)."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from tls_material import Pki

from edge.core.config import DispatchSettings, load_settings
from edge.core.errors import ConfigError
from edge.dispatch import Destination, DicomSender
from edge.ingest import AssociationClosed
from edge.ingest.listener import DicomListener
from edge.jobs.ledger import Ledger

STORESCU, STORESCP = Path("/usr/bin/storescu"), Path("/usr/bin/storescp")
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
pytestmark = pytest.mark.skipif(not (STORESCU.exists() and STORESCP.exists()),
                                reason="dcmtk (storescu, storescp) is not installed")


def ct_file(directory: Path) -> tuple[Path, str]:
    """pydicom's CT test file with a fresh SOP Instance UID."""
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    uid = generate_uid()
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    path = directory / f"{uid}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, uid


def listener_tls(pki: Pki, require_client_cert: bool) -> dict[str, object]:
    return {"enabled": True, "cert_file": str(pki.server_cert), "key_file": str(pki.server_key),
            "ca_file": str(pki.ca), "require_client_cert": require_client_cert}


def start_listener(base: Path, tls: dict[str, object]) -> Iterator[tuple[int, Ledger]]:
    settings = load_settings(environ={}, overrides={
        "server": {"data_dir": str(base)},
        "dicom": {"bind": "127.0.0.1", "port": 0, "tls": tls, "acse_timeout_s": 5,
                  "network_timeout_s": 5},
        "spool": {"dir": str(base / "spool"), "min_free_bytes": 0}})
    releases: list[AssociationClosed] = []
    with Ledger(base / "ledger.sqlite3") as ledger:
        listener = DicomListener(settings, ledger, releases.append)
        port = listener.start()
        try:
            yield port, ledger
        finally:
            listener.stop()


@pytest.fixture(scope="module")
def mtls_listener(pki: Pki, tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[tuple[int, Ledger]]:
    """A listener requiring client certificates signed by the test CA."""
    yield from start_listener(tmp_path_factory.mktemp("mtls"), listener_tls(pki, True))


def storescu(port: int, path: Path, *tls: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(STORESCU), "-v", *tls, "-aec", "MEDEDGE", "-aet", "CT1",
                           "-to", "5", "-ta", "5", "-td", "5", "127.0.0.1", str(port),
                           str(path)],
                          capture_output=True, text=True, timeout=20, env=DCMTK_ENV)


def stored(ledger: Ledger, uid: str) -> bool:
    return ledger.instance(uid) is not None


def test_tls_storescu_with_client_cert_is_stored(mtls_listener: tuple[int, Ledger], pki: Pki,
                                                 tmp_path: Path) -> None:
    port, ledger = mtls_listener
    path, uid = ct_file(tmp_path)
    result = storescu(port, path, "+tls", str(pki.client_key), str(pki.client_cert),
                      "+cf", str(pki.ca))
    out = result.stdout + result.stderr
    assert "Received Store Response (Success)" in out, out
    assert stored(ledger, uid), "the instance was answered Success but is not in the ledger"


def test_plain_storescu_to_the_tls_port_fails(mtls_listener: tuple[int, Ledger],
                                              tmp_path: Path) -> None:
    port, ledger = mtls_listener
    path, uid = ct_file(tmp_path)
    result = storescu(port, path)
    assert "Received Store Response" not in result.stdout + result.stderr
    assert not stored(ledger, uid)


def test_tls_client_without_certificate_is_refused_under_mutual_tls(
        mtls_listener: tuple[int, Ledger], pki: Pki, tmp_path: Path) -> None:
    port, ledger = mtls_listener
    path, uid = ct_file(tmp_path)
    result = storescu(port, path, "+tla", "+cf", str(pki.ca))  # TLS, no client certificate
    assert "Received Store Response" not in result.stdout + result.stderr
    assert not stored(ledger, uid)


def test_client_certificate_from_another_ca_is_refused(mtls_listener: tuple[int, Ledger],
                                                       pki: Pki, tmp_path: Path) -> None:
    port, ledger = mtls_listener
    path, uid = ct_file(tmp_path)
    result = storescu(port, path, "+tls", str(pki.rogue_key), str(pki.rogue_cert),
                      "+cf", str(pki.ca))
    assert "Received Store Response" not in result.stdout + result.stderr
    assert not stored(ledger, uid)


def test_listener_still_serves_after_failed_handshakes(mtls_listener: tuple[int, Ledger],
                                                       pki: Pki, tmp_path: Path) -> None:
    port, ledger = mtls_listener
    """A client that connects and says nothing, and one that speaks no TLS, stop no one: the
    handshake runs in the association's thread, not in the accept loop."""
    with socket.create_connection(("127.0.0.1", port)), \
            socket.create_connection(("127.0.0.1", port)) as garbage:
        garbage.sendall(b"\x01\x00 not TLS at all")
        path, uid = ct_file(tmp_path)
        result = storescu(port, path, "+tls", str(pki.client_key), str(pki.client_cert),
                          "+cf", str(pki.ca))
    assert "Received Store Response (Success)" in result.stdout + result.stderr
    assert stored(ledger, uid)


# --- mededge's SCU to dcmtk's storescp over TLS --------------------------------------------------

def _die_with_parent() -> None:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def storescp(pki: Pki, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[tuple[int, Path]]:
    """dcmtk's storescp with TLS, requiring a client certificate from the test CA (-rc)."""
    out, port = tmp_path_factory.mktemp("storescp"), free_port()
    process = subprocess.Popen(
        [str(STORESCP), "+tls", str(pki.server_key), str(pki.server_cert), "+cf", str(pki.ca),
         "-rc", "-od", str(out), str(port)], env=DCMTK_ENV, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent)
    deadline = time.monotonic() + 10
    while True:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                break
        assert time.monotonic() < deadline, "storescp did not listen"
        time.sleep(0.05)
    yield port, out
    process.terminate()
    process.wait(10)


def sender(**tls: object) -> DicomSender:
    return DicomSender(DispatchSettings.model_validate({
        "ae_title": "MEDEDGE", "connection_timeout_s": 3, "acse_timeout_s": 5,
        "dimse_timeout_s": 5, "network_timeout_s": 5, "tls": {"enabled": True, **tls}}))


def test_sender_with_tls_delivers_to_storescp(storescp: tuple[int, Path], pki: Pki,
                                             tmp_path: Path) -> None:
    port, out = storescp
    path, uid = ct_file(tmp_path)
    scu = sender(ca_file=str(pki.ca), cert_file=str(pki.client_cert),
                 key_file=str(pki.client_key))
    [outcome] = scu.send([path], Destination("STORESCP", "127.0.0.1", port))
    assert outcome.status == 0, outcome.error
    arrived = [dcmread(p).SOPInstanceUID for p in out.iterdir()]
    assert uid in arrived


def test_sender_checks_the_peer_certificate(storescp: tuple[int, Path], pki: Pki,
                                            tmp_path: Path) -> None:
    """Trusting only another CA (the rogue one signs no server here) fails the association."""
    port, _ = storescp
    path, _ = ct_file(tmp_path)
    scu = sender(ca_file=str(pki.rogue_cert), cert_file=str(pki.client_cert),
                 key_file=str(pki.client_key))
    [outcome] = scu.send([path], Destination("STORESCP", "127.0.0.1", port))
    assert outcome.status != 0 and "no association" in outcome.error


def test_sender_without_client_certificate_is_refused_by_mutual_tls(
        storescp: tuple[int, Path], pki: Pki, tmp_path: Path) -> None:
    port, _ = storescp
    path, _ = ct_file(tmp_path)
    [outcome] = sender(ca_file=str(pki.ca)).send([path],
                                                 Destination("STORESCP", "127.0.0.1", port))
    assert outcome.status != 0


def test_missing_certificate_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"dispatch\.tls\.ca_file: .*no such file"):
        sender(ca_file=str(tmp_path / "absent.pem"))
