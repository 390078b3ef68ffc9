"""DicomSender against real peers: Orthanc (REST-checked), and pynetdicom SCPs with set answers."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from orthanc import Orthanc, free_port
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import (
    JPEG2000,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)
from pynetdicom import AE, StoragePresentationContexts, evt
from pynetdicom.transport import ThreadedAssociationServer

from edge.core.config import DispatchSettings
from edge.dispatch import Destination, DicomSender, LocalStatus, StoreOutcome

SETTINGS = DispatchSettings(ae_title="MEDEDGE_TEST", connection_timeout_s=2, acse_timeout_s=5,
                            dimse_timeout_s=10, network_timeout_s=10)


def copy_instance(name: str, directory: Path, syntax: str | None = None) -> tuple[Path, str]:
    """A copy of a pydicom test file with a fresh SOP Instance UID (optionally re-encoded in
    an uncompressed ``syntax``); returns its path and UID."""
    ds = dcmread(get_testdata_file(name))
    uid = generate_uid()
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    if syntax is not None:
        ds.file_meta.TransferSyntaxUID = syntax
    path = directory / f"{uid}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, uid


class Scp:
    """A pynetdicom storage SCP on loopback that answers each C-STORE with ``answer(n)``."""

    def __init__(self, answer: Callable[[int], int], contexts: object = None,
                 syntaxes: list[str] | None = None) -> None:
        self.received: list[tuple[str, str]] = []  # (SOP Instance UID, transfer syntax)
        self.associations = 0
        self.nodelay: list[int] = []
        ae = AE(ae_title="TESTSCP")
        for cx in contexts or StoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, syntaxes or cx.transfer_syntax)

        def on_store(event: evt.Event) -> int:
            status = answer(len(self.received))
            self.received.append((event.request.AffectedSOPInstanceUID,
                                  event.context.transfer_syntax))
            return status

        def on_accepted(event: evt.Event) -> None:
            self.associations += 1

        self.server: ThreadedAssociationServer = ae.start_server(
            ("127.0.0.1", 0), block=False,
            evt_handlers=[(evt.EVT_C_STORE, on_store), (evt.EVT_ACCEPTED, on_accepted)])
        self.destination = Destination("TESTSCP", "127.0.0.1", self.server.server_address[1])

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def scp_factory() -> Iterator[Callable[..., Scp]]:
    started: list[Scp] = []

    def make(answer: Callable[[int], int] = lambda n: 0x0000, **kwargs: object) -> Scp:
        started.append(Scp(answer, **kwargs))  # type: ignore[arg-type]
        return started[-1]

    yield make
    for scp in started:
        scp.stop()


def orthanc_destination(pacs: Orthanc) -> Destination:
    return Destination(pacs.aet, "127.0.0.1", pacs.dicom_port)


def test_sends_to_orthanc_as_is(orthanc: Orthanc, tmp_path: Path) -> None:
    ct, ct_uid = copy_instance("CT_small.dcm", tmp_path)
    j2k, j2k_uid = copy_instance("JPEG2000.dcm", tmp_path)
    outcomes = DicomSender(SETTINGS).send([ct, j2k], orthanc_destination(orthanc))
    assert outcomes == (StoreOutcome(ct, ct_uid, 0x0000), StoreOutcome(j2k, j2k_uid, 0x0000))
    ct_id, j2k_id = orthanc.find_instance(ct_uid), orthanc.find_instance(j2k_uid)
    assert ct_id and j2k_id, "Orthanc's REST API does not list the sent instances"
    assert orthanc.tags(ct_id)["SOPInstanceUID"] == ct_uid
    assert orthanc.transfer_syntax(ct_id) == ExplicitVRLittleEndian
    assert orthanc.transfer_syntax(j2k_id) == JPEG2000, "the JPEG 2000 file was transcoded"


def test_one_association_per_batch_and_tcp_nodelay(scp_factory: Callable[..., Scp],
                                                   tmp_path: Path) -> None:
    scp = scp_factory()
    nodelay: list[int] = []

    def read_nodelay(event: evt.Event) -> None:
        sock = event.assoc.dul.socket.socket
        nodelay.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    files = [copy_instance("CT_small.dcm", tmp_path) for _ in range(5)]
    sender = DicomSender(SETTINGS, evt_handlers=[(evt.EVT_ACCEPTED, read_nodelay)])
    outcomes = sender.send([p for p, _ in files], scp.destination)
    assert [o.status for o in outcomes] == [0] * 5
    assert [uid for uid, _ in scp.received] == [uid for _, uid in files]
    assert scp.associations == 1
    assert nodelay == [1], "TCP_NODELAY is not set on the SCU's socket"


def test_uncompressed_file_falls_back_to_explicit_little_endian(
        scp_factory: Callable[..., Scp], tmp_path: Path) -> None:
    scp = scp_factory(syntaxes=[ExplicitVRLittleEndian])  # refuses implicit VR LE
    path, uid = copy_instance("CT_small.dcm", tmp_path, syntax=ImplicitVRLittleEndian)
    (outcome,) = DicomSender(SETTINGS).send([path], scp.destination)
    assert outcome.status == 0x0000, outcome.error
    assert scp.received == [(uid, ExplicitVRLittleEndian)]


def test_peer_statuses_are_reported_per_file(scp_factory: Callable[..., Scp],
                                             tmp_path: Path) -> None:
    answers = [0x0000, 0xA900, 0xA700, 0xB000]
    scp = scp_factory(lambda n: answers[n])
    files = [copy_instance("CT_small.dcm", tmp_path)[0] for _ in answers]
    outcomes = DicomSender(SETTINGS).send(files, scp.destination)
    assert [o.status for o in outcomes] == answers
    assert "0xA900" in outcomes[1].error
    assert outcomes[0].error == ""


def test_unsupported_sop_class_is_no_context(scp_factory: Callable[..., Scp],
                                             tmp_path: Path) -> None:
    mr_only = [cx for cx in StoragePresentationContexts if cx.abstract_syntax == MRImageStorage]
    scp = scp_factory(contexts=mr_only)
    ct, _ = copy_instance("CT_small.dcm", tmp_path)
    mr, _ = copy_instance("MR_small.dcm", tmp_path)
    outcomes = DicomSender(SETTINGS).send([ct, mr], scp.destination)
    assert [o.status for o in outcomes] == [LocalStatus.NO_CONTEXT, 0x0000]
    assert CTImageStorage.name in outcomes[0].error
    (alone,) = DicomSender(SETTINGS).send([ct], scp.destination)  # nothing accepted: abort
    assert alone.status == LocalStatus.NO_CONTEXT


def test_unreadable_file_does_not_stop_the_batch(scp_factory: Callable[..., Scp],
                                                 tmp_path: Path) -> None:
    scp = scp_factory()
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom")
    good, uid = copy_instance("CT_small.dcm", tmp_path)
    outcomes = DicomSender(SETTINGS).send([junk, tmp_path / "missing.dcm", good],
                                          scp.destination)
    assert [o.status for o in outcomes] == [LocalStatus.UNREADABLE_FILE,
                                            LocalStatus.UNREADABLE_FILE, 0x0000]
    assert scp.received[0][0] == uid


def test_nothing_listening_is_no_association(tmp_path: Path) -> None:
    path, _ = copy_instance("CT_small.dcm", tmp_path)
    (outcome,) = DicomSender(SETTINGS).send([path], Destination("PACS", "127.0.0.1", free_port()))
    assert outcome.status == LocalStatus.NO_ASSOCIATION
    assert "no association" in outcome.error


def test_rejected_association_says_why(orthanc: Orthanc, tmp_path: Path) -> None:
    path, _ = copy_instance("CT_small.dcm", tmp_path)
    wrong_aet = Destination("NOT_ORTHANC", "127.0.0.1", orthanc.dicom_port)
    (outcome,) = DicomSender(SETTINGS).send([path], wrong_aet)
    assert outcome.status == LocalStatus.NO_ASSOCIATION
    assert "rejected" in outcome.error


def test_a_dropped_connection_ends_the_wait_for_the_response(tmp_path: Path) -> None:
    """The peer closes the connection instead of answering a C-STORE: the sender reports the
    closed connection instead of waiting out its DIMSE timeout (600 s here; the send gets a
    tenth of that before the test gives up on it)."""
    def drop(event: evt.Event) -> int:
        event.assoc.dul.socket.socket.shutdown(socket.SHUT_RDWR)
        return 0x0000

    ae = AE(ae_title="DROPPER")
    ae.supported_contexts = StoragePresentationContexts
    server = ae.start_server(("127.0.0.1", 0), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, drop)])
    assert server is not None
    patient = DispatchSettings(ae_title="MEDEDGE_TEST", connection_timeout_s=2,
                               acse_timeout_s=5, dimse_timeout_s=600, network_timeout_s=600)
    files = [copy_instance("CT_small.dcm", tmp_path)[0] for _ in range(2)]
    outcomes: list[StoreOutcome] = []
    sending = threading.Thread(target=lambda: outcomes.extend(DicomSender(patient).send(
        files, Destination("DROPPER", "127.0.0.1", server.server_address[1]))), daemon=True)
    try:
        sending.start()
        sending.join(60)
        assert not sending.is_alive(), "still waiting for a response on a closed connection"
    finally:
        server.shutdown()
    assert [o.status for o in outcomes] == [LocalStatus.NO_ASSOCIATION] * 2
