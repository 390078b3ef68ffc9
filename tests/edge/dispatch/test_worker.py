"""DeliveryWorker with a real ledger and real peers: Orthanc, dcmtk's storescp, a pynetdicom SCP."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from orthanc import Orthanc, free_port
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from pynetdicom import AE, StoragePresentationContexts, evt

from edge.core.config import DispatchSettings
from edge.dispatch import DeliveryWorker, Destination, DicomSender, RetryPolicy
from edge.ingest import ReceivedInstance
from edge.ingest.uids import InstanceIdentity
from edge.jobs.ledger import DeliveryRecord, DeliveryState, Ledger

STORESCP = Path("/usr/bin/storescp")
SETTINGS = DispatchSettings(ae_title="MEDEDGE_TEST", connection_timeout_s=2, acse_timeout_s=5,
                            dimse_timeout_s=10, network_timeout_s=10)
FAST = RetryPolicy(initial_s=0.1, factor=2.0, max_s=0.4, max_attempts=50, jitter=0.0)


def add_result(ledger: Ledger, directory: Path,
               name: str = "CT_small.dcm") -> tuple[int, Path, str]:
    """A result file (a pydicom test file with a fresh SOP Instance UID) recorded in the ledger
    under a run of a series; returns (result id, path, SOP Instance UID)."""
    ds = dcmread(get_testdata_file(name))
    uid = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
    path = directory / f"{uid}.dcm"
    ds.save_as(path, enforce_file_format=True)
    series = generate_uid()
    ledger.record_instance(ReceivedInstance(
        InstanceIdentity(generate_uid(), series, generate_uid(), ds.SOPClassUID,
                         ds.file_meta.TransferSyntaxUID, "CT"),
        path, path.stat().st_size, "CT1", time.time()))
    run_id = ledger.create_run(series, "test", "model")
    return ledger.add_result(run_id, "seg", path, uid), path, uid


def wait_for(predicate: Callable[[], object], what: str, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def record(ledger: Ledger, delivery_id: int) -> DeliveryRecord:
    found = ledger.delivery(delivery_id)
    assert found is not None
    return found


def _die_with_parent() -> None:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def start_storescp(port: int, out: Path) -> subprocess.Popen[bytes]:
    """dcmtk's storescp on ``port``, writing into ``out``; ends with this process."""
    out.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen([str(STORESCP), "-od", str(out), str(port)],
                               env={**os.environ, "TCP_NODELAY": "1"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               preexec_fn=_die_with_parent)

    def listening() -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) == 0

    wait_for(listening, "storescp to listen", 10)
    return process


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    process.wait(10)


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    with Ledger(tmp_path / "ledger.sqlite3") as opened:
        yield opened


def test_delivers_to_orthanc(orthanc: Orthanc, ledger: Ledger, tmp_path: Path) -> None:
    destination = Destination(orthanc.aet, "127.0.0.1", orthanc.dicom_port)
    results = [add_result(ledger, tmp_path, name) for name in ("CT_small.dcm", "JPEG2000.dcm")]
    with DeliveryWorker(ledger, DicomSender(SETTINGS), FAST) as worker:
        ids = [worker.enqueue(rid, path, destination) for rid, path, _ in results]
        wait_for(lambda: all(record(ledger, i).state is DeliveryState.DONE for i in ids),
                 "deliveries to be done")
    for delivery_id, (_, _, uid) in zip(ids, results, strict=True):
        row = record(ledger, delivery_id)
        assert (row.attempts, row.last_error, row.destination) == (1, None, str(destination))
        assert orthanc.find_instance(uid), f"{uid} not in Orthanc"


def test_due_deliveries_to_one_destination_share_an_association(ledger: Ledger,
                                                                 tmp_path: Path) -> None:
    ae = AE(ae_title="COUNTER")
    ae.supported_contexts = StoragePresentationContexts
    associations: list[int] = []
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[
        (evt.EVT_C_STORE, lambda event: 0x0000),
        (evt.EVT_ACCEPTED, lambda event: associations.append(1))])
    try:
        destination = Destination("COUNTER", "127.0.0.1", server.server_address[1])
        worker = DeliveryWorker(ledger, DicomSender(SETTINGS), FAST, max_batch=4)
        ids = [worker.enqueue(*add_result(ledger, tmp_path)[:2], destination) for _ in range(6)]
        with worker:
            wait_for(lambda: all(record(ledger, i).state is DeliveryState.DONE for i in ids),
                     "six deliveries")
    finally:
        server.shutdown()
    assert len(associations) == 2  # 4 + 2 with max_batch=4


def test_enqueue_checks_the_result(ledger: Ledger, tmp_path: Path) -> None:
    result_id, path, _ = add_result(ledger, tmp_path)
    worker = DeliveryWorker(ledger, DicomSender(SETTINGS), FAST)
    destination = Destination.parse("PACS@127.0.0.1:104")
    with pytest.raises(ValueError, match="result"):
        worker.enqueue(result_id + 1000, path, destination)
    with pytest.raises(ValueError, match="result"):
        worker.enqueue(result_id, tmp_path / "other.dcm", destination)
    assert ledger.deliveries() == []


