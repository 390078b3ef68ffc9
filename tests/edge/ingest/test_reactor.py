"""The listener's event-driven associations (edge.ingest.reactor) and its C-STORE-RSP encoder
keep pynetdicom's behaviour: same response bytes, timers, clean ends, no leaked descriptors."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode

from edge.core.config import load_settings
from edge.ingest import AssociationClosed, reactor
from edge.ingest.commands import store_response
from edge.ingest.listener import DicomListener
from edge.jobs.ledger import Ledger

VERIFICATION = "1.2.840.10008.1.1"


@dataclass
class Running:
    listener: DicomListener
    port: int
    releases: list[AssociationClosed]


def start(base: Path, **dicom: object) -> Iterator[Running]:
    settings = load_settings(environ={}, overrides={
        "server": {"data_dir": str(base)},
        "dicom": {"bind": "127.0.0.1", "port": 0, **dicom},
        "spool": {"dir": str(base / "spool"), "min_free_bytes": 0},
    })
    releases: list[AssociationClosed] = []
    with Ledger(base / "ledger.sqlite3") as ledger:
        listener = DicomListener(settings, ledger, releases.append)
        port = listener.start()
        try:
            yield Running(listener, port, releases)
        finally:
            listener.stop()


def scu(contexts: tuple[str, ...] = (CTImageStorage,)) -> AE:
    ae = AE(ae_title="MODALITY")
    for uid in contexts:
        ae.add_requested_context(uid, ExplicitVRLittleEndian)
    return ae


def ct_dataset(study: str, series: str) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study, series, "CT"
    ds.Rows = ds.Columns = 16
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = bytes(16 * 16 * 2)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def response(instance_uid: str, status: int, message_id: int = 7) -> C_STORE:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = message_id
    rsp.AffectedSOPClassUID = CTImageStorage
    rsp.AffectedSOPInstanceUID = instance_uid
    rsp.Status = status
    return rsp


@pytest.mark.parametrize("status", [0x0000, 0xA700, 0xA900, 0xC000, 0x0110])
@pytest.mark.parametrize("instance_uid", ["1.2.3", "1.2.34", "1.2.840.10008." + "9" * 49])
def test_store_response_bytes_are_pynetdicoms(instance_uid: str, status: int) -> None:
    rsp = response(instance_uid, status, message_id=65535)
    message = C_STORE_RSP()
    message.primitive_to_message(rsp)
    assert store_response(rsp) == encode(message.command_set, True, True)


def test_store_response_with_error_comment_is_left_to_pynetdicom() -> None:
    rsp = response("1.2.3", 0xA900)
    rsp.ErrorComment = "mismatch"  # type: ignore[assignment]  # pynetdicom types it None
    assert store_response(rsp) is None, "encoded a response with an Error Comment"


@pytest.fixture
def strict(tmp_path: Path) -> Iterator[Running]:
    """A listener with short ACSE and network timeouts."""
    yield from start(tmp_path, acse_timeout_s=1, network_timeout_s=1)


def wait_for(condition: object, what: str, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"gave up waiting: {what}"
        time.sleep(0.05)


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not reactor.SUPPORTED, reason="pynetdicom version without the reactors")
def test_associations_are_event_driven(strict: Running) -> None:
    assoc = scu(contexts=(VERIFICATION,)).associate("127.0.0.1", strict.port, ae_title="MEDEDGE")
    try:
        assert assoc.is_established
        kinds = {type(a.dul).__name__ for a in strict.listener.ae.active_associations}
        assert kinds == {"_EventDrivenDUL"}, f"acceptor DULs are {kinds}"
    finally:
        assoc.release()


def test_idle_association_ends_at_the_network_timeout(strict: Running) -> None:
    ae = scu(contexts=(VERIFICATION,))
    ae.network_timeout = 60  # our side stays quiet; the listener must end it
    assoc = ae.associate("127.0.0.1", strict.port, ae_title="MEDEDGE")
    assert assoc.is_established
    wait_for(lambda: not assoc.is_alive(), "the listener's network timeout")
    assert assoc.is_aborted or assoc.is_released, "association neither aborted nor released"


def test_silent_connection_is_closed_at_the_acse_timeout(strict: Running) -> None:
    with socket.create_connection(("127.0.0.1", strict.port), timeout=15) as sock:
        assert sock.recv(1024) == b"", "the listener kept a silent connection open"


def test_stores_on_one_association_then_release(strict: Running) -> None:
    study, series = generate_uid(), generate_uid()
    assoc = scu().associate("127.0.0.1", strict.port, ae_title="MEDEDGE")
    try:
        statuses = [assoc.send_c_store(ct_dataset(study, series)).Status for _ in range(20)]
    finally:
        assoc.release()
    assert statuses == [0x0000] * 20
    wait_for(lambda: bool(strict.releases), "the release callback")
    assert strict.releases[-1].instances == 20 and strict.releases[-1].released


def test_associations_leave_no_descriptors_behind(strict: Running) -> None:
    ae: AE = scu(contexts=(VERIFICATION,))
    before = open_descriptors()
    for _ in range(10):
        assoc = ae.associate("127.0.0.1", strict.port, ae_title="MEDEDGE")
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
    wait_for(lambda: not strict.listener.ae.active_associations, "associations to end")
    wait_for(lambda: open_descriptors() <= before, f"descriptors back to {before}")


def test_stop_ends_an_open_association(tmp_path: Path) -> None:
    runner = start(tmp_path)
    running = next(runner)
    assoc = scu(contexts=(VERIFICATION,)).associate("127.0.0.1", running.port,
                                                     ae_title="MEDEDGE")
    assert assoc.is_established
    running.listener.stop()
    wait_for(lambda: not assoc.is_alive(), "the association to end after stop()")
    assert assoc.is_aborted, "stop() did not abort the open association"
    with pytest.raises(StopIteration):
        next(runner)