@pytest.mark.skipif(not STORESCP.exists(), reason="dcmtk's storescp is not installed")
def test_down_pacs_is_retried_with_backoff_until_it_comes_up(ledger: Ledger,
                                                             tmp_path: Path) -> None:
    port = free_port()
    destination = Destination("STORESCP", "127.0.0.1", port)
    result_id, path, uid = add_result(ledger, tmp_path)
    policy = RetryPolicy(initial_s=0.2, factor=2.0, max_s=0.8, max_attempts=50, jitter=0.0)
    with DeliveryWorker(ledger, DicomSender(SETTINGS), policy) as worker:
        delivery_id = worker.enqueue(result_id, path, destination)
        seen: list[DeliveryRecord] = []

        def failed_attempts(count: int) -> bool:
            row = record(ledger, delivery_id)
            fresh = not seen or seen[-1].attempts != row.attempts
            if row.state is DeliveryState.FAILED and fresh:
                seen.append(row)
            return len(seen) >= count

        wait_for(lambda: failed_attempts(3), "three failed attempts")
        gaps = [r.next_attempt_at - r.updated_at for r in seen[:3]]
        assert gaps == pytest.approx([0.2, 0.4, 0.8], abs=0.05), "backoff not followed"
        assert "no association" in (seen[-1].last_error or "")
        scp = start_storescp(port, tmp_path / "received")
        try:
            wait_for(lambda: record(ledger, delivery_id).state is DeliveryState.DONE,
                     "delivery once storescp is up")
        finally:
            stop(scp)
    row = record(ledger, delivery_id)
    assert row.attempts >= 4 and row.last_error is None
    assert [p.name for p in (tmp_path / "received").iterdir()] == [f"CT.{uid}"]


def test_permanent_failure_is_dead_lettered_with_the_reason(ledger: Ledger,
                                                            tmp_path: Path) -> None:
    ae = AE(ae_title="REFUSER")
    ae.supported_contexts = StoragePresentationContexts
    server = ae.start_server(("127.0.0.1", 0), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, lambda event: 0xA900)])
    try:
        destination = Destination("REFUSER", "127.0.0.1", server.server_address[1])
        result_id, path, _ = add_result(ledger, tmp_path)
        with DeliveryWorker(ledger, DicomSender(SETTINGS), FAST) as worker:
            delivery_id = worker.enqueue(result_id, path, destination)
            wait_for(lambda: record(ledger, delivery_id).state is DeliveryState.DEAD,
                     "the dead letter")
    finally:
        server.shutdown()
    row = record(ledger, delivery_id)
    assert row.attempts == 1
    assert "0xA900" in (row.last_error or "")


def test_transient_status_is_retried_and_exhaustion_is_dead(ledger: Ledger,
                                                            tmp_path: Path) -> None:
    answers = [0xA700, 0x0110, 0x0000]  # out of resources, processing failure, success
    ae = AE(ae_title="FLAKY")
    ae.supported_contexts = StoragePresentationContexts
    calls: list[int] = []

    def on_store(event: evt.Event) -> int:
        calls.append(1)
        return answers[min(len(calls), len(answers)) - 1]

    server = ae.start_server(("127.0.0.1", 0), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        destination = Destination("FLAKY", "127.0.0.1", server.server_address[1])
        first, second = add_result(ledger, tmp_path), add_result(ledger, tmp_path)
        with DeliveryWorker(ledger, DicomSender(SETTINGS), FAST) as worker:
            delivered = worker.enqueue(first[0], first[1], destination)
            wait_for(lambda: record(ledger, delivered).state is DeliveryState.DONE, "success")
        assert record(ledger, delivered).attempts == 3
        down = Destination("PACS", "127.0.0.1", free_port())
        two_tries = RetryPolicy(initial_s=0.05, max_s=0.05, max_attempts=2, jitter=0.0)
        with DeliveryWorker(ledger, DicomSender(SETTINGS), two_tries) as worker:
            dead = worker.enqueue(second[0], second[1], down)
            wait_for(lambda: record(ledger, dead).state is DeliveryState.DEAD, "exhaustion")
        row = record(ledger, dead)
        assert row.attempts == 2
        assert (row.last_error or "").startswith("gave up after 2 attempts")
    finally:
        server.shutdown()


def test_stop_is_prompt_during_a_long_backoff(ledger: Ledger, tmp_path: Path) -> None:
    slow = RetryPolicy(initial_s=60.0, max_s=60.0, max_attempts=5, jitter=0.0)
    result_id, path, _ = add_result(ledger, tmp_path)
    worker = DeliveryWorker(ledger, DicomSender(SETTINGS), slow)
    worker.start()
    delivery_id = worker.enqueue(result_id, path, Destination("PACS", "127.0.0.1", free_port()))
    wait_for(lambda: record(ledger, delivery_id).state is DeliveryState.FAILED, "a failure")
    started = time.monotonic()
    worker.stop()
    assert time.monotonic() - started < 5, "stop() waited out the 60 s backoff"
    assert record(ledger, delivery_id).state is DeliveryState.FAILED  # kept for the next start


@pytest.mark.skipif(not STORESCP.exists(), reason="dcmtk's storescp is not installed")
def test_restarted_worker_resumes_and_delivers_once(tmp_path: Path) -> None:
    port = free_port()
    destination = Destination("STORESCP", "127.0.0.1", port)
    policy = RetryPolicy(initial_s=0.3, max_s=0.3, max_attempts=5, jitter=0.0)
    with Ledger(tmp_path / "ledger.sqlite3") as ledger:
        queued = add_result(ledger, tmp_path)
        interrupted = add_result(ledger, tmp_path)
        worker = DeliveryWorker(ledger, DicomSender(SETTINGS), policy)
        worker.start()
        first = worker.enqueue(queued[0], queued[1], destination)
        wait_for(lambda: record(ledger, first).state is DeliveryState.FAILED, "a failed attempt")
        worker.stop()
        # A crash in the middle of an attempt leaves its row in 'sending'.
        second = ledger.add_delivery(interrupted[0], str(destination))
        ledger.mark_deliveries_sending([second])
    scp = start_storescp(port, tmp_path / "received")
    try:
        with Ledger(tmp_path / "ledger.sqlite3") as ledger, \
                DeliveryWorker(ledger, DicomSender(SETTINGS), policy):
            wait_for(lambda: all(record(ledger, i).state is DeliveryState.DONE
                                 for i in (first, second)), "both deliveries")
            assert record(ledger, first).attempts == 2
            assert record(ledger, second).attempts == 2
    finally:
        stop(scp)
    received = sorted(p.name for p in (tmp_path / "received").iterdir())
    assert received == sorted(f"CT.{uid}" for uid in (queued[2], interrupted[2]))


@pytest.mark.skipif(not STORESCP.exists(), reason="dcmtk's storescp is not installed")
def test_a_silent_destination_does_not_hold_up_a_healthy_one(ledger: Ledger,
                                                             tmp_path: Path) -> None:
    """A PACS that takes the TCP connection and never answers keeps its lane in the ACSE wait
    (60 s here); deliveries to storescp, enqueued after it, are done meanwhile."""
    patient = DispatchSettings(ae_title="MEDEDGE_TEST", connection_timeout_s=2, acse_timeout_s=60,
                               dimse_timeout_s=10, network_timeout_s=10)
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # never accepted: the kernel completes the handshake, nobody speaks
    port = free_port()
    scp = start_storescp(port, tmp_path / "received")
    try:
        with DeliveryWorker(ledger, DicomSender(patient), FAST) as worker:
            stuck = worker.enqueue(*add_result(ledger, tmp_path)[:2],
                                   Destination("SILENT", "127.0.0.1", silent.getsockname()[1]))
            wait_for(lambda: record(ledger, stuck).state is DeliveryState.SENDING,
                     "the attempt on the silent PACS")
            healthy = Destination("STORESCP", "127.0.0.1", port)
            ids = [worker.enqueue(*add_result(ledger, tmp_path)[:2], healthy) for _ in range(3)]
            wait_for(lambda: all(record(ledger, i).state is DeliveryState.DONE for i in ids),
                     "deliveries to storescp while the silent PACS holds its association")
            assert record(ledger, stuck).state is DeliveryState.SENDING, \
                "the silent PACS's attempt ended: the test proves nothing"
            silent.close()  # resets the waiting connection: that attempt fails and is retried
            wait_for(lambda: record(ledger, stuck).attempts >= 2, "a second attempt")
    finally:
        silent.close()
        stop(scp)
    assert len(list((tmp_path / "received").iterdir())) == 3


@pytest.mark.skipif(not STORESCP.exists(), reason="dcmtk's storescp is not installed")
def test_destinations_over_the_lane_limit_wait_their_turn(ledger: Ledger,
                                                          tmp_path: Path) -> None:
    port = free_port()
    scp = start_storescp(port, tmp_path / "received")
    try:
        # storescp answers any called AE title, so these are two destinations on one peer
        first, second = (Destination(aet, "127.0.0.1", port) for aet in ("FIRST", "SECOND"))
        with DeliveryWorker(ledger, DicomSender(SETTINGS), FAST, max_destinations=1) as worker:
            ids = [worker.enqueue(*add_result(ledger, tmp_path)[:2], d)
                   for d in (first, second, first, second)]
            wait_for(lambda: all(record(ledger, i).state is DeliveryState.DONE for i in ids),
                     "deliveries to both destinations")
            wait_for(lambda: not worker.destinations(), "idle lanes to retire")
    finally:
        stop(scp)
